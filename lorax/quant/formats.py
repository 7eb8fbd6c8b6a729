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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.leaf import LoraxLeaf, register_leaf, row_lookup, static_field

#: The NF4 levels, indexed by code (float32; hard-coded as bitsandbytes does).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace``: the first half counts up from start, the rest down from end."""
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    up = np.float32(start) + i.astype(np.float32) * step
    down = np.float32(end) - (steps - 1 - i).astype(np.float32) * step
    return np.where(i < half, up, down).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic 8-bit quantization map (``create_dynamic_map``), float32[256]."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = (
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
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
    data += [0.0] * (2**total_bits - len(data))
    return np.array(sorted(data), np.float32)


DYNAMIC_MAP = dynamic_map()
NESTED_BLOCK = 256


# XLA divides by multiplying with the reciprocal, and 1 / absmax is a subnormal (flushed to
# zero) once absmax >= 2**126 (~8.5e37): blocks above _BIG are scaled by _SHRINK first. Both
# are powers of two, so the scaling is exact and smaller blocks stay bit for bit as before.
_BIG = 2.0**100
_SHRINK = 2.0**-64


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


def _slicing() -> Any:
    """``lorax.quant.slicing``, the structural ops of these kinds (it builds on this module,
    so it is imported on first use)."""
    from lorax.quant import slicing

    return slicing


class QuantizedLeaf(LoraxLeaf):
    """Shared behaviour of frozen quantized weights: dequantized to the static
    ``compute_dtype``, then to ``cast_to`` when the model cast the weight (as a cast of the
    dense array would round), and products dequantize next to the use."""

    compute_dtype: str  # static fields of each quantized kind
    cast_to: str | None

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.cast_to or self.compute_dtype)

    def dot_general(
        self,
        other,
        *,
        dimension_numbers,
        leaf_is_lhs,
        precision,
        preferred_element_type,
        bind,
        rng=None,
    ):
        return _dequantized_apply(self, other, leaf_is_lhs, bind)

    def ragged_dot_general(self, lhs, group_sizes, *, params, bind, rng=None):
        """Grouped (mixture-of-experts) products ``ragged_dot(x, W, group_sizes)`` with a
        quantized expert weight: dequantized next to the use, as for ``dot_general``."""
        return _dequantized_ragged(self, lhs, group_sizes, bind)

    def astype(self, dtype):
        if not jnp.issubdtype(dtype, jnp.floating):
            return NotImplemented
        return self.replace(cast_to=jnp.dtype(dtype).name)

    def transpose(self, permutation):
        """A lazy transposed view (a tied embedding used as the output head, ``x @ E.T``):
        products with it dequantize next to the use, as products with the leaf do."""
        return Transposed(self, tuple(int(p) for p in permutation))

    def gather(self, indices, *, params, bind):
        """Row lookups ``table[ids]`` of a 2-D table: only the gathered rows are
        dequantized (the embedding of a tied or quantized table). Layers picked from a
        stack (``params[ids]``) stay quantized."""
        if self.stack_ndim:
            return _slicing().gather_layers(self, indices, params)
        rows = row_lookup(self, indices, params)
        if rows is None:
            return NotImplemented
        ids, offset_axis, fill = rows
        n = self.shape[0]
        values = self.dequantize_rows(jnp.clip(ids, 0, n - 1))  # (*ids.shape, d)
        if fill is not None:  # FILL_OR_DROP: rows out of range read as the fill value
            inside = (ids >= 0) & (ids < n)
            values = jnp.where(inside[..., None], values, jnp.asarray(fill, values.dtype))
        return jnp.moveaxis(values, -1, offset_axis)

    def dequantize_rows(self, ids: jax.Array) -> jax.Array:
        """Rows ``ids`` of the dense 2-D table, with ``materialize``'s arithmetic."""
        raise NotImplementedError


@register_leaf(kind="nf4", aliases=("NF4Weight",))
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
    def stack_ndim(self) -> int:
        return self.codes.ndim - 1

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def n(self) -> int:
        return math.prod(self.layer_shape)

    def field_axes(self, axes):
        """The flat codes and block scales are cut along their one axis, in the order of
        the PyTorch layout (output axes first): a contiguous slice of them is whole blocks
        of whole rows, so every mesh axis that shards the dense weight shards them too."""
        ns = self.stack_ndim
        stack, layer = tuple(axes[:ns]), list(axes[ns:])
        if len(layer) == 2:
            layer.reverse()
        flat = tuple(layer)
        out = {"codes": (*stack, flat), "absmax": (*stack, flat), "offset": stack}
        if self.absmax2 is not None:
            out["absmax2"] = (*stack, flat)
        if self.offset is None:
            del out["offset"]
        return out

    def block_absmax(self) -> jax.Array:
        """The float32 absmax of every block (decoding the double quantization)."""
        if not self.double_quant:
            return self.absmax
        code2 = jnp.asarray(DYNAMIC_MAP)[self.absmax.astype(jnp.int32)]
        scale2 = jnp.repeat(self.absmax2, NESTED_BLOCK, axis=-1)[..., : self.absmax.shape[-1]]
        return code2 * scale2 + self.offset[..., None]

    def unpacked_codes(self) -> jax.Array:
        """uint8 codes, one per value, ``(*stack, n)``."""
        q = jnp.stack([self.codes >> 4, self.codes & 15], axis=-1)
        return q.reshape(q.shape[:-2] + (-1,))[..., : self.n]

    def dequantize_rows(self, ids: jax.Array) -> jax.Array:
        rows, d = self.layer_shape
        # element (v, j) of the Flax table is at j * rows + v in the PyTorch order
        cols = jnp.arange(d, dtype=jnp.int32).reshape((1,) * ids.ndim + (d,))
        flat = cols * rows + ids[..., None].astype(jnp.int32)
        byte = self.codes[flat // 2]
        code = jnp.where(flat % 2 == 0, byte >> 4, byte & 15)
        top = _finite_max(self.compute_dtype)
        scale = jnp.clip(self.block_absmax(), -top, top)[flat // self.block_size]
        values = jnp.asarray(NF4_CODE)[code.astype(jnp.int32)] * scale
        return values.astype(self.compute_dtype).astype(self.dtype)

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
        values = values[..., : self.n].astype(self.compute_dtype)
        return _from_torch_order(values, self.layer_shape).astype(self.dtype)

    # ----- structural ops (lorax/quant/slicing.py): whole layers of a stack and block
    # aligned runs of the flat order stay NF4; any other part is decoded alone -------------
    def slice(self, start_indices, limit_indices, strides):
        return _slicing().nf4_slice(self, start_indices, limit_indices, strides)

    def dynamic_slice(self, start_indices, slice_sizes):
        return _slicing().nf4_dynamic_slice(self, start_indices, slice_sizes)

    def squeeze(self, dimensions):
        return _slicing().nf4_squeeze(self, dimensions)

    def expand_dims(self, dimensions):
        return _slicing().nf4_expand_dims(self, dimensions)

    def concatenate(self, operands, dimension):
        return _slicing().nf4_concatenate(operands, dimension)


@register_leaf(kind="int8", aliases=("Int8Weight",))
class Int8Weight(QuantizedLeaf):
    """A frozen weight stored as int8 with one float32 absmax scale per output channel."""

    codes: Any
    scale: Any
    compute_dtype: str = static_field(default="bfloat16")
    cast_to: str | None = static_field(default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def stack_ndim(self) -> int:
        """Leading axes where the per-channel scale is as long as the codes (a layer stack:
        the input axes, reduced for the scale, come next)."""
        n = 0
        for c, s in zip(self.codes.shape[:-2], self.scale.shape, strict=False):
            if c != s:
                break
            n += 1
        return n

    def field_axes(self, axes):
        scale = tuple(
            a if s == c else None
            for a, s, c in zip(axes, self.scale.shape, self.codes.shape, strict=True)
        )
        return {"codes": tuple(axes), "scale": scale}

    def dequantize_rows(self, ids: jax.Array) -> jax.Array:
        top = _finite_max(self.compute_dtype)
        if self.scale.shape[0] == 1:  # one scale per column (per output channel)
            scale = self.scale.reshape((1,) * ids.ndim + self.scale.shape[-1:])
        else:  # one scale per row: a table quantized along the other axis
            scale = self.scale[ids]
        values = jnp.clip(self.codes[ids].astype(jnp.float32) * scale, -top, top)
        return values.astype(self.compute_dtype).astype(self.dtype)

    def materialize(self) -> jax.Array:
        top = _finite_max(self.compute_dtype)
        values = jnp.clip(self.codes.astype(jnp.float32) * self.scale, -top, top)
        return values.astype(self.compute_dtype).astype(self.dtype)

    # ----- structural ops (lorax/quant/slicing.py): the codes and, where it is as long as
    # an axis, the scale take the op; a part stays int8 ----------------------------------
    def slice(self, start_indices, limit_indices, strides):
        return _slicing().int8_slice(self, start_indices, limit_indices, strides)

    def dynamic_slice(self, start_indices, slice_sizes):
        return _slicing().int8_dynamic_slice(self, start_indices, slice_sizes)

    def squeeze(self, dimensions):
        return _slicing().int8_squeeze(self, dimensions)

    def expand_dims(self, dimensions):
        return _slicing().int8_expand_dims(self, dimensions)

    def concatenate(self, operands, dimension):
        return _slicing().int8_concatenate(operands, dimension)


def _dequantized_apply(leaf: LoraxLeaf, other: jax.Array, leaf_is_lhs: bool, bind) -> jax.Array:
    """Dequantizes inside a checkpoint with the product, so only the quantized arrays are
    kept for the backward pass, which dequantizes again: one dense layer at a time."""

    def product(other, leaf):
        w = leaf.materialize().astype(other.dtype)
        return bind(w, other) if leaf_is_lhs else bind(other, w)

    return jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)(other, leaf)


def _dequantized_ragged(leaf: LoraxLeaf, lhs: jax.Array, group_sizes: jax.Array, bind) -> jax.Array:
    """``_dequantized_apply`` for ``ragged_dot_general``: the expert weights of every group
    are dequantized inside the checkpoint, in the dtype the equation was traced with."""

    def product(lhs, group_sizes, leaf):
        return bind(lhs, leaf.materialize(), group_sizes)

    return jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)(
        lhs, group_sizes, leaf
    )


@register_leaf(kind="transposed")
class Transposed(LoraxLeaf):
    """A lazy ``jnp.transpose(inner, perm)`` of a frozen quantized leaf, made by the
    interpreter (never stored): a product with it dequantizes and transposes next to the
    use, inside the same checkpoint as a product with the leaf itself."""

    inner: Any
    perm: tuple[int, ...] = static_field(default=())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.inner.shape[p] for p in self.perm)

    @property
    def dtype(self) -> Any:
        return self.inner.dtype

    def materialize(self) -> jax.Array:
        return jnp.transpose(self.inner.materialize(), self.perm)

    def transpose(self, permutation):
        perm = tuple(self.perm[int(p)] for p in permutation)
        return self.inner if perm == tuple(range(len(perm))) else Transposed(self.inner, perm)

    def astype(self, dtype):
        inner = self.inner.astype(dtype)
        return NotImplemented if inner is NotImplemented else Transposed(inner, self.perm)

    # parts of the view: the inner leaf's part, viewed transposed again (lorax/quant/slicing)
    def slice(self, start_indices, limit_indices, strides):
        return _slicing().transposed_slice(self, start_indices, limit_indices, strides)

    def dynamic_slice(self, start_indices, slice_sizes):
        return _slicing().transposed_dynamic_slice(self, start_indices, slice_sizes)

    def squeeze(self, dimensions):
        return _slicing().transposed_squeeze(self, dimensions)

    # the equation's own product with the transposed dequantized weight, dequantized next
    # to the use as for the quantized leaf itself
    dot_general = QuantizedLeaf.dot_general
    ragged_dot_general = QuantizedLeaf.ragged_dot_general
