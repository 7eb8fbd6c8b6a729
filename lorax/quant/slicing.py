"""Structural primitives on quantized frozen leaves: parts of an NF4 or int8 weight (a layer
of a stack, ``w[k]``, a piece of a fused projection) stay quantized where the layout allows,
and otherwise only the values taken are decoded, never the whole weight.

NF4 (see ``formats.py``) quantizes each layer of a stack on its own, in a flat order: a 2-D
layer transposed (PyTorch's ``[out, in]``), other layers row-major. Hence:

* stack axes: every field is cut along them; each layer is untouched;
* the major axis of that flat order (a 2-D layer's output axis, else its first axis): a
  slice that starts (and ends, unless at the end) on a block boundary is a contiguous run of
  whole blocks: codes and block scales are cut (double-quantized scales are decoded to
  float32 unless the run starts on a block of the second level);
* any other part: the values in it are decoded (:func:`nf4_dequantize_at`);
* size-1 axes (``squeeze`` / ``expand_dims``) keep the codes when the flat order of the
  other axes is the one of the new layer shape, or the reverse of it (then the result is a
  :class:`~lorax.quant.formats.Transposed` view, e.g. ``w[k]`` of a 3-D kernel).

int8 weights hold the codes in the dense shape and a scale that is either as long as an
axis or 1 (reduced), so every op applies to the codes and, where it is as long, the scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lorax.leaf import fills, is_lorax_leaf, layer_gather
from lorax.quant.formats import NESTED_BLOCK, NF4_CODE, NF4Weight, Transposed, _finite_max


def flat_strides(layer_shape: Sequence[int]) -> tuple[int, ...]:
    """The stride of each layer axis in NF4's flat order (2-D: transposed; else row-major)."""
    shape = tuple(int(s) for s in layer_shape)
    if len(shape) == 2:
        return (1, shape[0])
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))


def _static_ints(xs: Sequence[Any]) -> list[int] | None:
    """``xs`` as ints when all are known while tracing (literal start indices), else None."""
    out = []
    for x in xs:
        if not isinstance(x, (int, np.integer, np.ndarray)) or np.ndim(x) != 0:
            return None
        out.append(int(x))
    return out


def _nf4_fields(leaf: Any, fn: Callable[[jax.Array, int], jax.Array]) -> Any:
    """``fn(field, trailing)`` on every array field of an NF4 leaf; they all lead with the
    stack axes, followed by ``trailing`` axes of their own (1, none for ``offset``)."""
    changes = {"codes": fn(leaf.codes, 1), "absmax": fn(leaf.absmax, 1)}
    if leaf.absmax2 is not None:
        changes["absmax2"] = fn(leaf.absmax2, 1)
    if leaf.offset is not None:
        changes["offset"] = fn(leaf.offset, 0)
    return leaf.replace(**changes)


def nf4_dequantize_at(leaf: Any, index: Sequence[Any]) -> jax.Array:
    """The dense values of the open grid ``index`` (one int vector per layer axis) in every
    layer: ``(*stack, *map(len, index))``, with ``materialize``'s arithmetic, decoding only
    those values (rows of a table, a layer's piece, an element)."""
    ns = leaf.stack_ndim
    k = len(index)
    flat = jnp.zeros((1,) * k, jnp.int32)
    for ax, (ix, stride) in enumerate(zip(index, flat_strides(leaf.layer_shape), strict=True)):
        grid = [1] * k
        grid[ax] = -1
        flat = flat + jnp.asarray(ix, jnp.int32).reshape(grid) * stride
    byte = leaf.codes[..., flat // 2]  # (*stack, *grid)
    high = (flat % 2 == 0).reshape((1,) * ns + flat.shape)  # the high nibble comes first
    code = jnp.where(high, byte >> 4, byte & 15)
    top = _finite_max(leaf.compute_dtype)
    scale = jnp.clip(leaf.block_absmax(), -top, top)[..., flat // leaf.block_size]
    values = jnp.asarray(NF4_CODE)[code.astype(jnp.int32)] * scale
    return values.astype(leaf.compute_dtype).astype(leaf.dtype)


def _nf4_major_run(leaf: Any, layer: Sequence[tuple[int, int, int]]) -> Any:
    """The NF4 leaf of a slice ``layer`` ((start, limit, stride) per layer axis) that cuts
    only the major axis of the flat order, on block boundaries; else None."""
    shape = tuple(leaf.layer_shape)
    if not shape:
        return None
    major = 1 if len(shape) == 2 else 0
    for ax, (start, limit, step) in enumerate(layer):
        if ax != major and (start, limit, step) != (0, shape[ax], 1):
            return None
    start, limit, step = layer[major]
    if step != 1 or limit <= start:
        return None
    inner = flat_strides(shape)[major]  # values per index of the major axis
    begin, end, bs = start * inner, limit * inner, leaf.block_size
    if begin % bs or (end % bs and end != leaf.n):
        return None
    first, last = begin // bs, -(-end // bs)
    if not leaf.double_quant:
        absmax, absmax2, offset = leaf.absmax[..., first:last], None, None
    elif first % NESTED_BLOCK == 0:  # whole second-level blocks: the codes stay as they are
        absmax, offset = leaf.absmax[..., first:last], leaf.offset
        absmax2 = leaf.absmax2[..., first // NESTED_BLOCK : -(-last // NESTED_BLOCK)]
    else:  # the run starts inside a second-level block: decode its scales (exactly)
        absmax, absmax2, offset = leaf.block_absmax()[..., first:last], None, None
    new_shape = list(shape)
    new_shape[major] = limit - start
    return leaf.replace(
        codes=leaf.codes[..., begin // 2 : (end + 1) // 2],  # begin, and end if not last, even
        absmax=absmax,
        absmax2=absmax2,
        offset=offset,
        layer_shape=tuple(new_shape),
    )


def nf4_slice(
    leaf: Any, start: Sequence[int], limit: Sequence[int], strides: Sequence[int] | None
) -> Any:
    """``lax.slice`` of an NF4 weight: an NF4 leaf when the part is whole layers or a block
    aligned run of them, else the decoded values of the part alone (an array)."""
    nd, ns = len(leaf.shape), leaf.stack_ndim
    step = (1,) * nd if strides is None else tuple(int(s) for s in strides)
    start, limit = tuple(int(s) for s in start), tuple(int(s) for s in limit)
    out = leaf
    if (start[:ns], limit[:ns], step[:ns]) != ((0,) * ns, tuple(leaf.shape[:ns]), (1,) * ns):
        out = _nf4_fields(
            leaf,
            lambda x, t: lax.slice(
                x, (*start[:ns], *(0,) * t), (*limit[:ns], *x.shape[ns:]), (*step[:ns], *(1,) * t)
            ),
        )
    layer = list(zip(start[ns:], limit[ns:], step[ns:], strict=True))
    if all(part == (0, size, 1) for part, size in zip(layer, leaf.layer_shape, strict=True)):
        return out
    run = _nf4_major_run(out, layer)
    if run is not None:
        return run
    return nf4_dequantize_at(out, [np.arange(s, e, st) for s, e, st in layer])


def nf4_dynamic_slice(leaf: Any, starts: Sequence[Any], sizes: Sequence[int]) -> Any:
    """``lax.dynamic_slice``: stack axes are cut at traced starts (the layers stay NF4); the
    layer axes as :func:`nf4_slice` when their starts are known, else decoded."""
    ns = leaf.stack_ndim
    sizes = tuple(int(s) for s in sizes)
    shape = tuple(leaf.shape)
    out = leaf
    if sizes[:ns] != shape[:ns]:  # a full-size slice starts at 0 whatever the start says
        out = _nf4_fields(
            leaf,
            lambda x, t: lax.dynamic_slice(
                x, [*starts[:ns], *[0] * t], (*sizes[:ns], *x.shape[ns:])
            ),
        )
    if sizes[ns:] == shape[ns:]:
        return out
    known = _static_ints(starts[ns:])
    if known is not None:  # clamped as dynamic_slice clamps
        limits = zip(known, shape[ns:], sizes[ns:], strict=True)
        begin = [min(max(s, 0), n - z) for s, n, z in limits]
        end = [b + z for b, z in zip(begin, sizes[ns:], strict=True)]
        return nf4_slice(out, (0,) * ns + tuple(begin), (*out.shape[:ns], *end), None)
    index = [
        jnp.clip(jnp.asarray(s, jnp.int32), 0, n - z) + jnp.arange(z, dtype=jnp.int32)
        for s, n, z in zip(starts[ns:], shape[ns:], sizes[ns:], strict=True)
    ]
    return nf4_dequantize_at(out, index)


def _relayout(leaf: Any, new_shape: tuple[int, ...], strides: dict[int, int]) -> Any:
    """The same codes as an NF4 leaf of layer shape ``new_shape``, when the flat ``strides``
    the values have (per axis of ``new_shape`` longer than 1) are those of its flat order;
    or as the ``Transposed`` view of the reversed shape, when they are those of the reversed
    shape (a 3-D layer squeezed to 2-D: row-major, where 2-D layers are stored transposed);
    else NotImplemented."""
    natural = flat_strides(new_shape)
    if all(natural[j] == s for j, s in strides.items()):
        return leaf.replace(layer_shape=new_shape)
    k, ns = len(new_shape), leaf.stack_ndim
    reverse = flat_strides(new_shape[::-1])  # inner axis k - 1 - j is axis j of the result
    if all(reverse[k - 1 - j] == s for j, s in strides.items()):
        perm = (*range(ns), *(ns + k - 1 - j for j in range(k)))
        return Transposed(leaf.replace(layer_shape=new_shape[::-1]), perm)
    return NotImplemented


def nf4_squeeze(leaf: Any, dimensions: Sequence[int]) -> Any:
    """``lax.squeeze`` of an NF4 weight: the same codes (see :func:`_relayout`)."""
    nd, ns = len(leaf.shape), leaf.stack_ndim
    dims = sorted({int(d) % nd for d in dimensions})
    stack = [d for d in dims if d < ns]
    out = _nf4_fields(leaf, lambda x, t: lax.squeeze(x, stack)) if stack else leaf
    gone = {d - ns for d in dims if d >= ns}
    if not gone:
        return out
    shape = tuple(leaf.layer_shape)
    kept = [ax for ax in range(len(shape)) if ax not in gone]
    old = flat_strides(shape)
    strides = {j: old[ax] for j, ax in enumerate(kept) if shape[ax] > 1}
    return _relayout(out, tuple(shape[ax] for ax in kept), strides)


def nf4_expand_dims(leaf: Any, dimensions: Sequence[int]) -> Any:
    """New size-1 axes at ``dimensions`` (positions in the result) of an NF4 weight: the
    same codes (see :func:`_relayout`). New axes before the first layer axis join the
    stack, so new leading axes are always possible."""
    nd, ns = len(leaf.shape), leaf.stack_ndim
    out_nd = nd + len(dimensions)
    new = sorted({int(d) % out_nd for d in dimensions})
    kept = [p for p in range(out_nd) if p not in new]
    first_layer = kept[ns] if ns < nd else out_nd
    stack_new = [p for p in new if p < first_layer]
    out = _nf4_fields(leaf, lambda x, t: lax.expand_dims(x, stack_new)) if stack_new else leaf
    if len(stack_new) == len(new):
        return out
    ns2 = ns + len(stack_new)
    shape = tuple(leaf.layer_shape)
    new_shape = [1] * (out_nd - ns2)
    strides: dict[int, int] = {}
    old = flat_strides(shape)
    for ax, size in enumerate(shape):
        j = kept[ns + ax] - ns2
        new_shape[j] = size
        if size > 1:
            strides[j] = old[ax]
    return _relayout(out, tuple(new_shape), strides)


def nf4_concatenate(operands: Sequence[Any], dimension: int) -> Any:
    """NF4 leaves concatenated along a stack axis, or along the major axis of the flat
    order when every operand but the last is whole blocks; else NotImplemented (a mix with
    other operands, other options, or a layout the codes cannot follow)."""
    first = operands[0]
    if any(type(op) is not type(first) for op in operands):
        return NotImplemented
    statics = {
        (op.block_size, op.compute_dtype, op.cast_to, op.stack_ndim, len(op.layer_shape))
        for op in operands
    }
    if len(statics) != 1:
        return NotImplemented
    ns, d = first.stack_ndim, int(dimension) % len(first.shape)
    plain = not any(op.double_quant for op in operands)
    if d < ns:
        if plain or all(op.double_quant for op in operands):
            fields = [
                n for n in ("codes", "absmax", "absmax2", "offset") if getattr(first, n) is not None
            ]
            return first.replace(
                **{n: jnp.concatenate([getattr(op, n) for op in operands], d) for n in fields}
            )
        scales = [op.block_absmax() for op in operands]  # mixed: decode the scales
        return first.replace(
            codes=jnp.concatenate([op.codes for op in operands], d),
            absmax=jnp.concatenate(scales, d),
            absmax2=None,
            offset=None,
        )
    shape = tuple(first.layer_shape)
    major = 1 if len(shape) == 2 else 0
    if d - ns != major or any(op.n % op.block_size for op in operands[:-1]):
        return NotImplemented
    new_shape = list(shape)
    new_shape[major] = sum(op.layer_shape[major] for op in operands)
    # each layer's second-level scales and offset are its own: decode them when present
    scales = [op.absmax if plain else op.block_absmax() for op in operands]
    return first.replace(
        codes=jnp.concatenate([op.codes for op in operands], -1),
        absmax=jnp.concatenate(scales, -1),
        absmax2=None,
        offset=None,
        layer_shape=tuple(new_shape),
    )


def gather_layers(leaf: Any, indices: jax.Array, params: Mapping[str, Any]) -> Any:
    """Whole layers picked from a quantized stack (``params[ids]``, ``jnp.take``): every
    field gathered along the stack axes, so the layers stay quantized.

    Under ``FILL_OR_DROP`` (``jnp.take``'s default) a quantized layer cannot read as the fill
    value: the picked layers (indices clamped) are dequantized, which is the array the dense
    gather returns (e.g. one expert weight per token of a gather-routed MoE), and
    out-of-range picks read the fill value; never the whole stack."""
    take = layer_gather(leaf.shape, leaf.stack_ndim, indices, params)
    if take is None:
        return NotImplemented
    if not fills(params):
        return _take_fields(leaf, take)
    n_idx = indices.shape[-1]
    dnums = params["dimension_numbers"]
    out_nd = indices.ndim - 1 + len(dnums.offset_dims)
    if tuple(dnums.start_index_map) != tuple(range(n_idx)) or tuple(dnums.offset_dims) != tuple(
        range(indices.ndim - 1, out_nd)
    ):
        return NotImplemented  # picks laid out otherwise: the dense fallback
    sizes = jnp.asarray(leaf.shape[:n_idx], indices.dtype).reshape(
        (1,) * (indices.ndim - 1) + (-1,)
    )
    inside = jnp.all((indices >= 0) & (indices < sizes), axis=-1)
    clamped = jnp.clip(indices, 0, sizes - 1)  # all in range: no fill applies
    take_clamped = layer_gather(leaf.shape, leaf.stack_ndim, clamped, params)
    assert take_clamped is not None  # the same gather, other index values
    layers = _take_fields(leaf, take_clamped).materialize()
    fill = params.get("fill_value")
    fill = jnp.nan if fill is None else fill
    inside = inside.reshape(inside.shape + (1,) * (layers.ndim - inside.ndim))
    return jnp.where(inside, layers, jnp.asarray(fill, layers.dtype))


def _take_fields(leaf: Any, take: Callable[[jax.Array, Any], jax.Array]) -> Any:
    """``take`` on every field of a quantized leaf: its layers, still quantized."""
    if isinstance(leaf, NF4Weight):
        return _nf4_fields(leaf, lambda x, t: take(x, None))
    return leaf.replace(codes=take(leaf.codes, None), scale=take(leaf.scale, None))


# ----- int8 ------------------------------------------------------------------------------


def _scale_axes(leaf: Any) -> list[bool]:
    """Per axis, whether the scale runs along it (else it is 1: reduced, broadcast)."""
    return [s != 1 for s in leaf.scale.shape]


def int8_slice(
    leaf: Any, start: Sequence[int], limit: Sequence[int], strides: Sequence[int] | None
) -> Any:
    """``lax.slice`` of an int8 weight: an int8 leaf of the part."""
    step = (1,) * len(start) if strides is None else tuple(int(s) for s in strides)
    start, limit = tuple(int(s) for s in start), tuple(int(s) for s in limit)
    along = _scale_axes(leaf)
    scale = lax.slice(
        leaf.scale,
        tuple(s if a else 0 for s, a in zip(start, along, strict=True)),
        tuple(e if a else 1 for e, a in zip(limit, along, strict=True)),
        tuple(st if a else 1 for st, a in zip(step, along, strict=True)),
    )
    return leaf.replace(codes=lax.slice(leaf.codes, start, limit, step), scale=scale)


def int8_dynamic_slice(leaf: Any, starts: Sequence[Any], sizes: Sequence[int]) -> Any:
    """``lax.dynamic_slice`` of an int8 weight: an int8 leaf of the part."""
    sizes = tuple(int(s) for s in sizes)
    along = _scale_axes(leaf)
    scale = lax.dynamic_slice(
        leaf.scale,
        [s if a else 0 for s, a in zip(starts, along, strict=True)],
        tuple(z if a else 1 for z, a in zip(sizes, along, strict=True)),
    )
    return leaf.replace(codes=lax.dynamic_slice(leaf.codes, list(starts), sizes), scale=scale)


def int8_squeeze(leaf: Any, dimensions: Sequence[int]) -> Any:
    """``lax.squeeze``: the scale is 1 along a size-1 axis too."""
    dims = tuple(sorted({int(d) % leaf.codes.ndim for d in dimensions}))
    return leaf.replace(codes=lax.squeeze(leaf.codes, dims), scale=lax.squeeze(leaf.scale, dims))


def int8_expand_dims(leaf: Any, dimensions: Sequence[int]) -> Any:
    """New size-1 axes at ``dimensions`` in the codes and the scale alike."""
    dims = tuple(dimensions)
    return leaf.replace(
        codes=lax.expand_dims(leaf.codes, dims), scale=lax.expand_dims(leaf.scale, dims)
    )


def int8_concatenate(operands: Sequence[Any], dimension: int) -> Any:
    """int8 leaves concatenated along any axis; a scale reduced along that axis is
    broadcast along it first (the operands' scales differ)."""
    first = operands[0]
    if any(type(op) is not type(first) for op in operands):
        return NotImplemented
    if len({(op.compute_dtype, op.cast_to, op.codes.ndim) for op in operands}) != 1:
        return NotImplemented
    d = int(dimension) % first.codes.ndim
    scales = [op.scale for op in operands]
    if any(s.shape[d] != op.codes.shape[d] for s, op in zip(scales, operands, strict=True)):
        scales = [
            jnp.broadcast_to(s, (*s.shape[:d], op.codes.shape[d], *s.shape[d + 1 :]))
            for s, op in zip(scales, operands, strict=True)
        ]
    return first.replace(
        codes=jnp.concatenate([op.codes for op in operands], d),
        scale=jnp.concatenate(scales, d),
    )


# ----- the transposed view -----------------------------------------------------------------


def _transposed(x: Any, perm: Sequence[int]) -> Any:
    """``x`` (a part computed on the inner leaf) viewed through ``perm`` again."""
    if x is NotImplemented:
        return NotImplemented
    return x.transpose(tuple(perm)) if is_lorax_leaf(x) else jnp.transpose(x, tuple(perm))


def _to_inner(perm: Sequence[int], values: Sequence[Any]) -> list[Any]:
    """Per-axis values of the view, reordered to the inner leaf's axes."""
    out: list[Any] = [None] * len(perm)
    for j, p in enumerate(perm):
        out[p] = values[j]
    return out


def transposed_slice(
    view: Any, start: Sequence[int], limit: Sequence[int], strides: Sequence[int] | None
) -> Any:
    """``lax.slice`` of a transposed view: the inner leaf's slice, transposed."""
    perm = view.perm
    step = (1,) * len(perm) if strides is None else strides
    part = view.inner.slice(
        tuple(_to_inner(perm, start)), tuple(_to_inner(perm, limit)), tuple(_to_inner(perm, step))
    )
    return _transposed(part, perm)


def transposed_dynamic_slice(view: Any, starts: Sequence[Any], sizes: Sequence[int]) -> Any:
    """``lax.dynamic_slice`` of a transposed view: the inner leaf's, transposed."""
    perm = view.perm
    part = view.inner.dynamic_slice(_to_inner(perm, starts), tuple(_to_inner(perm, sizes)))
    return _transposed(part, perm)


def transposed_squeeze(view: Any, dimensions: Sequence[int]) -> Any:
    """``lax.squeeze`` of a transposed view: the inner leaf's, viewed through the
    permutation of the axes that are left."""
    perm = view.perm
    gone = {perm[int(d) % len(perm)] for d in dimensions}
    part = view.inner.squeeze(tuple(sorted(gone)))
    left = [p for p in perm if p not in gone]
    order = sorted(left)
    return _transposed(part, [order.index(p) for p in left])
