"""Quantized frozen bases: NF4 (bit-for-bit the bitsandbytes scheme) and int8 absmax.

``lorax.quantize(params, "nf4")`` replaces the targeted weights by :class:`NF4Weight`
leaves holding uint8 packed codes and (double-)quantized block scales. Inside
``lorax.lora`` an NF4 weight is dequantized in the jitted program right where it is used,
under ``jax.checkpoint``, so the backward pass recomputes it instead of keeping a dense copy
of every layer alive. ``lorax.wrap`` adapts NF4 weights like dense ones: that is QLoRA.

The scheme (see NF4.md): the weight is flattened row-major in PyTorch's ``[out, in]`` layout
(a Flax ``[in, out]`` kernel is transposed first; kernels of more axes are flattened as
they are), cut into blocks of ``block_size`` values, each scaled by its absmax and mapped to
the nearest of 16 NF4 levels (ties to the lower code), packed two per byte, high nibble
first. Double quantization stores the block absmaxes as uint8 codes of bitsandbytes' signed
8-bit dynamic map, in blocks of 256, around their mean.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxKeyError, LoraxTypeError, LoraxValueError
from lorax.inits import require_finite
from lorax.leaves import LoraxLeaf, is_lorax_leaf, register_leaf, static_field
from lorax.targets import (FlatTree, Targets, floating_dtype, infer_in_axes, infer_stack_axes,
                           select, stack_axes_for)

#: The NF4 levels, indexed by code (float32; hard-coded as bitsandbytes does).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace``: the first half counts up from start, the rest down from end."""
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    up = np.float32(start) + i.astype(np.float32) * step
    down = np.float32(end) - (steps - 1 - i).astype(np.float32) * step
    return np.where(i < half, up, down).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic 8-bit quantization map (``create_dynamic_map``), float32[256]."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                 else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = _torch_linspace(0.1, 1, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    if additional > 0:
        bounds = _torch_linspace(0.1, 1, additional + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.array(sorted(data), np.float32)


DYNAMIC_MAP = dynamic_map()
NESTED_BLOCK = 256


# XLA divides by multiplying with the reciprocal, and 1 / absmax is a subnormal (flushed to
# zero) once absmax >= 2**126 (~8.5e37): blocks above _BIG are scaled by _SHRINK first. Both
# are powers of two, so the scaling is exact and smaller blocks stay bit for bit as before.
_BIG = 2.0 ** 100
_SHRINK = 2.0 ** -64


def _normalize(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    """``blocks / absmax`` per block (``blocks`` where absmax is 0), also for huge absmax."""
    s = jnp.where(absmax > _BIG, _SHRINK, 1.0)
    return (blocks * s[..., None]) / jnp.where(absmax == 0, 1.0, absmax * s)[..., None]


def _mean_last(x: jax.Array) -> jax.Array:
    """Mean over the last axis of non-negative ``x``; a float32 sum of values near 1e38 would
    overflow to inf, so large rows are summed scaled down (exactly, by a power of two)."""
    s = jnp.where(jnp.max(x, axis=-1) > _BIG, _SHRINK, 1.0)
    return jnp.mean(x * s[..., None], axis=-1) / s


def _finite_max(dtype: Any) -> float:
    """The largest finite value of ``dtype`` that float32 holds: dequantized values are
    clipped to it, so a finite weight never dequantizes to inf (a scale rounded up past the
    top of bfloat16 or float32 would)."""
    return float(min(jnp.finfo(dtype).max, np.finfo(np.float32).max))


def _nearest(table: np.ndarray, x: jax.Array) -> jax.Array:
    """Index of the nearest table value; a tie goes to the lower index."""
    mids = jnp.asarray((table[1:] + table[:-1]) / np.float32(2), jnp.float32)
    return jnp.searchsorted(mids, x, side="left").astype(jnp.uint8)


def _to_torch_order(w: jax.Array, stack: int) -> jax.Array:
    """Per layer, the row-major order of the PyTorch layout: 2-D kernels are transposed."""
    if w.ndim - stack == 2:
        w = jnp.swapaxes(w, -1, -2)
    return w.reshape(w.shape[:stack] + (-1,))


def _from_torch_order(flat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    lead = flat.shape[:-1]
    if len(shape) == 2:
        return jnp.swapaxes(flat.reshape(lead + (shape[1], shape[0])), -1, -2)
    return flat.reshape(lead + shape)


class QuantizedLeaf(LoraxLeaf):
    """Shared behaviour of frozen quantized weights: dequantized to the static
    ``compute_dtype``, then to ``cast_to`` when the model cast the weight (as a cast of the
    dense array would round), and products dequantize next to the use."""

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.cast_to or self.compute_dtype)

    def dot_general(self, other, *, dimension_numbers, leaf_is_lhs, precision,
                    preferred_element_type, bind):
        return _dequantized_apply(self, other, leaf_is_lhs, bind)

    def astype(self, dtype):
        if not jnp.issubdtype(dtype, jnp.floating):
            return NotImplemented
        return dataclasses.replace(self, cast_to=jnp.dtype(dtype).name)


@register_leaf
class NF4Weight(QuantizedLeaf):
    """A frozen weight stored as NF4 codes (bitsandbytes layout); no trainable parts.

    Attributes:
      codes: uint8 ``(*stack, ceil(n / 2))``, two 4-bit codes per byte, high nibble first.
      absmax: per block, ``(*stack, n_blocks)``: float32, or uint8 codes when double quantized.
      absmax2: float32 ``(*stack, ceil(n_blocks / 256))`` second-level scales, or None.
      offset: float32 ``(*stack,)`` mean of the absmaxes, or None.
      layer_shape: the dense weight's shape per layer (Flax layout); static.
      block_size: values per block; static.
      compute_dtype: dtype of the dequantized weight (a dtype name); static.
    """

    codes: Any
    absmax: Any
    absmax2: Any = None
    offset: Any = None
    layer_shape: tuple[int, ...] = static_field(default=())
    block_size: int = static_field(default=64)
    compute_dtype: str = static_field(default="bfloat16")
    cast_to: str | None = static_field(default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1]) + tuple(self.layer_shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def n(self) -> int:
        return math.prod(self.layer_shape)

    def block_absmax(self) -> jax.Array:
        """The float32 absmax of every block (decoding the double quantization)."""
        if not self.double_quant:
            return self.absmax
        code2 = jnp.asarray(DYNAMIC_MAP)[self.absmax.astype(jnp.int32)]
        scale2 = jnp.repeat(self.absmax2, NESTED_BLOCK, axis=-1)[..., :self.absmax.shape[-1]]
        return code2 * scale2 + self.offset[..., None]

    def unpacked_codes(self) -> jax.Array:
        """uint8 codes, one per value, ``(*stack, n)``."""
        q = jnp.stack([self.codes >> 4, self.codes & 15], axis=-1)
        return q.reshape(q.shape[:-2] + (-1,))[..., :self.n]

    def materialize(self) -> jax.Array:
        q = self.unpacked_codes()
        nblocks = self.absmax.shape[-1]
        pad = nblocks * self.block_size - self.n
        if pad:
            q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
        values = jnp.asarray(NF4_CODE)[q.astype(jnp.int32)]
        values = values.reshape(values.shape[:-1] + (nblocks, self.block_size))
        top = _finite_max(self.compute_dtype)  # |code| <= 1: clipping the scales suffices
        scales = jnp.clip(self.block_absmax(), -top, top)
        values = (values * scales[..., None]).reshape(values.shape[:-2] + (-1,))
        # Round before reordering: the transpose to the Flax layout then moves compute_dtype
        # values (half the bytes of float32 for bf16); rounding and reordering commute.
        values = values[..., :self.n].astype(self.compute_dtype)
        return _from_torch_order(values, self.layer_shape).astype(self.dtype)


@register_leaf
class Int8Weight(QuantizedLeaf):
    """A frozen weight stored as int8 with one float32 absmax scale per output channel."""

    codes: Any
    scale: Any
    compute_dtype: str = static_field(default="bfloat16")
    cast_to: str | None = static_field(default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def materialize(self) -> jax.Array:
        top = _finite_max(self.compute_dtype)
        values = jnp.clip(self.codes.astype(jnp.float32) * self.scale, -top, top)
        return values.astype(self.compute_dtype).astype(self.dtype)


def _dequantized_apply(leaf: LoraxLeaf, other: jax.Array, leaf_is_lhs: bool, bind) -> jax.Array:
    """Dequantizes inside a checkpoint with the product, so only the quantized arrays are
    kept for the backward pass, which dequantizes again: one dense layer at a time."""

    def product(other, leaf):
        w = leaf.materialize().astype(other.dtype)
        return bind(w, other) if leaf_is_lhs else bind(other, w)

    return jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)(
        other, leaf)


# --------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------

def _compute_dtype(value: Any, where: str) -> str:
    """The name of ``value`` if it is a floating dtype (what quantized weights decode to)."""
    return floating_dtype(value, f"{where}: compute_dtype", optional=False).name


def _check_nf4_options(block_size: Any, double_quant: Any, where: str) -> None:
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
        raise LoraxTypeError(f"{where}: block_size must be an int, a power of two in [32, 4096]; "
                             f"got {type(block_size).__name__} {block_size!r}")
    if not 32 <= block_size <= 4096 or block_size & (block_size - 1):
        raise LoraxValueError(f"{where}: block_size must be a power of two in [32, 4096]; "
                              f"got {block_size}")
    if not isinstance(double_quant, (bool, np.bool_)):
        raise LoraxTypeError(f"{where}: double_quant must be a bool; got "
                             f"{type(double_quant).__name__} {double_quant!r}")


def _check_axes(value: Any, name: str, low: int, high: int, ndim: int, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise LoraxTypeError(f"{where}: {name} must be an int; got {value!r}")
    if not low <= value <= high:
        raise LoraxValueError(f"{where}: {name} must be in [{low}, {high}] for a weight of "
                              f"{ndim} axes; got {value}")
    return int(value)


def quantize_nf4(w: jax.Array, block_size: int = 64, double_quant: bool = True,
                 compute_dtype: Any = jnp.bfloat16, stack: int = 0) -> NF4Weight:
    """NF4-quantizes one weight (per layer over ``stack`` leading axes), as bitsandbytes.

    A concrete ``w`` holding inf or NaN raises :class:`lorax.NonFiniteError`; under tracing
    (jit, ``lax.map``) the values are unknown and not checked.

    Example:
      >>> import jax, lorax
      >>> q = lorax.quant.quantize_nf4(jax.random.normal(jax.random.key(0), (64, 32)))
      >>> q.codes.shape, q.codes.dtype.name, q.absmax.dtype.name
      ((1024,), 'uint8', 'uint8')
    """
    where = "lorax.quant.quantize_nf4"
    _check_nf4_options(block_size, double_quant, where)
    dtype = _compute_dtype(compute_dtype, where)
    stack = _check_axes(stack, "stack", 0, max(jnp.ndim(w) - 1, 0), jnp.ndim(w), where)
    require_finite(w, f"{where}: w")
    return _nf4(w, int(block_size), bool(double_quant), dtype, stack)


def _nf4(w: jax.Array, block_size: int, double_quant: bool, compute_dtype: str,
         stack: int) -> NF4Weight:
    layer_shape = tuple(int(s) for s in w.shape[stack:])
    flat = _to_torch_order(jnp.asarray(w, jnp.float32), stack)
    n = flat.shape[-1]
    nblocks = -(-n // block_size)
    padded = jnp.pad(flat, [(0, 0)] * stack + [(0, nblocks * block_size - n)])
    blocks = padded.reshape(flat.shape[:-1] + (nblocks, block_size))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = _normalize(blocks, absmax)
    q = _nearest(NF4_CODE, normed).reshape(flat.shape[:-1] + (-1,))[..., :n]
    if n % 2:
        q = jnp.pad(q, [(0, 0)] * stack + [(0, 1)])
    pairs = q.reshape(q.shape[:-1] + (-1, 2))
    codes = (pairs[..., 0] << 4) | pairs[..., 1]
    absmax2 = offset = None
    if double_quant:
        offset = _mean_last(absmax)
        centered = absmax - offset[..., None]
        nb2 = -(-nblocks // NESTED_BLOCK)
        cpad = jnp.pad(centered, [(0, 0)] * stack + [(0, nb2 * NESTED_BLOCK - nblocks)])
        cblocks = cpad.reshape(centered.shape[:-1] + (nb2, NESTED_BLOCK))
        absmax2 = jnp.max(jnp.abs(cblocks), axis=-1)
        normed2 = _normalize(cblocks, absmax2)
        absmax = _nearest(DYNAMIC_MAP, normed2).reshape(cpad.shape)[..., :nblocks]
    return NF4Weight(codes=codes.astype(jnp.uint8), absmax=absmax, absmax2=absmax2,
                     offset=offset, layer_shape=layer_shape, block_size=block_size,
                     compute_dtype=compute_dtype)


def quantize_int8(w: jax.Array, compute_dtype: Any = jnp.bfloat16, stack: int = 0,
                  in_axes: int = 1) -> Int8Weight:
    """int8 absmax quantization with one scale per output channel (axes after ``in_axes``).

    A concrete ``w`` holding inf or NaN raises :class:`lorax.NonFiniteError`."""
    where = "lorax.quant.quantize_int8"
    dtype = _compute_dtype(compute_dtype, where)
    ndim = jnp.ndim(w)
    stack = _check_axes(stack, "stack", 0, max(ndim - 2, 0), ndim, where)
    in_axes = _check_axes(in_axes, "in_axes", 1, max(ndim - stack - 1, 1), ndim, where)
    require_finite(w, f"{where}: w")
    return _int8(w, dtype, stack, in_axes)


def _int8(w: jax.Array, compute_dtype: str, stack: int, in_axes: int) -> Int8Weight:
    w = jnp.asarray(w, jnp.float32)
    reduce = tuple(range(stack, stack + in_axes))
    scale = jnp.max(jnp.abs(w), axis=reduce, keepdims=True) / 127.0
    codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale)).astype(jnp.int8)
    return Int8Weight(codes=codes, scale=scale, compute_dtype=compute_dtype)


def quantize(params: Any, method: str = "nf4", block_size: int = 64, double_quant: bool = True,
             targets: Targets = None, compute_dtype: Any = jnp.bfloat16,
             stacked: Any = None) -> Any:
    """Replaces the targeted weights of ``params`` by quantized frozen leaves.

    Args:
      params: any pytree of arrays (as ``lorax.wrap``).
      method: ``"nf4"`` (bitsandbytes NF4) or ``"int8"`` (absmax per output channel).
      block_size: NF4 values per block (a power of two, 32 ... 4096).
      double_quant: quantize the NF4 block scales too (4.127 instead of 4.5 bits/param).
      targets: as in ``lorax.wrap``; default every floating weight of rank >= 2 except
        embedding tables.
      compute_dtype: floating dtype the weights are dequantized to inside the model.
      stacked: leading layer axes, as in ``lorax.wrap`` (each layer is quantized alone).

    Returns:
      The tree with :class:`NF4Weight` / :class:`Int8Weight` leaves where targeted; nothing
      else changes.

    Raises:
      lorax.NonFiniteError: a targeted weight holds inf or NaN (its blocks' scales would be
        inf/NaN); the message names its path. Checked on concrete arrays, not under jit.
      LoraxValueError, LoraxTypeError: a bad argument (the message names it).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 64)),
      ...                     "bias": jnp.zeros(64)}}
      >>> qp = lorax.quantize(params, "nf4")
      >>> type(qp["dense"]["kernel"]).__name__, qp["dense"]["kernel"].shape
      ('NF4Weight', (64, 64))
    """
    if not isinstance(method, str) or method not in ("nf4", "int8"):
        raise LoraxValueError(f"lorax.quantize: method must be 'nf4' or 'int8'; got {method!r}")
    _check_nf4_options(block_size, double_quant, "lorax.quantize")
    dtype = _compute_dtype(compute_dtype, "lorax.quantize")
    tree = FlatTree.of(params)
    chosen = select(targets, tree.paths, tree.leaves)
    out = list(tree.leaves)
    for i, spec in chosen.items():
        path, leaf = tree.paths[i], tree.leaves[i]
        if is_lorax_leaf(leaf):
            raise LoraxValueError(f"lorax.quantize: '{path}' is already a {type(leaf).__name__}; "
                                  "quantize the dense tree before wrapping it")
        siblings = tree.siblings(path)
        stack = stack_axes_for(stacked, spec.stack_axes, path)
        stack = infer_stack_axes(path, leaf.shape, siblings) if stack is None else stack
        require_finite(leaf, f"lorax.quantize: '{path}'")
        if method == "nf4":
            out[i] = _nf4(leaf, int(block_size), bool(double_quant), dtype, stack)
        else:
            in_axes = spec.in_axes or infer_in_axes(leaf.shape, siblings, stack)
            out[i] = _int8(leaf, dtype, stack, in_axes)
    return tree.rebuild(out)


def dequantize(tree: Any) -> Any:
    """Dense weights for every quantized leaf (alias of ``lorax.merge`` on such trees)."""
    from lorax.tree import merge

    return merge(tree)


# --------------------------------------------------------------------------------------
# The bitsandbytes serialized layout (Hugging Face 4-bit safetensors checkpoints)
# --------------------------------------------------------------------------------------

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
        raise LoraxValueError(f"lorax: '{prefix}': the bitsandbytes layout holds one 2-D Linear "
                              f"weight; got a leaf of shape {leaf.shape} (slice stacked layers)")
    d_in, d_out = leaf.layer_shape
    state = {"quant_type": "nf4", "blocksize": leaf.block_size,
             "dtype": jnp.dtype(leaf.compute_dtype).name, "shape": [d_out, d_in]}
    out = {f"{prefix}.weight": np.asarray(leaf.codes).reshape(-1, 1),
           f"{prefix}.weight.absmax": np.asarray(leaf.absmax),
           f"{prefix}.weight.quant_map": NF4_CODE.copy()}
    if leaf.double_quant:
        out[f"{prefix}.weight.nested_absmax"] = np.asarray(leaf.absmax2, np.float32)
        out[f"{prefix}.weight.nested_quant_map"] = DYNAMIC_MAP.copy()
        state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32",
                     nested_offset=float(leaf.offset))
    out[f"{prefix}.{_QUANT_STATE_KEY}"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    return out


def _is_count(x: Any) -> bool:
    """A positive int (JSON ints and numpy ints pass; bools and floats do not)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) and x > 0


def nf4_from_bnb(tensors: Any, prefix: str, compute_dtype: Any = None,
                 expected_shape: Sequence[int] | None = None) -> NF4Weight:
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
        raise LoraxValueError(f"lorax: '{state_key}' is not a JSON quant state (an object); got "
                              f"{type(state).__name__}")
    if state.get("quant_type") != "nf4":
        raise LoraxValueError(f"lorax: '{prefix}' has quant_type {state.get('quant_type')!r}; "
                              "only 'nf4' is supported")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(map(_is_count, shape))):
        raise LoraxValueError(f"lorax: '{state_key}': shape must be [out, in], two positive "
                              f"ints; got {shape!r}")
    d_out, d_in = (int(s) for s in shape)
    block = state.get("blocksize")
    if not _is_count(block):
        raise LoraxValueError(f"lorax: '{state_key}': blocksize must be a positive int; got "
                              f"{block!r}")
    if expected_shape is not None:
        expected = tuple(expected_shape) if isinstance(expected_shape, Sequence) else None
        if expected is None or len(expected) != 2 or not all(map(_is_count, expected)):
            raise LoraxValueError(f"lorax.quant.nf4_from_bnb: expected_shape must be the Flax "
                                  f"kernel shape (in, out); got {expected_shape!r}")
        expected = tuple(int(s) for s in expected)
        if (d_in, d_out) != expected:
            hint = (" (swapped: the state's shape must be [out, in], the PyTorch layout)"
                    if (d_out, d_in) == expected else "")
            raise LoraxValueError(f"lorax: '{state_key}': shape [out, in] = {[d_out, d_in]} is a "
                                  f"Flax kernel (in, out) = {(d_in, d_out)}; expected_shape is "
                                  f"{expected}{hint}")
    n = d_out * d_in
    nblocks = -(-n // block)
    weight, absmax = get("weight"), get("weight.absmax")
    if weight.dtype not in (np.uint8, np.int8):
        raise LoraxValueError(f"lorax: '{prefix}.weight' must hold uint8 packed codes; got "
                              f"dtype {weight.dtype}")
    if weight.size != (n + 1) // 2 or absmax.size != nblocks:
        raise LoraxValueError(f"lorax: '{prefix}': '{prefix}.weight' holds {weight.size} code "
                              f"bytes and '{prefix}.weight.absmax' {absmax.size} scales; they "
                              f"do not fit shape {[d_out, d_in]} with block {block} (expected "
                              f"{(n + 1) // 2} and {nblocks})")
    if weight.ndim != 1 and weight.shape != ((n + 1) // 2, 1):
        raise LoraxValueError(f"lorax: '{prefix}.weight' must have shape [(n + 1) // 2, 1] = "
                              f"{[(n + 1) // 2, 1]} for shape {[d_out, d_in]}; got "
                              f"{list(weight.shape)}")
    codes = np.ascontiguousarray(weight).reshape(-1).view(np.uint8)
    if not np.array_equal(get("weight.quant_map").astype(np.float32), NF4_CODE):
        raise LoraxValueError(f"lorax: '{prefix}.weight.quant_map' is not the NF4 code table")
    absmax2 = offset = None
    if "nested_blocksize" in state:
        if state["nested_blocksize"] != NESTED_BLOCK:
            raise LoraxValueError(f"lorax: '{state_key}': nested_blocksize must be "
                                  f"{NESTED_BLOCK}; got {state['nested_blocksize']!r}")
        if not np.array_equal(get("weight.nested_quant_map").astype(np.float32), DYNAMIC_MAP):
            raise LoraxValueError(f"lorax: '{prefix}.weight.nested_quant_map' is not the signed "
                                  "8-bit dynamic map")
        if absmax.dtype != np.uint8:
            raise LoraxValueError(f"lorax: '{prefix}.weight.absmax' must hold uint8 codes (the "
                                  f"quant state has nested_blocksize); got dtype {absmax.dtype}")
        nested = get("weight.nested_absmax")
        nb2 = -(-nblocks // NESTED_BLOCK)
        if not np.issubdtype(nested.dtype, np.floating) or nested.size != nb2:
            raise LoraxValueError(f"lorax: '{prefix}.weight.nested_absmax' must hold ceil("
                                  f"{nblocks} blocks / {NESTED_BLOCK}) = {nb2} float scales; got "
                                  f"{nested.size} of dtype {nested.dtype}")
        nested = nested.astype(np.float32).reshape(-1)
        if not np.all(np.isfinite(nested)):
            raise LoraxValueError(f"lorax: '{prefix}.weight.nested_absmax' holds inf/NaN; "
                                  "expected finite scales")
        off = state.get("nested_offset")
        if isinstance(off, bool) or not isinstance(off, numbers.Real) or not math.isfinite(off):
            raise LoraxValueError(f"lorax: '{state_key}': nested_offset must be a finite number; "
                                  f"got {off!r}")
        absmax2 = jnp.asarray(nested)
        offset = jnp.asarray(off, jnp.float32)
        absmax = absmax.reshape(-1)
    else:
        if not np.issubdtype(absmax.dtype, np.floating):
            raise LoraxValueError(f"lorax: '{prefix}.weight.absmax' must hold float scales (the "
                                  "quant state has no nested_blocksize, so no double "
                                  f"quantization); got dtype {absmax.dtype}")
        absmax = absmax.astype(np.float32).reshape(-1)
        if not np.all(np.isfinite(absmax)):
            raise LoraxValueError(f"lorax: '{prefix}.weight.absmax' holds inf/NaN; expected "
                                  "finite scales")
    if compute_dtype is not None:
        dtype = _compute_dtype(compute_dtype, "lorax.quant.nf4_from_bnb")
    else:
        try:
            dtype = _compute_dtype(state.get("dtype", "bfloat16"), state_key)
        except LoraxTypeError:
            raise LoraxValueError(f"lorax: '{state_key}': dtype must name a floating dtype; got "
                                  f"{state.get('dtype')!r}") from None
    return NF4Weight(codes=jnp.asarray(codes), absmax=jnp.asarray(absmax), absmax2=absmax2,
                     offset=offset, layer_shape=(d_in, d_out), block_size=int(block),
                     compute_dtype=dtype)
