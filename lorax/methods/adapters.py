"""Bottleneck adapters (Houlsby et al. 2019): a small down-projection, a nonlinearity and
an up-projection (zero at init) added to a projection's output, either serially (fed by the
projection's output) or in parallel (fed by its input, He et al. 2022). The nonlinearity
makes them not mergeable: ``lorax.merge`` says so, and ``lorax.lora(apply)`` runs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax._build import Site, build
from lorax._checks import floating_dtype, positive_int
from lorax.errors import LoraxValueError, NotMergeableError
from lorax.leaf import OverBase, input_product, register_leaf, shape_of, static_field, unfit
from lorax.targets import Targets

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


@register_leaf(kind="adapter", aliases=("AdapterWeight",))
class AdapterWeight(OverBase):
    """A frozen 2-D (per layer) kernel ``W`` with a bottleneck adapter on its product:
    serial ``y + f(y D) U`` or parallel ``y + f(x D) U``, where ``y = x W``.

    Attributes:
      base: the frozen kernel ``(*stack, in, out)``, an array or lorax leaf.
      down: ``(*stack, out, m)`` (serial) or ``(*stack, in, m)`` (parallel).
      up: ``(*stack, m, out)``; zero at init.
      mode: "serial" or "parallel"; static.
      activation: a key of ``ACTIVATIONS``; static.
    """

    base: Any
    down: Any
    up: Any
    mode: str = static_field(default="serial")
    activation: str = static_field(default="relu")

    trainable_fields: ClassVar[tuple[str, ...]] = ("down", "up")
    has_dense_form: ClassVar[bool] = False  # a nonlinearity sits between the projections
    cast_fields: ClassVar[tuple[str, ...]] = ("down", "up")

    @property
    def stack_ndim(self) -> int:
        return len(self.shape) - 2

    def field_axes(self, axes):
        stack, fan_in, fan_out = tuple(axes[:-2]), axes[-2], axes[-1]
        fed = fan_out if self.mode == "serial" else fan_in
        return {
            "base": tuple(axes),
            "down": (*stack, fed, None),
            "up": (*stack, None, fan_out),
        }

    def slices_locally(self, axes):
        return all(a is None for a in axes[-2:])  # a nonlinearity of partial sums is wrong

    def materialize(self) -> jax.Array:
        raise NotMergeableError(
            f"a {self.mode} bottleneck adapter ({self.activation} between its projections) "
            "is not a weight and cannot be merged or densified; run the model with "
            "lorax.lora(apply), whose rules compute it"
        )

    def misfit(self) -> str | None:
        w, d, u = tuple(self.shape), shape_of(self.down), shape_of(self.up)
        if super().misfit() or d is None or u is None or len(w) < 2:
            return super().misfit()
        stack, fan = w[:-2], w[-1] if self.mode == "serial" else w[-2]
        if d[:-1] != stack + (fan,) or u != stack + (d[-1], w[-1]):
            return unfit(f"down {d} and up {u}", w)
        return None

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
            dimension_numbers, leaf_is_lhs=leaf_is_lhs, stack_ndim=self.stack_ndim, in_ndim=1
        ):
            return NotImplemented  # only x @ W with W's input axis contracted
        (lc, _), _ = dimension_numbers
        y = self.base_dot(
            other,
            dimension_numbers=dimension_numbers,
            leaf_is_lhs=False,
            precision=precision,
            preferred_element_type=preferred_element_type,
            bind=bind,
        )
        if y is NotImplemented:
            return NotImplemented
        # serial: fed by y; parallel: by x with the contracted axis last
        source = y if self.mode == "serial" else jnp.moveaxis(other, int(lc[0]), -1)
        hidden = ACTIVATIONS[self.activation](source @ self.down.astype(source.dtype))
        return y + (hidden @ self.up.astype(hidden.dtype)).astype(y.dtype)


def adapters(
    params: Any,
    /,
    *,
    targets: Targets,
    bottleneck: int = 16,
    mode: str = "serial",
    activation: str = "relu",
    key: jax.Array | None = None,
    dtype: Any = None,
) -> Any:
    """Returns ``params`` with bottleneck adapters on the targeted 2-D kernels.

    Args:
      params: the base parameters.
      targets: as for ``lorax.wrap`` (e.g. ``["c_proj"]``, the attention and MLP outputs).
      bottleneck: the adapter's hidden size ``m``.
      mode: "serial" (fed by the projection's output, as Houlsby) or "parallel" (fed by
        its input).
      activation: one of ``ACTIVATIONS``.
      key: PRNG key for the random down-projections, split per adapted weight. Default
        ``jax.random.key(0)``: two calls without a key give the same adapters.
      dtype: dtype of the adapter; default the base's promoted to at least float32.

    Returns:
      The tree with :class:`AdapterWeight` leaves; the model starts unchanged (up = 0).
      The projection's bias, if any, is added after the adapter.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> t = lorax.adapters({"proj": {"kernel": jnp.ones((8, 6))}}, targets=["proj"],
      ...                    bottleneck=2)
      >>> t["proj"]["kernel"].down.shape, t["proj"]["kernel"].up.shape
      ((6, 2), (2, 6))
    """
    if mode not in ("serial", "parallel"):
        raise LoraxValueError(f"lorax.adapters: mode must be 'serial' or 'parallel'; got {mode!r}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise LoraxValueError(
            f"lorax.adapters: activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}"
        )
    bottleneck = positive_int(bottleneck, "lorax.adapters: bottleneck")
    dtype = floating_dtype(dtype, "lorax.adapters: dtype")

    def make(site: Site) -> AdapterWeight:
        path, leaf, k = site.path, site.leaf, site.key
        ns = site.stack_axes()
        if len(leaf.shape) - ns != 2 or site.in_axes(ns) != 1:
            raise LoraxValueError(
                f"lorax.adapters: '{path}' has shape {tuple(leaf.shape)}; "
                "adapters go on 2-D (per layer) kernels"
            )
        stack, (d_in, d_out) = tuple(leaf.shape[:ns]), tuple(leaf.shape[ns:])
        fan = d_out if mode == "serial" else d_in
        vdtype = dtype if dtype is not None else jnp.promote_types(leaf.dtype, jnp.float32)
        bound = 1.0 / math.sqrt(fan)
        down = jax.random.uniform(k, stack + (fan, bottleneck), vdtype, -bound, bound)
        up = jnp.zeros(stack + (bottleneck, d_out), vdtype)
        return AdapterWeight(leaf, down, up, mode=mode, activation=activation)

    return build(
        params,
        make,
        targets=targets,
        key=jax.random.key(0) if key is None else key,
        what="lorax.adapters",
    )
