"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024): a LoRA leaf plus a
trainable magnitude per output feature,

    W' = m * (W + s A B) / ||W + s A B||     (norm over the input axes, per output feature)

computed unmerged as ``(m / n) * (x W + s (x A) B)``. As in the paper and peft, the norm ``n``
is a constant in the backward pass (``stop_gradient``), which saves memory; it is computed
without forming ``W + s A B``: ``n^2 = sum W^2 + 2 s sum_k B * (A^T W) + s^2 diag(B^T A^T A B)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax.leaf import materialize, register_leaf
from lorax.methods.lora import LoraWeight


def _column_norm(leaf: "DoraWeight") -> jax.Array:
    """||W + s A B|| over the input axes, ``(*stack, *out_axes)``, in float32."""
    ns, ni = leaf.stack_ndim, leaf.in_ndim
    shape = leaf.shape
    stack, ins, outs = shape[:ns], shape[ns:ns + ni], shape[ns + ni:]
    fan_in = 1
    for s in ins:
        fan_in *= s
    w = materialize(leaf.base).astype(jnp.float32).reshape(stack + (fan_in, -1))
    a = leaf.a.astype(jnp.float32).reshape(stack + (fan_in, leaf.rank))
    b = leaf.b.astype(jnp.float32).reshape(stack + (leaf.rank, -1))
    hi = jax.lax.Precision.HIGHEST
    aw = jnp.einsum("...ir,...io->...ro", a, w, precision=hi)          # A^T W: [r, out]
    ata = jnp.einsum("...ir,...is->...rs", a, a, precision=hi)         # A^T A: [r, r]
    ab_sq = jnp.einsum("...ro,...rs,...so->...o", b, ata, b, precision=hi)
    s = leaf.scale
    sq = (w * w).sum(-2) + 2 * s * (b * aw).sum(-2) + s * s * ab_sq
    return jnp.sqrt(jnp.maximum(sq, 0.0)).reshape(stack + outs)


@register_leaf
class DoraWeight(LoraWeight):
    """A :class:`~lorax.LoraWeight` with a trainable ``magnitude`` ``(*stack, *out_axes)``,
    initialised to the base's norm per output feature (so the model starts unchanged)."""

    magnitude: Any = None

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b", "magnitude")
    cast_fields: ClassVar[tuple[str, ...]] = ("a", "b", "magnitude")

    def norm_scale(self) -> jax.Array:
        """``m / ||W + s A B||``, a constant for the backward pass through the norm."""
        return self.magnitude / jax.lax.stop_gradient(_column_norm(self))

    def materialize(self) -> jax.Array:
        merged = LoraWeight.materialize(self)
        ns, ni = self.stack_ndim, self.in_ndim
        ratio = self.magnitude / _column_norm(self)
        ratio = jnp.expand_dims(ratio, tuple(range(ns, ns + ni)))
        return (merged.astype(jnp.float32) * ratio).astype(merged.dtype)

    def dot_general(self, other, *, dimension_numbers, leaf_is_lhs, precision,
                    preferred_element_type, bind, rng=None):
        (lc, rc), (lb, rb) = dimension_numbers
        ns, ni = self.stack_ndim, self.in_ndim
        if (leaf_is_lhs or ns or lb or rb
                or sorted(int(c) for c in rc) != list(range(ni))):
            return NotImplemented  # only x @ W over W's input axes: outputs end in W's out axes
        out = LoraWeight.dot_general(self, other, dimension_numbers=dimension_numbers,
                                     leaf_is_lhs=False, precision=precision,
                                     preferred_element_type=preferred_element_type, bind=bind,
                                     rng=rng)
        if out is NotImplemented:
            return NotImplemented
        ratio = self.norm_scale().astype(out.dtype)
        return out * ratio.reshape((1,) * (out.ndim - ratio.ndim) + ratio.shape)

    # the layout-changing rules of LoRA would need the magnitude moved too: densify instead
    def conv_general_dilated(self, *args, **kwargs):
        return NotImplemented

    def gather(self, *args, **kwargs):
        return NotImplemented

    def transpose(self, permutation):
        return NotImplemented

    def reshape(self, new_sizes):
        return NotImplemented



def dora_from_lora(leaf: LoraWeight) -> DoraWeight:
    """The DoRA leaf of a freshly initialised LoRA leaf: magnitude = the base's norm."""
    dora = DoraWeight(leaf.base, leaf.a, leaf.b, scale=leaf.scale, dropout=leaf.dropout,
                      magnitude=None)
    magnitude = _column_norm(dora).astype(leaf.a.dtype)
    return dataclasses.replace(dora, magnitude=magnitude)

