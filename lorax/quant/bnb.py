"""Quantized frozen bases: NF4 (bit-for-bit the bitsandbytes scheme) and int8 absmax.

``lorax.quantize(params, "nf4")`` replaces the targeted weights by :class:`NF4Weight`
leaves holding uint8 packed codes and (double-)quantized block scales. Inside
``lorax.lora`` an NF4 weight is dequantized in the jitted program right where it is used,
under ``jax.checkpoint``, so the backward pass recomputes it instead of keeping a dense copy
of every layer alive. ``lorax.wrap`` adapts NF4 weights like dense ones: that is QLoRA.

The scheme (see docs/nf4.md): the weight is flattened row-major in PyTorch's ``[out, in]`` layout
(a Flax ``[in, out]`` kernel is transposed first; kernels of more axes are flattened as
they are), cut into blocks of ``block_size`` values, each scaled by its absmax and mapped to
the nearest of 16 NF4 levels (ties to the lower code), packed two per byte, high nibble
first. Double quantization stores the block absmaxes as uint8 codes of bitsandbytes' signed
8-bit dynamic map, in blocks of 256, around their mean.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxKeyError, LoraxTypeError, LoraxValueError
from lorax.quant.formats import DYNAMIC_MAP, NESTED_BLOCK, NF4_CODE, NF4Weight
from lorax.quant.quantizers import _compute_dtype

_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"


def nf4_to_bnb(leaf: NF4Weight, prefix: str) -> dict[str, np.ndarray]:
    """The tensors bitsandbytes serializes for one quantized Linear ``prefix``.

    ``leaf`` must be one layer of a 2-D kernel (slice stacked leaves first). Keys:
    ``{prefix}.weight`` (packed uint8 ``[(n+1)//2, 1]``), ``.weight.absmax``,
    ``.weight.quant_map`` and, when double quantized, ``.weight.nested_absmax`` and
    ``.weight.nested_quant_map``, plus the JSON quant state as a uint8 tensor.

    Example:
      >>> import jax, lorax
      >>> q = lorax.quant.quantize_nf4(jax.random.normal(jax.random.key(0), (64, 32)))
      >>> sorted(lorax.quant.nf4_to_bnb(q, "fc")) [:2]
      ['fc.weight', 'fc.weight.absmax']
    """
    import json

    if leaf.codes.ndim != 1 or len(leaf.layer_shape) != 2:
        raise LoraxValueError(
            f"lorax: '{prefix}': the bitsandbytes layout holds one 2-D Linear "
            f"weight; got a leaf of shape {leaf.shape} (slice stacked layers)"
        )
    d_in, d_out = leaf.layer_shape
    state = {
        "quant_type": "nf4",
        "blocksize": leaf.block_size,
        "dtype": jnp.dtype(leaf.compute_dtype).name,
        "shape": [d_out, d_in],
    }
    out = {
        f"{prefix}.weight": np.asarray(leaf.codes).reshape(-1, 1),
        f"{prefix}.weight.absmax": np.asarray(leaf.absmax),
        f"{prefix}.weight.quant_map": NF4_CODE.copy(),
    }
    if leaf.double_quant:
        out[f"{prefix}.weight.nested_absmax"] = np.asarray(leaf.absmax2, np.float32)
        out[f"{prefix}.weight.nested_quant_map"] = DYNAMIC_MAP.copy()
        state.update(
            nested_blocksize=NESTED_BLOCK, nested_dtype="float32", nested_offset=float(leaf.offset)
        )
    out[f"{prefix}.{_QUANT_STATE_KEY}"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    return out


def _is_count(x: Any) -> bool:
    """A positive int (JSON ints and numpy ints pass; bools and floats do not)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) and int(x) > 0


def nf4_from_bnb(
    tensors: Any,
    prefix: str,
    compute_dtype: Any = None,
    expected_shape: Sequence[int] | None = None,
) -> NF4Weight:
    """Reads one quantized Linear ``prefix`` from bitsandbytes tensors into an NF4Weight
    with the Flax ``[in, out]`` layout. Errors name the key that is missing or wrong.

    Args:
      tensors: a mapping from tensor names to arrays (e.g. ``safetensors.numpy.load_file``).
      prefix: the Linear's name, e.g. ``"model.layers.0.mlp.down_proj"``.
      compute_dtype: dtype to dequantize to; default the quant state's ``dtype``.
      expected_shape: the Flax kernel shape ``(in, out)`` the model needs. Pass it when
        loading into a model: the quant state's ``shape`` (``[out, in]``) is the only record
        of the layout, and a swapped one has the same numbers of code bytes and scales, so
        nothing in the tensors can reveal it; it would load a permuted matrix.

    Raises:
      LoraxKeyError: a tensor is missing. LoraxValueError: a tensor or a quant-state field
        of the wrong shape, size, dtype or value, or a shape other than ``expected_shape``.
    """
    import json

    def get(key: str) -> np.ndarray:
        full = f"{prefix}.{key}"
        if full not in tensors:
            raise LoraxKeyError(f"lorax: bitsandbytes tensor '{full}' is missing")
        return np.asarray(tensors[full])

    state_key = f"{prefix}.{_QUANT_STATE_KEY}"
    try:
        state = json.loads(bytes(get(_QUANT_STATE_KEY).astype(np.uint8)).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraxValueError(f"lorax: '{state_key}' is not a JSON quant state") from err
    if not isinstance(state, dict):
        raise LoraxValueError(
            f"lorax: '{state_key}' is not a JSON quant state (an object); got "
            f"{type(state).__name__}"
        )
    if state.get("quant_type") != "nf4":
        raise LoraxValueError(
            f"lorax: '{prefix}' has quant_type {state.get('quant_type')!r}; only 'nf4' is supported"
        )
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(map(_is_count, shape))):
        raise LoraxValueError(
            f"lorax: '{state_key}': shape must be [out, in], two positive ints; got {shape!r}"
        )
    d_out, d_in = (int(s) for s in shape)
    block = state.get("blocksize")
    if not _is_count(block):
        raise LoraxValueError(
            f"lorax: '{state_key}': blocksize must be a positive int; got {block!r}"
        )
    block = int(block)  # type: ignore[arg-type]  # a positive integral number: checked above
    if expected_shape is not None:
        expected = tuple(expected_shape) if isinstance(expected_shape, Sequence) else None
        if expected is None or len(expected) != 2 or not all(map(_is_count, expected)):
            raise LoraxValueError(
                f"lorax.quant.nf4_from_bnb: expected_shape must be the Flax "
                f"kernel shape (in, out); got {expected_shape!r}"
            )
        expected = tuple(int(s) for s in expected)
        if (d_in, d_out) != expected:
            hint = (
                " (swapped: the state's shape must be [out, in], the PyTorch layout)"
                if (d_out, d_in) == expected
                else ""
            )
            raise LoraxValueError(
                f"lorax: '{state_key}': shape [out, in] = {[d_out, d_in]} is a "
                f"Flax kernel (in, out) = {(d_in, d_out)}; expected_shape is "
                f"{expected}{hint}"
            )
    n = d_out * d_in
    nblocks = -(-n // block)
    weight, absmax = get("weight"), get("weight.absmax")
    if weight.dtype not in (np.uint8, np.int8):
        raise LoraxValueError(
            f"lorax: '{prefix}.weight' must hold uint8 packed codes; got dtype {weight.dtype}"
        )
    if weight.size != (n + 1) // 2 or absmax.size != nblocks:
        raise LoraxValueError(
            f"lorax: '{prefix}': '{prefix}.weight' holds {weight.size} code "
            f"bytes and '{prefix}.weight.absmax' {absmax.size} scales; they "
            f"do not fit shape {[d_out, d_in]} with block {block} (expected "
            f"{(n + 1) // 2} and {nblocks})"
        )
    if weight.ndim != 1 and weight.shape != ((n + 1) // 2, 1):
        raise LoraxValueError(
            f"lorax: '{prefix}.weight' must have shape [(n + 1) // 2, 1] = "
            f"{[(n + 1) // 2, 1]} for shape {[d_out, d_in]}; got "
            f"{list(weight.shape)}"
        )
    codes = np.ascontiguousarray(weight).reshape(-1).view(np.uint8)
    if not np.array_equal(get("weight.quant_map").astype(np.float32), NF4_CODE):
        raise LoraxValueError(f"lorax: '{prefix}.weight.quant_map' is not the NF4 code table")
    absmax2 = offset = None
    if "nested_blocksize" in state:
        if state["nested_blocksize"] != NESTED_BLOCK:
            raise LoraxValueError(
                f"lorax: '{state_key}': nested_blocksize must be "
                f"{NESTED_BLOCK}; got {state['nested_blocksize']!r}"
            )
        if not np.array_equal(get("weight.nested_quant_map").astype(np.float32), DYNAMIC_MAP):
            raise LoraxValueError(
                f"lorax: '{prefix}.weight.nested_quant_map' is not the signed 8-bit dynamic map"
            )
        if absmax.dtype != np.uint8:
            raise LoraxValueError(
                f"lorax: '{prefix}.weight.absmax' must hold uint8 codes (the "
                f"quant state has nested_blocksize); got dtype {absmax.dtype}"
            )
        nested = get("weight.nested_absmax")
        nb2 = -(-nblocks // NESTED_BLOCK)
        if not np.issubdtype(nested.dtype, np.floating) or nested.size != nb2:
            raise LoraxValueError(
                f"lorax: '{prefix}.weight.nested_absmax' must hold ceil("
                f"{nblocks} blocks / {NESTED_BLOCK}) = {nb2} float scales; got "
                f"{nested.size} of dtype {nested.dtype}"
            )
        nested = nested.astype(np.float32).reshape(-1)
        if not np.all(np.isfinite(nested)):
            raise LoraxValueError(
                f"lorax: '{prefix}.weight.nested_absmax' holds inf/NaN; expected finite scales"
            )
        off = state.get("nested_offset")
        if isinstance(off, bool) or not isinstance(off, numbers.Real) or not math.isfinite(off):
            raise LoraxValueError(
                f"lorax: '{state_key}': nested_offset must be a finite number; got {off!r}"
            )
        absmax2 = jnp.asarray(nested)
        offset = jnp.asarray(off, jnp.float32)
        absmax = absmax.reshape(-1)
    else:
        if not np.issubdtype(absmax.dtype, np.floating):
            raise LoraxValueError(
                f"lorax: '{prefix}.weight.absmax' must hold float scales (the "
                "quant state has no nested_blocksize, so no double "
                f"quantization); got dtype {absmax.dtype}"
            )
        absmax = absmax.astype(np.float32).reshape(-1)
        if not np.all(np.isfinite(absmax)):
            raise LoraxValueError(
                f"lorax: '{prefix}.weight.absmax' holds inf/NaN; expected finite scales"
            )
    if compute_dtype is not None:
        dtype = _compute_dtype(compute_dtype, "lorax.quant.nf4_from_bnb")
    else:
        try:
            dtype = _compute_dtype(state.get("dtype", "bfloat16"), state_key)
        except LoraxTypeError:
            raise LoraxValueError(
                f"lorax: '{state_key}': dtype must name a floating dtype; got "
                f"{state.get('dtype')!r}"
            ) from None
    return NF4Weight(
        codes=jnp.asarray(codes),
        absmax=jnp.asarray(absmax),
        absmax2=absmax2,
        offset=offset,
        layer_shape=(d_in, d_out),
        block_size=int(block),
        compute_dtype=dtype,
    )
