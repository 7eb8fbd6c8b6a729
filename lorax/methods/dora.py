"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024): a LoRA leaf plus a
trainable magnitude per output feature,

    W' = m * (W + s A B) / ||W + s A B||     (norm over the input axes, per output feature)

computed unmerged as ``(m / n) * (x W + s (x A) B)``. As in the paper and peft, the norm ``n``
is a constant in the backward pass (``stop_gradient``), which saves memory; it is computed
without forming ``W + s A B``: ``n^2 = sum W^2 + 2 s sum_k B * (A^T W) + s^2 diag(B^T A^T A B)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax.leaf import (
    OverBase,
    input_product,
    materialize,
    register_leaf,
    shape_of,
    static_field,
    unfit,
)
from lorax.methods.lora import LoraWeight


def _column_norm(leaf: LoraWeight) -> jax.Array:
    """||W + s A B|| over the input axes, ``(*stack, *out_axes)``, in float32."""
    ns, ni = leaf.stack_ndim, leaf.in_ndim
    shape = leaf.shape
    stack, ins, outs = shape[:ns], shape[ns : ns + ni], shape[ns + ni :]
    fan_in = 1
    for s in ins:
        fan_in *= s
    w = materialize(leaf.base).astype(jnp.float32).reshape(stack + (fan_in, -1))
    a = leaf.a.astype(jnp.float32).reshape(stack + (fan_in, leaf.rank))
    b = leaf.b.astype(jnp.float32).reshape(stack + (leaf.rank, -1))
    hi = jax.lax.Precision.HIGHEST
    aw = jnp.einsum("...ir,...io->...ro", a, w, precision=hi)  # A^T W: [r, out]
    ata = jnp.einsum("...ir,...is->...rs", a, a, precision=hi)  # A^T A: [r, r]
    ab_sq = jnp.einsum("...ro,...rs,...so->...o", b, ata, b, precision=hi)
    s = leaf.scale
    sq = (w * w).sum(-2) + 2 * s * (b * aw).sum(-2) + s * s * ab_sq
    return jnp.sqrt(jnp.maximum(sq, 0.0)).reshape(stack + outs)


@register_leaf(kind="dora", aliases=("DoraWeight",))
class DoraWeight(OverBase):
    """LoRA's ``base``, ``a``, ``b`` plus a trainable ``magnitude`` ``(*stack, *out_axes)``,
    initialised to the base's norm per output feature (so the model starts unchanged).

    A DoRA leaf is not a LoRA leaf: it *has* one, :attr:`lora` (the same arrays), which
    computes the unscaled product; DoRA rescales it per output feature. Products it cannot
    rescale (a transposed use, a stack) densify.
    """

    base: Any
    a: Any
    b: Any
    scale: float = static_field(default=1.0)
    dropout: float = static_field(default=0.0)
    magnitude: Any = None

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b", "magnitude")
    cast_fields: ClassVar[tuple[str, ...]] = ("a", "b", "magnitude")

    @property
    def lora(self) -> LoraWeight:
        """The LoRA leaf of the same ``base``, ``a``, ``b``, ``scale`` and ``dropout``."""
        return LoraWeight(self.base, self.a, self.b, scale=self.scale, dropout=self.dropout)

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def stack_ndim(self) -> int:
        return self.lora.stack_ndim

    @property
    def in_ndim(self) -> int:
        return self.lora.in_ndim

    def misfit(self) -> str | None:
        problem = super().misfit() or self.lora.misfit()
        if problem:
            return problem
        w, m = tuple(self.shape), shape_of(self.magnitude)
        if shape_of(self.a) is None or shape_of(self.b) is None:
            return None
        ns, ni = self.stack_ndim, self.in_ndim
        want = w[:ns] + w[ns + ni :]
        return None if m in (None, want) else unfit(f"magnitude {m} (expected {want})", w)

    def field_axes(self, axes):
        ns, ni = self.stack_ndim, self.in_ndim
        out = self.lora.field_axes(axes)
        out["magnitude"] = (*axes[:ns], *axes[ns + ni :])  # one per output feature
        return out

    def slices_locally(self, axes):
        ns, ni = self.stack_ndim, self.in_ndim
        return all(a is None for a in axes[ns : ns + ni])  # the norm runs over the inputs

    def norm_scale(self) -> jax.Array:
        """``m / ||W + s A B||``, a constant for the backward pass through the norm."""
        return self.magnitude / jax.lax.stop_gradient(_column_norm(self.lora))

    def materialize(self) -> jax.Array:
        merged = self.lora.materialize()
        ns, ni = self.stack_ndim, self.in_ndim
        ratio = self.magnitude / _column_norm(self.lora)
        ratio = jnp.expand_dims(ratio, tuple(range(ns, ns + ni)))
        return (merged.astype(jnp.float32) * ratio).astype(merged.dtype)

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
            in_ndim=self.in_ndim,
        ):
            return NotImplemented  # only x @ W: the outputs end in W's output axes
        out = self.lora.dot_general(
            other,
            dimension_numbers=dimension_numbers,
            leaf_is_lhs=False,
            precision=precision,
            preferred_element_type=preferred_element_type,
            bind=bind,
            rng=rng,
        )
        if out is NotImplemented:
            return NotImplemented
        ratio = self.norm_scale().astype(out.dtype)
        return out * ratio.reshape((1,) * (out.ndim - ratio.ndim) + ratio.shape)


def dora_from_lora(leaf: LoraWeight) -> DoraWeight:
    """The DoRA leaf of a freshly initialised LoRA leaf: magnitude = the base's norm."""
    magnitude = _column_norm(leaf).astype(leaf.a.dtype)
    return DoraWeight(
        leaf.base, leaf.a, leaf.b, scale=leaf.scale, dropout=leaf.dropout, magnitude=magnitude
    )
