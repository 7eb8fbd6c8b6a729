"""Multi-adapter serving: one batch whose rows use different LoRA adapters over one base,
computed in one pass without merging and without a Python loop over adapters:

    y[row] = x[row] W + scale[k] * (x[row] A[k]) B[k],   k = index[row]

``lorax.stack(trees, index)`` builds the tree; ``lorax.lora(apply)`` runs it. The factors of
all adapters are gathered per row (ranks padded with zeros to the largest), so the cost is
that of one LoRA per row, whatever the number of adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxTypeError, LoraxValueError, NotMergeableError
from lorax.leaf import OverBase, input_product, is_lorax_leaf, register_leaf
from lorax.methods.lora import LoraWeight
from lorax.paths import path_str


@register_leaf(kind="multi_lora", aliases=("MultiLoraWeight",))
class MultiLoraWeight(OverBase):
    """A frozen 2-D (per layer) kernel with ``n`` LoRA adapters and a per-row choice.

    Attributes:
      base: the frozen kernel ``(*stack, in, out)``.
      a: ``(*stack, n, in, r)``; b: ``(*stack, n, r, out)``.
      scales: ``(*stack, n)``, each adapter's ``alpha / r``.
      index: ``(*stack, batch)`` int32, the adapter of each row (repeated along the stack
        axes so that ``lax.scan`` slices it with the rest).
    """

    base: Any
    a: Any
    b: Any
    scales: Any
    index: Any

    trainable_fields: ClassVar[tuple[str, ...]] = ()  # for serving
    has_dense_form: ClassVar[bool] = False  # each row has its own weight
    cast_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim - 3

    def field_axes(self, axes):
        stack, fan_in, fan_out = tuple(axes[:-2]), axes[-2], axes[-1]
        return {  # the adapter axis and the rows' choices are replicated
            "base": tuple(axes),
            "a": (*stack, None, fan_in, None),
            "b": (*stack, None, None, fan_out),
            "scales": (*stack, None),
            "index": (*stack, None),
        }

    def materialize(self) -> jax.Array:
        raise NotMergeableError(
            "each row uses its own adapter, so there is no single dense "
            "weight; merge the adapters one at a time instead"
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
        (lc, _), _ = dimension_numbers
        if (
            not input_product(
                dimension_numbers, leaf_is_lhs=leaf_is_lhs, stack_ndim=self.stack_ndim, in_ndim=1
            )
            or tuple(int(c) for c in lc) != (other.ndim - 1,)
            or other.shape[0] != self.index.shape[0]
        ):
            return NotImplemented  # only x [batch, ..., in] @ W
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
        a = self.a[self.index].astype(other.dtype)  # [batch, in, r]
        b = self.b[self.index].astype(other.dtype)  # [batch, r, out]
        scale = self.scales[self.index].astype(other.dtype)  # [batch]
        low = jnp.einsum("b...i,bir->b...r", other, a)
        low = jnp.einsum("b...r,bro->b...o", low, b)
        low = low * scale.reshape((-1,) + (1,) * (low.ndim - 1))
        return y + low.astype(y.dtype)


def stack(trees: Sequence[Any], index: Any, /) -> Any:
    """One tree serving several LoRA adapters of the same base, row by row.

    Args:
      trees: wrapped trees (``lorax.wrap`` / ``import_peft`` / ``load``) over the same base,
        with LoRA leaves on the same 2-D (per layer) kernels (a DoRA, IA3 or other
        trainable leaf is refused with a ``TypeError`` naming its path).
      index: ``[batch]`` ints, the adapter (position in ``trees``) of each row.

    Returns:
      A tree with :class:`MultiLoraWeight` leaves; run it with ``lorax.lora(apply)`` on a
      batch of ``len(index)`` rows.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> w = {"w": jnp.ones((6, 4))}
      >>> t = lorax.stack([lorax.wrap(w, rank=2), lorax.wrap(w, rank=3)], jnp.array([1, 0]))
      >>> t["w"].a.shape, t["w"].index.shape
      ((2, 6, 3), (2,))
    """
    if not isinstance(trees, (list, tuple)):  # one tree (a dict) would stack its keys
        raise LoraxTypeError(
            f"lorax.stack: trees must be a list of wrapped trees; got {type(trees).__name__}"
        )
    if not trees:
        raise LoraxValueError("lorax.stack: no trees")
    try:
        raw = np.asarray(index) if not isinstance(index, jax.Array) else index
    except Exception:  # e.g. ragged lists
        raw = None
    if raw is None or not (jnp.issubdtype(raw.dtype, jnp.integer) or raw.size == 0):
        raise LoraxTypeError(
            f"lorax.stack: index must be [batch] ints (the adapter of each "
            f"row); got {getattr(raw, 'dtype', type(index).__name__)} {index!r}"
        )
    index = jnp.asarray(raw, jnp.int32)
    if index.ndim != 1 or index.size == 0:
        raise LoraxValueError(
            f"lorax.stack: index must be [batch] with batch >= 1; got shape {index.shape}"
        )
    if int(index.max()) >= len(trees) or int(index.min()) < 0:
        raise LoraxValueError(f"lorax.stack: index values must be in [0, {len(trees)})")
    flats = [jax.tree_util.tree_flatten_with_path(t, is_leaf=is_lorax_leaf) for t in trees]
    treedef = flats[0][1]
    if any(f[1] != treedef for f in flats[1:]):
        raise LoraxValueError("lorax.stack: the trees have different structures")
    out = []
    for column in zip(*(f[0] for f in flats), strict=True):
        path, leaves = path_str(column[0][0]), [leaf for _, leaf in column]
        if not any(is_lorax_leaf(leaf) and leaf.trainable_fields for leaf in leaves):
            out.append(leaves[0])  # the shared base
            continue
        for i, leaf in enumerate(leaves):
            if is_lorax_leaf(leaf) and leaf.trainable_fields and type(leaf) is not LoraWeight:
                raise LoraxTypeError(
                    f"lorax.stack: '{path}' is a {leaf.kind} leaf in tree {i}; only LoRA "
                    "leaves are served side by side (a DoRA leaf rescales each output by "
                    "its own magnitude and norm, which the stacked rows do not compute); "
                    "lorax.merge such trees and serve them one at a time"
                )
        if not all(type(leaf) is LoraWeight for leaf in leaves):
            raise LoraxValueError(
                f"lorax.stack: '{path}' is a LoRA leaf in some trees only (or another kind)"
            )
        shapes = [tuple(leaf.shape) for leaf in leaves]
        if len(set(shapes)) != 1:  # only the first tree's base is kept
            raise LoraxValueError(
                f"lorax.stack: '{path}' has bases of shapes {shapes}; the trees must adapt one base"
            )
        ns = leaves[0].stack_ndim
        if leaves[0].in_ndim != 1 or len(leaves[0].shape) - ns != 2:
            raise LoraxValueError(f"lorax.stack: '{path}' is not a 2-D (per layer) kernel")
        r = max(leaf.rank for leaf in leaves)
        pad_a = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, r - x.shape[-1])])  # noqa
        pad_b = lambda x: jnp.pad(x, [(0, 0)] * ns + [(0, r - x.shape[ns])] + [(0, 0)])  # noqa
        a = jnp.stack([pad_a(leaf.a) for leaf in leaves], axis=ns)
        b = jnp.stack([pad_b(leaf.b) for leaf in leaves], axis=ns)
        lead = tuple(leaves[0].shape[:ns])
        scales = jnp.broadcast_to(
            jnp.asarray([leaf.scale for leaf in leaves], jnp.float32), lead + (len(leaves),)
        )
        out.append(
            MultiLoraWeight(
                leaves[0].base, a, b, scales, jnp.broadcast_to(index, lead + index.shape)
            )
        )
    if not any(isinstance(leaf, MultiLoraWeight) for leaf in out):
        raise LoraxValueError("lorax.stack: the trees hold no LoRA leaves (lorax.wrap them first)")
    return jax.tree_util.tree_unflatten(treedef, out)
