"""LoRA (Hu et al. 2021): a frozen base plus a trainable low-rank update, and how it acts
for the dense weight without forming it (``x @ W + s * (x @ A) @ B``), or, for a product
over many tokens, with the merged weight formed for that product (``lora_merged``)."""

from __future__ import annotations

import math
import string
from collections.abc import Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from lorax.leaf import Array, OverBase, materialize, register_leaf, shape_of, static_field, unfit
from lorax.methods import lora_merged, lora_ragged, lora_slicing

_LETTERS = [c for c in string.ascii_letters if c != "r"]


def _prod(sizes: Iterable[int]) -> int:
    return math.prod(int(s) for s in sizes)


@register_leaf(kind="lora", aliases=("LoraWeight",))
class LoraWeight(OverBase):
    """A frozen base ``W`` plus a trainable low-rank update ``scale * A @ B``.

    The dense weight's axes are ``(*stack, *in_axes, *out_axes)``: ``stack`` are leading
    layer axes (``nn.scan`` stacks), ``in_axes`` the axes folded into ``A`` and ``out_axes``
    those folded into ``B``::

        a: (*stack, *in_axes, r)      b: (*stack, r, *out_axes)
        W + scale * einsum(a, b over r)

    The split between the groups is read off the arrays' shapes, so slicing every child along
    a stack axis (as ``lax.scan`` does) yields a valid per-layer leaf.

    Attributes:
      base: the frozen weight, an array or another lorax leaf (e.g. an NF4 base).
      a: the down factor, ``(*stack, *in_axes, r)``.
      b: the up factor, ``(*stack, r, *out_axes)``; zero at init.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA); static.
      dropout: the rate of dropout on the low-rank path's input, active only when
        ``lorax.lora(fn)`` is called with a ``dropout_rng``; static.
    """

    base: Any
    a: Any
    b: Any
    scale: float = static_field(default=1.0)
    dropout: float = static_field(default=0.0)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")
    cast_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    # ----- layout ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim + self.b.ndim - 2 - len(self.shape)

    @property
    def in_ndim(self) -> int:
        return self.a.ndim - 1 - self.stack_ndim

    def misfit(self) -> str | None:
        problem = super().misfit()
        w, a, b = tuple(self.shape), shape_of(self.a), shape_of(self.b)
        if problem or a is None or b is None:
            return problem
        ns = len(a) + len(b) - 2 - len(w)
        ni = len(a) - 1 - ns
        if (
            ns < 0
            or ni < 1
            or len(w) - ns - ni < 1
            or a[:ns] != w[:ns]
            or b[:ns] != w[:ns]
            or a[ns:-1] != w[ns : ns + ni]
            or b[ns + 1 :] != w[ns + ni :]
            or a[-1] != b[ns]
        ):
            return unfit(f"a {a} and b {b}", w)
        return None

    def field_axes(self, axes):
        ns, ni = self.stack_ndim, self.in_ndim
        stack, ins, outs = tuple(axes[:ns]), tuple(axes[ns : ns + ni]), tuple(axes[ns + ni :])
        # A reads the input axes and B writes the output axes; the rank axis is replicated.
        return {"base": tuple(axes), "a": (*stack, *ins, None), "b": (*stack, None, *outs)}

    def _labels(self) -> tuple[list[str], str, str, str]:
        """Einsum labels: W's axes, then A's and B's specs."""
        nd, ns, ni = len(self.shape), self.stack_ndim, self.in_ndim
        w = _LETTERS[:nd]
        a = "".join(w[: ns + ni]) + "r"
        b = "".join(w[:ns]) + "r" + "".join(w[ns + ni :])
        return w, a, b, "".join(w)

    def materialize(self) -> Array:
        base = materialize(self.base)
        _, a_spec, b_spec, w_spec = self._labels()
        acc = jnp.promote_types(base.dtype, jnp.float32)
        delta = jnp.einsum(
            f"{a_spec},{b_spec}->{w_spec}",
            self.a.astype(acc),
            self.b.astype(acc),
            precision=jax.lax.Precision.HIGHEST,
        )
        return (base.astype(acc) + jnp.asarray(self.scale, acc) * delta).astype(base.dtype)

    # ----- primitives -------------------------------------------------------------------
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
        dropout = rng is not None and self.dropout > 0
        if explicit_spec(other) is None and lora_merged.merge_pays(
            self, other, dimension_numbers, leaf_is_lhs, dropout=dropout
        ):
            # Many tokens: one product with W + s A @ B, cheaper than the skinny ones.
            lowrank = lambda leaf, x: _lowrank_dot(  # noqa: E731
                leaf, x, dimension_numbers, leaf_is_lhs, precision, preferred_element_type
            )
            return lora_merged.merged_dot_general(
                self, other, leaf_is_lhs=leaf_is_lhs, bind=bind, lowrank=lowrank
            )
        base_out = self.base_dot(
            other,
            dimension_numbers=dimension_numbers,
            leaf_is_lhs=leaf_is_lhs,
            precision=precision,
            preferred_element_type=preferred_element_type,
            bind=bind,
        )
        if base_out is NotImplemented:
            return NotImplemented
        if rng is not None and dropout:  # inverted dropout on the low-rank input
            keep = jax.random.bernoulli(rng, 1.0 - self.dropout, other.shape)
            other = jnp.where(keep, other / (1.0 - self.dropout), 0).astype(other.dtype)
        low = _lowrank_dot(
            self,
            other,
            dimension_numbers,
            leaf_is_lhs,
            precision,
            preferred_element_type,
            out_spec=explicit_spec(base_out),
        )
        return base_out + low.astype(base_out.dtype)

    def ragged_dot_general(self, lhs, group_sizes, *, params, bind, rng=None):
        """Grouped (mixture-of-experts) products ``ragged_dot(x, W, group_sizes)`` with the
        expert weight unmerged; see ``lorax/methods/lora_ragged.py``."""
        return lora_ragged.ragged_dot_general(
            self, lhs, group_sizes, params=params, bind=bind, rng=rng
        )

    def conv_general_dilated(
        self, lhs, *, dimension_numbers, feature_group_count, batch_group_count, bind
    ):
        nd = len(self.shape)
        out_feature_axis = dimension_numbers.rhs_spec[0]
        if (
            self.stack_ndim
            or self.in_ndim != nd - 1
            or out_feature_axis != nd - 1
            or feature_group_count != 1
            or batch_group_count != 1
        ):
            return NotImplemented
        base_out = self.base_apply(lambda w: bind(lhs, w))
        if base_out is NotImplemented:
            return NotImplemented
        # A is a kernel with r output features: conv to r channels, then mix them with B.
        low = bind(lhs, self.a.astype(lhs.dtype))
        feature_axis = dimension_numbers.out_spec[1]
        low = low * jnp.asarray(self.scale, low.dtype)
        low = jnp.tensordot(low, self.b.astype(low.dtype), axes=([feature_axis], [0]))
        low = jnp.moveaxis(low, -1, feature_axis)
        return base_out + low.astype(base_out.dtype)

    def gather(self, indices, *, params, bind):
        """Row lookups (embeddings): gather rows of the base and of A, then apply B; for a
        stacked leaf, whole layers picked from the stack (``lora_slicing.gather_stack``)."""
        if self.stack_ndim:
            return lora_slicing.gather_stack(self, indices, params=params, bind=bind)
        dnums, slice_sizes = params["dimension_numbers"], tuple(params["slice_sizes"])
        nd, ns, ni = len(self.shape), self.stack_ndim, self.in_ndim
        out_axes = range(ns + ni, nd)
        touched = (
            set(dnums.collapsed_slice_dims)
            | set(dnums.start_index_map)
            | set(getattr(dnums, "operand_batching_dims", ()))
        )
        if ns or touched & set(out_axes) or any(slice_sizes[q] != self.shape[q] for q in out_axes):
            return NotImplemented
        nq = len(out_axes)
        q_out = tuple(dnums.offset_dims[-nq:])
        if q_out != tuple(range(q_out[0], q_out[0] + nq)):
            return NotImplemented
        base_out = self.base_apply(
            lambda w: bind(w, indices),
            lambda leaf: leaf.gather(indices, params=params, bind=bind),  # NF4: rows only
        )
        if base_out is NotImplemented:
            return NotImplemented
        a_dnums = dnums._replace(offset_dims=tuple(dnums.offset_dims[:-nq]) + (q_out[0],))
        rows = jax.lax.gather(
            self.a.astype(base_out.dtype),
            indices,
            a_dnums,
            slice_sizes[:ni] + (self.rank,),
            indices_are_sorted=params.get("indices_are_sorted", False),
            unique_indices=params.get("unique_indices", False),
            mode=params.get("mode"),
            fill_value=params.get("fill_value"),
        )
        rows = rows * jnp.asarray(self.scale, rows.dtype)
        low = jnp.tensordot(rows, self.b.astype(rows.dtype), axes=([q_out[0]], [0]))
        low = jnp.moveaxis(
            low, tuple(range(low.ndim - nq, low.ndim)), tuple(range(q_out[0], q_out[0] + nq))
        )
        return base_out + low.astype(base_out.dtype)

    def transpose(self, permutation):
        perm = [int(p) for p in permutation]
        ns, ni, nd = self.stack_ndim, self.in_ndim, len(self.shape)
        stack, ins, outs = perm[:ns], perm[ns : ns + ni], perm[ns + ni :]
        if sorted(stack) != list(range(ns)):
            return NotImplemented
        in_set, out_set = set(range(ns, ns + ni)), set(range(ns + ni, nd))
        base = self.base_apply(lambda w: jnp.transpose(w, perm), lambda leaf: leaf.transpose(perm))
        if base is NotImplemented:
            return NotImplemented
        # A's axes are (stack, in, r); B's are (stack, r, out).
        a_pos = {ax: i for i, ax in enumerate(range(ns + ni))}
        b_pos = {ax: i + ns + 1 for i, ax in enumerate(range(ns + ni, nd))}
        if set(ins) == in_set and set(perm[ns + ni :]) == out_set:  # axes stay in their group
            a = jnp.transpose(self.a, stack + [a_pos[p] for p in ins] + [ns + ni])
            b = jnp.transpose(self.b, stack + [ns] + [b_pos[p] for p in outs])
            return self.replace(base=base, a=a, b=b)
        no = nd - ns - ni
        new_in, new_out = perm[ns : ns + no], perm[ns + no :]
        if set(new_in) == out_set and set(new_out) == in_set:  # the groups swap: W.T
            a = jnp.transpose(self.b, stack + [b_pos[p] for p in new_in] + [ns])
            b = jnp.transpose(self.a, stack + [ns + ni] + [a_pos[p] for p in new_out])
            return self.replace(base=base, a=a, b=b)
        return NotImplemented

    def reshape(self, new_sizes):
        new_sizes = tuple(int(s) for s in new_sizes)
        ns, ni = self.stack_ndim, self.in_ndim
        if new_sizes[:ns] != self.shape[:ns]:
            return NotImplemented
        in_size = _prod(self.shape[ns : ns + ni])
        for j in range(ns + 1, len(new_sizes)):
            if _prod(new_sizes[ns:j]) == in_size:
                break
        else:
            return NotImplemented
        base = self.base_apply(
            lambda w: jnp.reshape(w, new_sizes), lambda leaf: leaf.reshape(new_sizes)
        )
        if base is NotImplemented:
            return NotImplemented
        a = jnp.reshape(self.a, new_sizes[:j] + (self.rank,))
        b = jnp.reshape(self.b, new_sizes[:ns] + (self.rank,) + new_sizes[j:])
        return self.replace(base=base, a=a, b=b)

    # ----- structural ops: parts and assemblies of LoRA weights stay LoRA weights, see
    # lorax/methods/lora_slicing.py for how each axis group maps onto A and B -------------
    def slice(self, start_indices, limit_indices, strides):
        """``w[k]``, ``w[:, 2:5]``: A, B and the base sliced along the axes they hold."""
        return lora_slicing.slice_lora(self, start_indices, limit_indices, strides)

    def dynamic_slice(self, start_indices, slice_sizes):
        """``params[i]`` with a traced ``i``: the same, at traced starts."""
        return lora_slicing.dynamic_slice_lora(self, start_indices, slice_sizes)

    def squeeze(self, dimensions):
        return lora_slicing.squeeze_lora(self, dimensions)

    def expand_dims(self, dimensions):
        return lora_slicing.expand_dims_lora(self, dimensions)

    def concatenate(self, operands, dimension):
        """One LoRA leaf of summed rank for ``jnp.concatenate([wq, wk, wv], -1)``."""
        return lora_slicing.concatenate_lora(self, operands, dimension)


def explicit_spec(x: Array) -> Any:
    """The ``PartitionSpec`` of ``x`` when it lives on a mesh with explicit axes (its
    sharding is then part of its type, and products must say theirs), else None."""
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - no sharding in the type (older JAX, no mesh)
        return None
    mesh = getattr(sharding, "mesh", None)
    types = getattr(mesh, "axis_types", ())
    if not any(t == jax.sharding.AxisType.Explicit for t in types):
        return None
    return sharding.spec


def _merge_free_axes(x: Array, xc, xb, out_spec: Any) -> Any:
    """``x`` with its free (not contracted, not batch) axes merged into one, when there are
    two or more, in order and side by side (``(batch, seq, in)``: a free reshape), with the
    dimension numbers renumbered; None otherwise, or when the product names its sharding
    (merging sharded axes is not free)."""
    used = {int(i) for i in (*xc, *xb)}
    free = [i for i in range(x.ndim) if i not in used]
    if out_spec is not None or len(free) < 2 or free != list(range(free[0], free[-1] + 1)):
        return None
    first, n = free[0], len(free)
    sizes = tuple(x.shape[i] for i in free)
    x2 = x.reshape(x.shape[:first] + (_prod(sizes),) + x.shape[free[-1] + 1 :])
    renumber = lambda dims: tuple(int(i) - (n - 1) if int(i) > first else int(i) for i in dims)  # noqa: E731
    return x2, renumber(xc), renumber(xb), sizes


def _lowrank_dot(
    leaf: LoraWeight,
    x: Array,
    dimension_numbers,
    leaf_is_lhs: bool,
    precision,
    preferred_element_type,
    out_spec: Any = None,
) -> Array:
    """``dot_general(x, scale * A @ B)`` (or with the operands swapped) as two contractions.

    x is contracted with whichever factor is cheaper first (A when x contracts W's input
    axes, B when it contracts the output axes, e.g. a tied embedding used as the LM head);
    A and B are never multiplied together, so no weight-shaped array is formed (the
    merged-weight path, ``lora_merged``, is the one that forms it, when that is cheaper).
    """
    (lc, rc), (lb, rb) = dimension_numbers
    xc, wc, xb, wb = (rc, lc, rb, lb) if leaf_is_lhs else (lc, rc, lb, rb)
    merged = _merge_free_axes(x, xc, xb, out_spec)
    if merged is not None:
        # x's free axes (batch, sequence) as one: each skinny product is then one plain
        # GEMM, and its gradients contract one axis, where two made XLA's CPU backend
        # transpose activation-sized operands (benchmarks/NOTES.md, attempt 4).
        x2, xc2, xb2, sizes = merged
        dnums = ((lc, xc2), (lb, xb2)) if leaf_is_lhs else ((xc2, rc), (xb2, rb))
        out = _lowrank_dot(leaf, x2, dnums, leaf_is_lhs, precision, preferred_element_type)
        at = len(xb) + (out.ndim - len(xb) - 1 if leaf_is_lhs else 0)  # the merged axis
        return out.reshape(out.shape[:at] + sizes + out.shape[at + 1 :])
    w_labels, a_spec, b_spec, _ = leaf._labels()
    fresh = iter(_LETTERS[len(w_labels) :])
    x_labels = [next(fresh) for _ in range(x.ndim)]
    for i, j in zip(xc, wc, strict=True):
        x_labels[i] = w_labels[j]
    for i, j in zip(xb, wb, strict=True):
        x_labels[i] = w_labels[j]
    batch = [w_labels[j] for j in wb]
    x_free = [x_labels[i] for i in range(x.ndim) if i not in set(xc) | set(xb)]
    w_free = [w_labels[j] for j in range(len(w_labels)) if j not in set(wc) | set(wb)]
    out = batch + (w_free + x_free if leaf_is_lhs else x_free + w_free)

    sizes = dict(zip(w_labels, leaf.shape, strict=True))
    sizes.update(zip(x_labels, x.shape, strict=True))
    sizes["r"] = leaf.rank

    def plan(first: str, second: str) -> tuple[int, str]:
        keep = set(second) | set(out)
        mid = "".join(l for l in dict.fromkeys(x_labels + list(first)) if l in keep)
        cost = _prod(sizes[l] for l in set(x_labels) | set(first))
        cost += _prod(sizes[l] for l in set(mid) | set(second))
        return cost, mid

    factors = {a_spec: leaf.a, b_spec: leaf.b}
    cost_ab, mid_ab = plan(a_spec, b_spec)
    cost_ba, mid_ba = plan(b_spec, a_spec)
    first, second, mid = (
        (a_spec, b_spec, mid_ab) if cost_ab <= cost_ba else (b_spec, a_spec, mid_ba)
    )
    x_spec = "".join(x_labels)
    compute = x.dtype
    # On an explicit-axes mesh each product names its sharding: the result's is the base
    # product's; the skinny intermediate takes it on the axes it shares, None on the rank.
    shardings: tuple[Any, Any] = (None, None)
    if out_spec is not None:
        entries = tuple(out_spec) + (None,) * (len(out) - len(tuple(out_spec)))
        by_label = dict(zip(out, entries, strict=True))
        shardings = (P(*(by_label.get(label) for label in mid)), out_spec)
    t = jnp.einsum(
        f"{x_spec},{first}->{mid}",
        x,
        factors[first].astype(compute),
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=shardings[0],
    )
    if leaf.scale != 1.0:
        t = t * jnp.asarray(leaf.scale, t.dtype)
    # named so that the merged-weight path's checkpoint keeps it for the backward pass
    t = checkpoint_name(t.astype(compute), lora_merged.LOWRANK_T)
    return jnp.einsum(
        f"{mid},{second}->{''.join(out)}",
        t,
        factors[second].astype(compute),
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=shardings[1],
    )
