"""IA3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper
than in-context learning"): a learned vector that rescales a projection's outputs (keys,
values) or, for feed-forward output projections, its inputs. Mergeable: ``W * l`` along the
scaled axis. Initialised to ones, so the model starts unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax._build import Site, build
from lorax._checks import compile_regex, floating_dtype
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import (
    OverBase,
    input_product,
    materialize,
    register_leaf,
    shape_of,
    static_field,
    unfit,
)
from lorax.targets import Targets


@register_leaf(kind="ia3", aliases=("IA3Weight",))
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

    def field_axes(self, axes):
        ns, ni = self.stack_ndim, self.n_in
        scaled = axes[ns : ns + ni] if self.on == "in" else axes[ns + ni :]
        return {"base": tuple(axes), "vector": (*axes[:ns], *scaled)}

    def _broadcast_vector(self) -> jax.Array:
        ns = self.stack_ndim
        if self.on == "out":  # (*stack, *out) -> (*stack, 1.., *out)
            return jnp.expand_dims(self.vector, tuple(range(ns, ns + self.n_in)))
        return jnp.expand_dims(
            self.vector, tuple(range(ns + self.n_in, ns + self.n_in + self.n_out))
        )

    def materialize(self) -> jax.Array:
        base = materialize(self.base)
        return (base * self._broadcast_vector().astype(base.dtype)).astype(base.dtype)

    def misfit(self) -> str | None:
        w, v, ns = tuple(self.shape), shape_of(self.vector), self.stack_ndim
        want = w[:ns] + (w[ns : ns + self.n_in] if self.on == "in" else w[ns + self.n_in :])
        return super().misfit() or (
            None if v in (None, want) else unfit(f"vector {v} (expected {want})", w)
        )

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
        if not input_product(
            dimension_numbers,
            leaf_is_lhs=leaf_is_lhs,
            stack_ndim=self.stack_ndim,
            in_ndim=self.n_in,
        ):
            return NotImplemented  # only x @ W over W's input axes
        (lc, rc), _ = dimension_numbers
        vector = self.vector.astype(other.dtype)
        if self.on == "in":  # (x * l) @ W: put l on x's contracted axes, in W's order
            order = sorted(range(len(rc)), key=lambda i: rc[i])
            x_axes = [int(lc[i]) for i in order]
            shape = [1] * other.ndim
            for axis, size in zip(x_axes, vector.shape, strict=True):
                shape[axis] = size
            if sorted(x_axes) != x_axes:
                return NotImplemented
            other = other * vector.reshape(shape)
        out = self.base_dot(
            other,
            dimension_numbers=dimension_numbers,
            leaf_is_lhs=False,
            precision=precision,
            preferred_element_type=preferred_element_type,
            bind=bind,
        )
        if out is NotImplemented:
            return NotImplemented
        if self.on == "out":
            out = out * vector.reshape((1,) * (out.ndim - vector.ndim) + vector.shape)
        return out


def ia3(
    params: Any,
    /,
    *,
    targets: Targets,
    feedforward: Sequence[str] | str | None = None,
    dtype: Any = None,
) -> Any:
    """Returns ``params`` with IA3 leaves on the targeted weights.

    Args:
      params: the base parameters.
      targets: as for ``lorax.wrap`` (e.g. ``["k_proj", "v_proj", "down_proj"]``).
      feedforward: module names (or a regex of paths) whose *input* is scaled, as peft's
        ``feedforward_modules`` (e.g. ``["down_proj"]``); the others scale their outputs.
        A name that is in no targeted path is an error.
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
    dtype = floating_dtype(dtype, "lorax.ia3: dtype")
    ff_regex = None
    if isinstance(feedforward, str):
        ff_regex = compile_regex(feedforward, "lorax.ia3: feedforward")
    elif feedforward is not None and not (
        isinstance(feedforward, (list, tuple, set, frozenset))
        and all(isinstance(n, str) for n in feedforward)
    ):
        raise LoraxTypeError(
            "lorax.ia3: feedforward must be None, a regex (str) or a list of "
            f"module names (str); got {feedforward!r}"
        )
    names = () if ff_regex is not None else tuple(feedforward or ())

    def check(sites: list[Site]) -> None:
        adapted = [s.path for s in sites]
        unmatched = sorted(n for n in names if not any(n in p.split("/") for p in adapted))
        if ff_regex is not None and not any(ff_regex.fullmatch(p) for p in adapted):
            unmatched = [feedforward]
        if unmatched:  # a typo would silently scale the outputs instead of the inputs
            raise LoraxValueError(
                f"lorax.ia3: feedforward {unmatched} matches no targeted "
                "path; the targeted paths are: " + ", ".join(adapted[:40])
            )

    def make(site: Site) -> IA3Weight:
        path, leaf = site.path, site.leaf
        if ff_regex is not None:
            on_input = ff_regex.fullmatch(path) is not None
        else:
            on_input = any(n in path.split("/") for n in names)
        ns = site.stack_axes()
        ni = site.in_axes(ns)
        no = len(leaf.shape) - ns - ni
        axes = leaf.shape[:ns] + (leaf.shape[ns : ns + ni] if on_input else leaf.shape[ns + ni :])
        vdtype = dtype if dtype is not None else jnp.promote_types(leaf.dtype, jnp.float32)
        return IA3Weight(
            leaf, jnp.ones(axes, vdtype), n_in=ni, n_out=no, on="in" if on_input else "out"
        )

    return build(params, make, targets=targets, check=check, what="lorax.ia3")
