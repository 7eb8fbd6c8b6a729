"""IA3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper
than in-context learning"): a learned vector that rescales a projection's outputs (keys,
values) or, for feed-forward output projections, its inputs. Mergeable: ``W * l`` along the
scaled axis. Initialised to ones, so the model starts unchanged.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from lorax.leaves import OverBase, materialize, register_leaf, static_field
from lorax.targets import FlatTree, Targets, infer_in_axes, infer_stack_axes, select


@register_leaf
class IA3Weight(OverBase):
    """A frozen base ``W`` whose output (or input) features are scaled by ``vector``.

    Attributes:
      base: the frozen weight ``(*stack, *in_axes, *out_axes)``, an array or lorax leaf.
      vector: ``(*stack, *out_axes)`` (on="out") or ``(*stack, *in_axes)`` (on="in").
      n_in, n_out: the per-layer kernel's input and output axis counts; static, so the
        layout survives ``lax.scan`` slicing a stacked leaf.
      on: "out" or "in"; static.
    """

    base: Any
    vector: Any
    n_in: int = static_field(default=1)
    n_out: int = static_field(default=1)
    on: str = static_field(default="out")

    trainable_fields: ClassVar[tuple[str, ...]] = ("vector",)
    cast_fields: ClassVar[tuple[str, ...]] = ("vector",)

    @property
    def stack_ndim(self) -> int:
        return len(self.shape) - self.n_in - self.n_out

    def _broadcast_vector(self) -> jax.Array:
        ns = self.stack_ndim
        if self.on == "out":  # (*stack, *out) -> (*stack, 1.., *out)
            return jnp.expand_dims(self.vector, tuple(range(ns, ns + self.n_in)))
        return jnp.expand_dims(self.vector, tuple(range(ns + self.n_in,
                                                        ns + self.n_in + self.n_out)))

    def materialize(self) -> jax.Array:
        base = materialize(self.base)
        return (base * self._broadcast_vector().astype(base.dtype)).astype(base.dtype)

    def dot_general(self, other, *, dimension_numbers, leaf_is_lhs, precision,
                    preferred_element_type, bind):
        (lc, rc), (lb, rb) = dimension_numbers
        if (leaf_is_lhs or self.stack_ndim or lb or rb
                or sorted(int(c) for c in rc) != list(range(self.n_in))):
            return NotImplemented  # only x @ W over W's input axes
        vector = self.vector.astype(other.dtype)
        if self.on == "in":  # (x * l) @ W: put l on x's contracted axes, in W's order
            order = sorted(range(len(rc)), key=lambda i: rc[i])
            x_axes = [int(lc[i]) for i in order]
            shape = [1] * other.ndim
            for axis, size in zip(x_axes, vector.shape):
                shape[axis] = size
            if sorted(x_axes) != x_axes:
                return NotImplemented
            other = other * vector.reshape(shape)
        out = self.base_dot(other, dimension_numbers=dimension_numbers, leaf_is_lhs=False,
                            precision=precision, preferred_element_type=preferred_element_type,
                            bind=bind)
        if out is NotImplemented:
            return NotImplemented
        if self.on == "out":
            out = out * vector.reshape((1,) * (out.ndim - vector.ndim) + vector.shape)
        return out


def ia3(params: Any, targets: Targets, feedforward: Sequence[str] | str | None = None,
        dtype: Any = None) -> Any:
    """Returns ``params`` with IA3 leaves on the targeted weights.

    Args:
      params: the base parameters.
      targets: as for ``lorax.wrap`` (e.g. ``["k_proj", "v_proj", "down_proj"]``).
      feedforward: module names (or a regex of paths) whose *input* is scaled, as peft's
        ``feedforward_modules`` (e.g. ``["down_proj"]``); the others scale their outputs.
      dtype: dtype of the vectors; default the base's promoted to at least float32.

    Returns:
      The tree with :class:`IA3Weight` leaves (vectors of ones).

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> p = {"k": {"kernel": jnp.ones((8, 4))}, "down": {"kernel": jnp.ones((16, 8))}}
      >>> t = lorax.ia3(p, targets=["k", "down"], feedforward=["down"])
      >>> t["k"]["kernel"].vector.shape, t["down"]["kernel"].vector.shape
      ((4,), (16,))
    """
    tree = FlatTree.of(params)
    chosen = select(targets, tree.paths, tree.leaves)
    out = list(tree.leaves)
    for i in sorted(chosen):
        path, leaf = tree.paths[i], tree.leaves[i]
        if isinstance(feedforward, str):
            on_input = re.fullmatch(feedforward, path) is not None
        else:
            on_input = any(n in path.split("/") for n in (feedforward or ()))
        siblings = tree.siblings(path)
        ns = infer_stack_axes(path, leaf.shape, siblings)
        ni = infer_in_axes(leaf.shape, siblings, ns)
        no = len(leaf.shape) - ns - ni
        axes = leaf.shape[:ns] + (leaf.shape[ns:ns + ni] if on_input else leaf.shape[ns + ni:])
        vdtype = dtype or jnp.promote_types(leaf.dtype, jnp.float32)
        out[i] = IA3Weight(leaf, jnp.ones(axes, vdtype), n_in=ni, n_out=no,
                           on="in" if on_input else "out")
    return tree.rebuild(out)
