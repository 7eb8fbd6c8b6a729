"""Quantized frozen bases (QLoRA): NF4 (bit for bit the bitsandbytes scheme) and int8.

``formats`` holds the leaf kinds and their codebooks, ``quantizers`` the functions that build
them, ``bnb`` the bitsandbytes serialized layout of Hugging Face 4-bit checkpoints.
"""

from lorax.quant.bnb import nf4_from_bnb as nf4_from_bnb
from lorax.quant.bnb import nf4_to_bnb as nf4_to_bnb
from lorax.quant.formats import DYNAMIC_MAP as DYNAMIC_MAP
from lorax.quant.formats import NESTED_BLOCK as NESTED_BLOCK
from lorax.quant.formats import NF4_CODE as NF4_CODE
from lorax.quant.formats import Int8Weight as Int8Weight
from lorax.quant.formats import NF4Weight as NF4Weight
from lorax.quant.formats import dynamic_map as dynamic_map
from lorax.quant.quantizers import dequantize as dequantize
from lorax.quant.quantizers import quantize as quantize
from lorax.quant.quantizers import quantize_int8 as quantize_int8
from lorax.quant.quantizers import quantize_nf4 as quantize_nf4
