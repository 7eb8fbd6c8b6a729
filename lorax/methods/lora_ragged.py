"""LoRA through ``ragged_dot_general``: the grouped matmuls of mixture-of-experts layers.

A mixture-of-experts layer sorts its tokens by expert and multiplies each group of rows by
its expert's weight, ``jax.lax.ragged_dot(x, W, group_sizes)`` with ``x: (m, k)``,
``W: (g, k, n)`` and ``group_sizes: (g,)``. For an adapted expert weight ``W + s A @ B``
this module computes ``ragged_dot(x, W, gs) + s * ((x A) B)`` per group, in two skinny
products, without forming the dense weight.

Which products those are depends on where the expert axis sits among the leaf's axes
(``LoraWeight`` splits its dense axes into ``(*stack, *in_axes, *out_axes)``):

- ``lorax.wrap``'s default for a 3-D weight without a bias: input axes ``(g, k)``, output
  ``(n)``, so ``a: (g, k, r)`` holds one down-projection per expert and ``b: (r, n)`` is
  shared. Computed as ``ragged_dot(x, A, gs) @ B``.
- One adapter per expert: what ``lorax.wrap(params, fn=model.apply, args=...)`` chooses
  (targets by use), or ``stacked=`` / ``LoraSpec(stack_axes=1)``. The expert axis is a stack
  axis, ``a: (g, k, r)``, ``b: (g, r, n)``. Computed as
  ``ragged_dot(ragged_dot(x, A, gs), B, gs)``.
- Input axes ``(g)``, output ``(k, n)`` (the split wrap picks when ``g`` is about ``k * n``):
  ``a: (g, r)``, ``b: (r, k, n)``. Computed as ``ragged_dot(x @ B, A, gs)``, the
  intermediate ``(m, r, n)``.

In general: the factor that holds the contracted axes of ``W`` is applied first, the other
second; a step whose factor holds the expert axis is a ``ragged_dot_general`` over the same
groups, the other a plain ``dot_general``. Rows outside every group are zero in the base
product and stay zero here, since at least one step is ragged. Batch axes (an expert weight
per head, ``(g, h, k, n)``) are batch axes of the products whose factor holds them. Forms
outside this return ``NotImplemented``, and the interpreter densifies with a warning rather
than compute something else: a ragged contracting or batch axis (JAX's other two modes; the
first is the product of a weight's gradient), contracted axes split between A and B, a stack
axis that is neither the expert axis nor a batch axis, or group sizes given per batch row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorax.leaf import Array, Bind, LoraxLeaf

if TYPE_CHECKING:  # lora.py imports this module
    from lorax.methods.lora import LoraWeight

# An axis label: an int is an axis of the dense weight, "r" the rank axis, ("x", i) axis i
# of the lhs.
Label = Any


class _Plan(NamedTuple):
    """How one ``ragged_dot_general`` splits into two products with the factors."""

    lhs_contract: tuple[int, ...]  # lhs axes contracted with the weight
    rhs_contract: tuple[int, ...]  # the weight's axes they contract with (same order)
    lhs_batch: tuple[int, ...]  # lhs batch axes
    rhs_batch: tuple[int, ...]  # the weight's batch axes (same order)
    ragged: int  # the lhs's ragged axis
    group: int  # the weight's expert axis
    first: str  # "a" or "b": the factor holding the contracted axes, applied first


def ragged_dot_general(
    leaf: LoraWeight,
    lhs: Array,
    group_sizes: Array,
    *,
    params: Mapping[str, Any],
    bind: Bind,
    rng: Any = None,
) -> Array:
    """``ragged_dot_general(lhs, W, group_sizes)`` for the LoRA weight ``W``, unmerged.

    Args:
      leaf: the LoRA leaf, the equation's rhs (the grouped expert weight).
      lhs: the rows, sorted by group.
      group_sizes: rows per group (``(g,)``, or with the leading axes JAX allows).
      params: the equation's params (``ragged_dot_dimension_numbers``, ``precision``,
        ``preferred_element_type``, ``group_offset``, ``out_sharding``).
      bind: the primitive on plain arrays (used for the base product).
      rng: this call's dropout key, or None (no dropout).

    Returns:
      The product, or ``NotImplemented`` for a form the factors cannot compute (see the
      module docstring), or when a base leaf cannot compute its own product.
    """
    plan = _plan(leaf, params["ragged_dot_dimension_numbers"])
    # Group sizes per batch row ((b, g) rather than (g,)) are laid out for the lhs's axis
    # order, which a product that keeps a batch axis as a free axis would change.
    if plan is None or (plan.lhs_batch and jnp.ndim(group_sizes) > 1):
        return NotImplemented
    if isinstance(leaf.base, LoraxLeaf):  # e.g. NF4: it dequantizes next to the use
        base_out = leaf.base.ragged_dot_general(lhs, group_sizes, params=params, bind=bind)
    else:
        base_out = bind(lhs, leaf.base, group_sizes)
    if base_out is NotImplemented:
        return NotImplemented
    if rng is not None and leaf.dropout > 0:  # inverted dropout on the low-rank input
        keep = jax.random.bernoulli(rng, 1.0 - leaf.dropout, lhs.shape)
        lhs = jnp.where(keep, lhs / (1.0 - leaf.dropout), 0).astype(lhs.dtype)
    low = _lowrank(leaf, lhs, group_sizes, plan, params)
    return base_out + low.astype(base_out.dtype)


def _plan(leaf: LoraWeight, dnums: Any) -> _Plan | None:
    """The two-product plan of a ragged product with ``leaf``, or None when there is none."""
    (lc, rc), (lb, rb) = ((tuple(map(int, d)) for d in p) for p in dnums.dot_dimension_numbers)
    ragged_dims, group_dims = tuple(dnums.lhs_ragged_dimensions), tuple(dnums.rhs_group_dimensions)
    # One ragged row axis and one expert axis of the weight: JAX's ragged non-contracting
    # mode, the MoE form. (The ragged contracting mode is a weight gradient's product.)
    if not rc or len(ragged_dims) != 1 or len(group_dims) != 1:
        return None
    ragged, group = int(ragged_dims[0]), int(group_dims[0])
    if ragged in lc or ragged in lb:
        return None
    ns, ni, nd = leaf.stack_ndim, leaf.in_ndim, len(leaf.shape)
    # A stack axis is in both factors: both products must carry it, as the expert axis (one
    # adapter per expert) or a batch axis. Kept or contracted by both, it would not split.
    if not set(range(ns)) <= {group, *rb}:
        return None
    contracted = set(rc)
    if contracted <= set(range(ns, ns + ni)):
        first = "a"
    elif contracted <= set(range(ns + ni, nd)):
        first = "b"  # e.g. x @ W[e].T per expert: B first, then A
    else:  # contracted axes in both factors: (x A) B is not a sum of two products
        return None
    return _Plan(lc, rc, lb, rb, ragged, group, first)


def _lowrank(
    leaf: LoraWeight,
    x: Array,
    group_sizes: Array,
    plan: _Plan,
    params: Mapping[str, Any],
) -> Array:
    """``scale * ragged_dot_general(x, A @ B, group_sizes)`` as two skinny products.

    Each axis is tracked by a label through both products: a weight axis contracted with x
    (or paired with an x batch axis) goes where that x axis goes, the rank axis ``"r"`` is
    contracted by the second product, and the result is put in the primitive's order
    (batch axes, x's kept axes, the weight's kept axes).
    """
    ns, ni, nd = leaf.stack_ndim, leaf.in_ndim, len(leaf.shape)
    axes: dict[str, list[Label]] = {
        "a": [*range(ns + ni), "r"],
        "b": [*range(ns), "r", *range(ns + ni, nd)],
    }
    compute = x.dtype
    factors = {"a": leaf.a.astype(compute), "b": leaf.b.astype(compute)}
    x_axes: list[Label] = [("x", i) for i in range(x.ndim)]
    batch = [(("x", i), j) for i, j in zip(plan.lhs_batch, plan.rhs_batch, strict=True)]
    want = [("x", i) for i in plan.lhs_batch]
    want += [l for i, l in enumerate(x_axes) if i not in {*plan.lhs_contract, *plan.lhs_batch}]
    want += [j for j in range(nd) if j not in {*plan.rhs_contract, *plan.rhs_batch, plan.group}]
    sharding = _sharding_for(params.get("out_sharding"), want)

    def product(
        t: Array, t_axes: list[Label], name: str, contract: Sequence[tuple[Label, Label]]
    ) -> tuple[Array, list[Label]]:
        f, f_axes = factors[name], axes[name]
        # A weight batch axis in this factor pairs with x's; one only in the other factor
        # stays a free axis of this product and is paired in the other.
        pairs = [(p, q) for p, q in batch if q in f_axes]
        tc, fc = [t_axes.index(p) for p, _ in contract], [f_axes.index(q) for _, q in contract]
        tb, fb = [t_axes.index(p) for p, _ in pairs], [f_axes.index(q) for _, q in pairs]
        out_axes = [p for p, _ in pairs]
        out_axes += [l for i, l in enumerate(t_axes) if i not in {*tc, *tb}]
        out_axes += [l for i, l in enumerate(f_axes) if i not in {*fc, *fb} and l != plan.group]
        dims = ((tuple(tc), tuple(fc)), (tuple(tb), tuple(fb)))
        common: dict[str, Any] = dict(
            precision=params.get("precision"),
            preferred_element_type=params.get("preferred_element_type"),
            out_sharding=sharding(out_axes),
        )
        if plan.group not in f_axes:
            return jax.lax.dot_general(t, f, dims, **common), out_axes
        dnums = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=dims,
            lhs_ragged_dimensions=[t_axes.index(("x", plan.ragged))],
            rhs_group_dimensions=[f_axes.index(plan.group)],
        )
        out = jax.lax.ragged_dot_general(
            t, f, group_sizes, dnums, group_offset=params.get("group_offset"), **common
        )
        return out, out_axes

    second = "b" if plan.first == "a" else "a"
    contract = [(("x", i), j) for i, j in zip(plan.lhs_contract, plan.rhs_contract, strict=True)]
    t, t_axes = product(x, x_axes, plan.first, contract)
    if leaf.scale != 1.0:  # on the skinny intermediate, the cheapest place
        t = t * jnp.asarray(leaf.scale, t.dtype)
    t = t.astype(compute)
    out, out_axes = product(t, t_axes, second, [("r", "r")])
    if out_axes != want:  # e.g. B first: the kept output axes come before the input axes
        out = jnp.transpose(out, [out_axes.index(l) for l in want])
    return out


def _sharding_for(out_sharding: Any, labels: Sequence[Label]) -> Callable[[Sequence[Label]], Any]:
    """On an explicit-axes mesh each product names its sharding: an intermediate takes the
    result's entry on each axis it shares with the result and None on the rest (the rank
    axis). Without an ``out_sharding`` every product infers its own (None)."""
    if not isinstance(out_sharding, NamedSharding):
        return lambda axes: None
    spec = tuple(out_sharding.spec)
    by_label = dict(zip(labels, spec + (None,) * (len(labels) - len(spec)), strict=True))
    return lambda axes: NamedSharding(out_sharding.mesh, P(*(by_label.get(l) for l in axes)))
