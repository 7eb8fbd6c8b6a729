"""Lorax leaves: frozen-base-plus-trainable-parts weights that stand in for dense arrays.

A lorax leaf is a frozen dataclass registered as a pytree. It holds arrays (its children)
and static metadata (its aux data), says which fields are trainable, and knows how to act
for the dense weight it stands for:

* ``materialize()`` gives the dense array (used by ``lorax.merge`` and as the fallback);
* ``dot_general`` / ``conv_general_dilated`` / ``gather`` / ``astype`` / ``transpose`` /
  ``reshape`` compute what the primitive would give on the dense weight without forming it,
  or return ``NotImplemented`` to let the interpreter fall back to ``materialize()``.

Leaves know nothing of the interpreter (``lorax.transform``): the interpreter hands them the
other operands, the primitive's params and a ``bind`` callback that applies the original
primitive to plain arrays. A new leaf kind is one new class here and no edit elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
Bind = Callable[..., Array]


class LoraxLeaf:
    """Base class of every lorax leaf kind.

    Subclasses are frozen dataclasses made pytrees with :func:`register_leaf`. They set
    ``trainable_fields`` to the names of their trainable children and implement ``shape``,
    ``dtype`` and ``materialize``; the primitive methods are optional.
    """

    trainable_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def dtype(self) -> Any:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def materialize(self) -> Array:
        """The dense weight this leaf stands for, in ``self.dtype``."""
        raise NotImplementedError

    # Primitive methods: each returns NotImplemented when it cannot avoid the dense weight.
    def dot_general(self, other: Array, *, dimension_numbers, leaf_is_lhs: bool, precision,
                    preferred_element_type, bind: Bind) -> Array:
        return NotImplemented

    def conv_general_dilated(self, lhs: Array, *, dimension_numbers, feature_group_count: int,
                             batch_group_count: int, bind: Bind) -> Array:
        return NotImplemented

    def gather(self, indices: Array, *, params: dict[str, Any], bind: Bind) -> Array:
        return NotImplemented

    def astype(self, dtype: Any) -> "LoraxLeaf":
        return NotImplemented

    def transpose(self, permutation: Sequence[int]) -> "LoraxLeaf":
        return NotImplemented

    def reshape(self, new_sizes: Sequence[int]) -> "LoraxLeaf":
        return NotImplemented


class OverBase(LoraxLeaf):
    """A leaf made of a frozen ``base`` (array or lorax leaf, e.g. NF4) plus trainable parts:
    shape and dtype are the base's, and ``cast_fields`` are the arrays a cast converts."""

    cast_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    def base_dot(self, other: Array, *, dimension_numbers, leaf_is_lhs: bool, precision,
                 preferred_element_type, bind: Bind) -> Array:
        """``dot_general`` with the base alone (NotImplemented if a base leaf cannot)."""
        if isinstance(self.base, LoraxLeaf):
            return self.base.dot_general(
                other, dimension_numbers=dimension_numbers, leaf_is_lhs=leaf_is_lhs,
                precision=precision, preferred_element_type=preferred_element_type, bind=bind)
        return bind(self.base, other) if leaf_is_lhs else bind(other, self.base)

    def astype(self, dtype: Any) -> "LoraxLeaf":
        if not jnp.issubdtype(dtype, jnp.floating):
            return NotImplemented
        base = self.base.astype(dtype)
        if base is NotImplemented:
            return NotImplemented
        return dataclasses.replace(self, base=base, **{
            name: getattr(self, name).astype(dtype) for name in self.cast_fields})


LEAF_KINDS: dict[str, type] = {}  # class name -> class, for checkpoints to rebuild leaves


def register_leaf(cls: type) -> type:
    """Makes ``cls`` a frozen dataclass pytree; fields with ``metadata={"static": True}``
    become aux data, every other field a child (so key paths name the fields)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    LEAF_KINDS[cls.__name__] = cls
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static", False)]
    meta = [f.name for f in fields if f.metadata.get("static", False)]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static_field(**kwargs: Any) -> Any:
    return dataclasses.field(metadata={"static": True}, **kwargs)


def is_lorax_leaf(x: Any) -> bool:
    """True for a lorax leaf (the ``is_leaf`` to use when mapping over wrapped trees)."""
    return isinstance(x, LoraxLeaf)


def materialize(x: Any) -> Any:
    """Dense value of a lorax leaf; anything else is returned unchanged."""
    return x.materialize() if is_lorax_leaf(x) else x
