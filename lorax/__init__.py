"""lorax: functional parameter-efficient fine-tuning for JAX and Flax.

Pure functions turn a parameter pytree into one whose chosen weights are *lorax leaves*
(a frozen base plus small trainable parts), and one transform runs an unmodified model on
such a tree::

    lp = lorax.wrap(params, rank=8, alpha=16, targets=r".*(query|value)/kernel")
    apply = lorax.lora(model.apply)          # same signature, understands lorax leaves
    trainable, frozen = lorax.split(lp)      # differentiate / optimize `trainable` only
    loss = lambda t: loss_fn(apply({"params": lorax.combine(t, frozen)}, x))
    dense = lorax.merge(lp)                  # plain arrays again, for export

``lorax.lora`` traces the function to a jaxpr and evaluates it with an interpreter that
computes ``x @ W + s * (x @ A) @ B`` without storing ``W + s * A @ B``; see
``lorax/transform.py``.
"""

from importlib import metadata as _metadata

from lorax import analysis as analysis  # how low-rank an update is (spectra, reports)
from lorax import sharding as sharding  # registers the sharding primitives' rules
from lorax.errors import CheckpointError as CheckpointError

# Errors and warnings
from lorax.errors import LoraxAmbiguousTargetWarning as LoraxAmbiguousTargetWarning
from lorax.errors import LoraxError as LoraxError
from lorax.errors import LoraxTiedWeightWarning as LoraxTiedWeightWarning
from lorax.errors import NonFiniteError as NonFiniteError
from lorax.errors import NotMergeableError as NotMergeableError
from lorax.io.checkpoint import load as load

# Files
from lorax.io.checkpoint import save as save
from lorax.io.named import load_adapters as load_adapters
from lorax.io.named import save_adapters as save_adapters
from lorax.io.peft import export_peft as export_peft
from lorax.io.peft import import_peft as import_peft

# Extending lorax: a leaf kind of one's own, a rule for a primitive
from lorax.leaf import LoraxLeaf as LoraxLeaf
from lorax.leaf import PrimitiveCall as PrimitiveCall
from lorax.leaf import is_lorax_leaf as is_lorax_leaf
from lorax.leaf import register_leaf as register_leaf
from lorax.leaf import static_field as static_field
from lorax.methods.adalora import AdaLoraState as AdaLoraState
from lorax.methods.adalora import AdaLoraWeight as AdaLoraWeight
from lorax.methods.adalora import adalora as adalora
from lorax.methods.adalora import budget_at as budget_at
from lorax.methods.adalora import mask_to_budget as mask_to_budget
from lorax.methods.adalora import orthogonal_regularizer as orthogonal_regularizer
from lorax.methods.adalora import update_importance as update_importance
from lorax.methods.adapters import AdapterWeight as AdapterWeight
from lorax.methods.adapters import adapters as adapters
from lorax.methods.dora import DoraWeight as DoraWeight
from lorax.methods.hadamard_kron import LohaWeight as LohaWeight
from lorax.methods.hadamard_kron import LokrWeight as LokrWeight
from lorax.methods.hadamard_kron import loha as loha
from lorax.methods.hadamard_kron import lokr as lokr
from lorax.methods.ia3 import IA3Weight as IA3Weight
from lorax.methods.ia3 import ia3 as ia3

# Leaf kinds
from lorax.methods.lora import LoraWeight as LoraWeight
from lorax.methods.multi import MultiLoraWeight as MultiLoraWeight

# Many adapters
from lorax.methods.multi import stack as stack
from lorax.methods.named import AdapterSet as AdapterSet
from lorax.methods.oft import OftWeight as OftWeight
from lorax.methods.oft import oft as oft
from lorax.methods.tokens import TrainableTokensWeight as TrainableTokensWeight
from lorax.methods.tokens import trainable_tokens as trainable_tokens
from lorax.methods.unfrozen import Unfrozen as Unfrozen
from lorax.methods.unfrozen import unfreeze as unfreeze
from lorax.methods.vera import VeraWeight as VeraWeight
from lorax.methods.vera import vera as vera
from lorax.methods.weighted import add_weighted as add_weighted

# Building wrapped trees
from lorax.methods.wrap import wrap as wrap
from lorax.optim import loraplus as loraplus
from lorax.optim import optimizer as optimizer
from lorax.quant.formats import Int8Weight as Int8Weight
from lorax.quant.formats import NF4Weight as NF4Weight
from lorax.quant.quantizers import dequantize as dequantize
from lorax.quant.quantizers import quantize as quantize
from lorax.report import Summary as Summary
from lorax.report import summary as summary
from lorax.sharding import partition_specs as partition_specs
from lorax.sharding import shard as shard
from lorax.targets import LoraSpec as LoraSpec
from lorax.transform import LoraxDensifyError as LoraxDensifyError
from lorax.transform import LoraxDensifyWarning as LoraxDensifyWarning
from lorax.transform import RuleContext as RuleContext

# Running and training them
from lorax.transform import lora as lora
from lorax.transform import register_rule as register_rule
from lorax.transform import using_rules as using_rules
from lorax.tree import combine as combine
from lorax.tree import mask as mask
from lorax.tree import merge as merge
from lorax.tree import split as split
from lorax.usage import Usage as Usage
from lorax.usage import find_targets as find_targets

__all__ = [
    "wrap",
    "ia3",
    "oft",
    "adapters",
    "adalora",
    "vera",
    "loha",
    "lokr",
    "AdaLoraState",
    "update_importance",
    "budget_at",
    "mask_to_budget",
    "orthogonal_regularizer",
    "unfreeze",
    "trainable_tokens",
    "TrainableTokensWeight",
    "quantize",
    "dequantize",
    "LoraSpec",
    "find_targets",
    "Usage",
    "lora",
    "split",
    "combine",
    "mask",
    "merge",
    "partition_specs",
    "shard",
    "optimizer",
    "loraplus",
    "summary",
    "Summary",
    "stack",
    "AdapterSet",
    "add_weighted",
    "save",
    "load",
    "save_adapters",
    "load_adapters",
    "export_peft",
    "import_peft",
    "LoraWeight",
    "DoraWeight",
    "AdaLoraWeight",
    "IA3Weight",
    "VeraWeight",
    "LohaWeight",
    "LokrWeight",
    "OftWeight",
    "AdapterWeight",
    "Unfrozen",
    "MultiLoraWeight",
    "NF4Weight",
    "Int8Weight",
    "LoraxLeaf",
    "PrimitiveCall",
    "register_leaf",
    "static_field",
    "is_lorax_leaf",
    "RuleContext",
    "register_rule",
    "using_rules",
    "LoraxError",
    "CheckpointError",
    "NonFiniteError",
    "NotMergeableError",
    "LoraxTiedWeightWarning",
    "LoraxAmbiguousTargetWarning",
    "LoraxDensifyError",
    "LoraxDensifyWarning",
]

try:
    __version__ = _metadata.version("lorax-peft")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
