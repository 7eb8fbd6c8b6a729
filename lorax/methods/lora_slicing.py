"""Structural primitives on LoRA leaves: a slice, an index, a squeeze, a new size-1 axis, a
split or a concatenation of LoRA weights is again a :class:`~lorax.LoraWeight`, never the
dense weight.

A LoRA leaf's dense axes are ``(*stack, *in, *out)`` with ``a: (*stack, *in, r)`` and
``b: (*stack, r, *out)``. Each dense axis lives in one factor (a stack axis in both), so an
op along it acts on that factor alone, and on the base:

==================  ==================================================================
``slice``,          along an output axis B is sliced, along an input axis A, along a
``dynamic_slice``,  stack axis both (``w[k]`` is a slice and a squeeze; ``params[i]``
``split``, gather   with a traced ``i`` a ``dynamic_slice`` and a squeeze)
``squeeze``         the size-1 axis leaves the factor(s) holding it; the last input or
                    output axis cannot go (a group needs an axis): ``NotImplemented``
``expand_dims``     new axes before the input axes join the stack, new axes up to the
                    end of the input axes join them, later ones join the output axes
``concatenate``     along an output axis: A's side by side over the rank, B
                    block-diagonal; along an input axis: A block-diagonal, B's over the
                    rank; along a stack axis: both, zero-padded to the largest rank.
                    Plain arrays and frozen leaves join as rank 0; differing scales are
                    folded into B; differing dropout rates: ``NotImplemented``
==================  ==================================================================

The base takes the same op: an array directly, a frozen leaf (NF4, int8) through its own
method, which keeps it quantized where its layout allows or decodes only the part taken.
A base leaf that answers ``NotImplemented`` makes the op ``NotImplemented`` (the
interpreter then densifies with a warning): the base is never silently dequantized whole.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import jax.numpy as jnp
from jax import lax

from lorax.leaf import Array, Bind, LoraxLeaf, fills, is_lorax_leaf, layer_gather

if TYPE_CHECKING:
    from lorax.methods.lora import LoraWeight

T = TypeVar("T")


def _on_base(
    leaf: LoraWeight, on_array: Callable[[Array], Any], on_leaf: Callable[[LoraxLeaf], Any]
) -> Any:
    """The op on the base: ``on_array`` for an array, ``on_leaf`` for a frozen leaf, whose
    ``NotImplemented`` is passed on (unlike ``OverBase.base_apply``, which would decode the
    whole base to slice a part of it)."""
    base = leaf.base
    return on_leaf(base) if is_lorax_leaf(base) else on_array(base)


def _a_axes(leaf: LoraWeight, per_axis: Sequence[T], rank_entry: T) -> list[T]:
    """Per-dense-axis values carried over to A's axes ``(*stack, *in, r)``."""
    ns, ni = leaf.stack_ndim, leaf.in_ndim
    return [*per_axis[: ns + ni], rank_entry]


def _b_axes(leaf: LoraWeight, per_axis: Sequence[T], rank_entry: T) -> list[T]:
    """Per-dense-axis values carried over to B's axes ``(*stack, r, *out)``."""
    ns, ni = leaf.stack_ndim, leaf.in_ndim
    return [*per_axis[:ns], rank_entry, *per_axis[ns + ni :]]


def slice_lora(
    leaf: LoraWeight,
    start_indices: Sequence[int],
    limit_indices: Sequence[int],
    strides: Sequence[int] | None,
) -> Any:
    """``lax.slice`` of the dense weight: the factors and the base sliced along their axes."""
    start = tuple(int(s) for s in start_indices)
    limit = tuple(int(s) for s in limit_indices)
    step = (1,) * len(start) if strides is None else tuple(int(s) for s in strides)
    base = _on_base(
        leaf,
        lambda w: lax.slice(w, start, limit, step),
        lambda b: b.slice(start, limit, step),
    )
    if base is NotImplemented:
        return NotImplemented
    r = leaf.rank
    a = lax.slice(leaf.a, _a_axes(leaf, start, 0), _a_axes(leaf, limit, r), _a_axes(leaf, step, 1))
    b = lax.slice(leaf.b, _b_axes(leaf, start, 0), _b_axes(leaf, limit, r), _b_axes(leaf, step, 1))
    return leaf.replace(base=base, a=a, b=b)


def dynamic_slice_lora(
    leaf: LoraWeight, start_indices: Sequence[Any], slice_sizes: Sequence[int]
) -> Any:
    """``lax.dynamic_slice`` (``params[i]`` with a traced ``i``): every axis is clamped
    on its own, so slicing each factor with the starts of its axes is the same slice."""
    starts = list(start_indices)
    sizes = tuple(int(s) for s in slice_sizes)
    base = _on_base(
        leaf,
        lambda w: lax.dynamic_slice(w, starts, sizes),
        lambda b: b.dynamic_slice(starts, sizes),
    )
    if base is NotImplemented:
        return NotImplemented
    r = leaf.rank
    a = lax.dynamic_slice(leaf.a, _a_axes(leaf, starts, 0), _a_axes(leaf, sizes, r))
    b = lax.dynamic_slice(leaf.b, _b_axes(leaf, starts, 0), _b_axes(leaf, sizes, r))
    return leaf.replace(base=base, a=a, b=b)


def squeeze_lora(leaf: LoraWeight, dimensions: Sequence[int]) -> Any:
    """``lax.squeeze``: a size-1 stack axis leaves both factors, an input axis A, an output
    axis B. Squeezing every input (or output) axis leaves no low-rank form."""
    nd, ns, ni = len(leaf.shape), leaf.stack_ndim, leaf.in_ndim
    dims = sorted({int(d) % nd for d in dimensions})
    stack = [d for d in dims if d < ns]
    ins = [d for d in dims if ns <= d < ns + ni]
    outs = [d for d in dims if d >= ns + ni]
    if len(ins) == ni or len(outs) == nd - ns - ni:
        return NotImplemented
    base = _on_base(leaf, lambda w: lax.squeeze(w, dims), lambda b: b.squeeze(tuple(dims)))
    if base is NotImplemented:
        return NotImplemented
    a = lax.squeeze(leaf.a, stack + ins)
    b = lax.squeeze(leaf.b, stack + [d - ni + 1 for d in outs])  # B's axis of dense axis d
    return leaf.replace(base=base, a=a, b=b)


def expand_dims_lora(leaf: LoraWeight, dimensions: Sequence[int]) -> Any:
    """New size-1 axes at ``dimensions`` (positions in the result): those before the first
    input axis join the stack, those up to the end of the input axes the input group, the
    rest the output group. Every placement is a valid leaf; these keep B untouched for
    new input axes and the base's layers as they are for new leading axes."""
    nd, ns, ni = len(leaf.shape), leaf.stack_ndim, leaf.in_ndim
    out_nd = nd + len(dimensions)
    new = sorted({int(d) % out_nd for d in dimensions})
    groups, seen = [], 0  # group of each result axis; seen: operand axes so far
    for p in range(out_nd):
        if p in new:
            groups.append("s" if seen <= ns else "i" if seen <= ns + ni else "o")
        else:
            groups.append("s" if seen < ns else "i" if seen < ns + ni else "o")
            seen += 1
    ns2, ni2 = groups.count("s"), groups.count("i")
    base = _on_base(leaf, lambda w: lax.expand_dims(w, new), lambda b: b.expand_dims(tuple(new)))
    if base is NotImplemented:
        return NotImplemented
    a = lax.expand_dims(leaf.a, [p for p in new if p < ns2 + ni2])
    # B's axes are (*stack, r, *out): a new output axis at p is B's axis p - ni2 + 1
    b_new = [p if p < ns2 else p - ni2 + 1 for p in new if not ns2 <= p < ns2 + ni2]
    b = lax.expand_dims(leaf.b, b_new)
    return leaf.replace(base=base, a=a, b=b)


def concatenate_lora(leaf: LoraWeight, operands: Sequence[Any], dimension: int) -> Any:
    """``lax.concatenate`` of LoRA leaves, arrays and frozen leaves (``leaf`` is one of the
    operands): one LoRA leaf whose rank is the sum of the ranks (along a stack axis: the
    largest rank). Arrays and frozen leaves add to the base only (rank 0)."""
    cls = type(leaf)
    ns, ni = leaf.stack_ndim, leaf.in_ndim
    d = int(dimension) % len(leaf.shape)
    loras = [op for op in operands if isinstance(op, cls)]
    for op in operands:
        if isinstance(op, cls):
            if (op.stack_ndim, op.in_ndim) != (ns, ni):  # other groups: no common layout
                return NotImplemented
        elif is_lorax_leaf(op) and op.trainable_fields:  # another adapter (DoRA, IA3, ...)
            return NotImplemented
    if len({op.dropout for op in loras}) > 1:  # one rate per leaf
        return NotImplemented

    bases = [op.base if isinstance(op, cls) else op for op in operands]
    frozen = [b for b in bases if is_lorax_leaf(b)]
    base = frozen[0].concatenate(bases, d) if frozen else lax.concatenate(bases, d)
    if base is NotImplemented:
        return NotImplemented

    dtype = functools.reduce(jnp.promote_types, [x.dtype for op in loras for x in (op.a, op.b)])
    same_scale = len({op.scale for op in loras}) == 1

    def factors(op: Any) -> tuple[Array, Array] | None:
        """The operand's factors in the common dtype, its scale folded into B unless all
        scales agree; None for an operand of rank 0 (an array or a frozen leaf)."""
        if not isinstance(op, cls):
            return None
        b = op.b if same_scale else op.b * jnp.asarray(op.scale, op.b.dtype)
        return op.a.astype(dtype), b.astype(dtype)

    shapes = [tuple(op.shape) for op in operands]
    pairs = [factors(op) for op in operands]
    if d < ns:  # layers side by side: both factors, every operand at the largest rank
        rank = max(op.rank for op in loras)
        a_parts, b_parts = [], []
        for shape, pair in zip(shapes, pairs, strict=True):
            if pair is None:
                a_parts.append(jnp.zeros((*shape[: ns + ni], rank), dtype))
                b_parts.append(jnp.zeros((*shape[:ns], rank, *shape[ns + ni :]), dtype))
                continue
            a, b = pair
            pad = rank - a.shape[-1]  # zero rank components add nothing
            a_parts.append(jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
            b_parts.append(jnp.pad(b, [(0, 0)] * ns + [(0, pad)] + [(0, 0)] * (b.ndim - ns - 1)))
        return leaf.replace(
            base=base, a=jnp.concatenate(a_parts, d), b=jnp.concatenate(b_parts, d), **_scale(loras)
        )

    # An input (output) axis: each operand's A (B) reads (writes) only its own block of the
    # axis, so it is zero-padded to the whole axis and the factors are stacked over the rank.
    total = sum(shape[d] for shape in shapes)
    a_parts, b_parts, offset = [], [], 0
    for shape, pair in zip(shapes, pairs, strict=True):
        if pair is not None:
            a, b = pair
            block = [(offset, total - offset - shape[d])]
            if d < ns + ni:
                a = jnp.pad(a, [(0, 0)] * d + block + [(0, 0)] * (a.ndim - d - 1))
            else:
                q = d - ni + 1  # B's axis of dense axis d
                b = jnp.pad(b, [(0, 0)] * q + block + [(0, 0)] * (b.ndim - q - 1))
            a_parts.append(a)
            b_parts.append(b)
        offset += shape[d]
    return leaf.replace(
        base=base,
        a=jnp.concatenate(a_parts, a_parts[0].ndim - 1),
        b=jnp.concatenate(b_parts, ns),
        **_scale(loras),
    )


def _scale(loras: Sequence[LoraWeight]) -> dict[str, float]:
    """The merged leaf's scale: the common one, or 1 when each was folded into its B."""
    scales = {op.scale for op in loras}
    return {"scale": loras[0].scale if len(scales) == 1 else 1.0}


def gather_stack(leaf: LoraWeight, indices: Array, *, params: Mapping[str, Any], bind: Bind) -> Any:
    """A gather that picks whole layers of a stack (``jnp.take(params, i, axis=0)``,
    ``params[ids]``): the same gather on both factors and the base gives a LoRA leaf
    whose stack axes are the gather's leading result axes. Any other gather of a stacked
    leaf is ``NotImplemented``.

    Out-of-range indices under ``FILL_OR_DROP`` read the fill value, as the dense gather:
    the base is filled with it and the factors with zeros (the update is zero there).
    """
    take = layer_gather(leaf.shape, leaf.stack_ndim, indices, params)
    if take is None:
        return NotImplemented
    base = _on_base(
        leaf,
        lambda w: bind(w, indices),
        lambda b: b.gather(indices, params=params, bind=bind),
    )
    if base is NotImplemented:
        return NotImplemented
    fill = 0 if fills(params) else None
    return leaf.replace(base=base, a=take(leaf.a, fill), b=take(leaf.b, fill))
