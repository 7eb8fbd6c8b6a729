"""Trainable tokens (peft's ``TrainableTokensConfig``): a few rows of an embedding table
trainable, e.g. for tokens added to the vocabulary, while the table stays frozen.

The leaf holds the frozen table, the ids of the chosen rows and their new values (``delta``,
initialised to the rows themselves, so the model starts unchanged). A lookup reads the frozen
table's rows and puts the trained rows in at the chosen ids; the table is never copied, and
the optimizer holds state for ``k x d`` values instead of ``V x d``. Other uses of the table
(a tied output head ``h @ E.T``) see the table with the rows replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax._build import Site, build
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import (
    OverBase,
    materialize,
    register_leaf,
    row_lookup,
    shape_of,
    static_field,
    unfit,
)
from lorax.methods.lora import LoraWeight
from lorax.targets import Targets


@register_leaf(kind="trainable_tokens")
class TrainableTokensWeight(OverBase):
    """A frozen embedding table ``(V, d)`` whose rows ``token_ids`` are replaced by ``delta``.

    Attributes:
      base: the frozen table, an array or lorax leaf (e.g. NF4).
      delta: ``(k, d)``, the trainable values of those rows.
      token_ids: the ``k`` distinct row ids in ``[0, V)``, a tuple of ints; static (so
        checkpoints record them, and a lookup compiles them in).
    """

    base: Any
    delta: Any
    token_ids: tuple[int, ...] = static_field(default=())

    trainable_fields: ClassVar[tuple[str, ...]] = ("delta",)
    cast_fields: ClassVar[tuple[str, ...]] = ("delta",)

    def __post_init__(self):  # a checkpoint's JSON gives a list: keep it hashable
        object.__setattr__(self, "token_ids", tuple(int(i) for i in self.token_ids))

    @property
    def ids(self) -> jax.Array:
        return jnp.asarray(self.token_ids, jnp.int32)

    def materialize(self) -> jax.Array:
        table = materialize(self.base)
        return table.at[self.ids].set(self.delta.astype(table.dtype))

    def misfit(self) -> str | None:
        w, delta = tuple(self.shape), shape_of(self.delta)
        problem = super().misfit()
        if problem or delta is None:
            return problem
        if len(w) != 2:
            return f"a trainable-tokens leaf needs a 2-D table (V, d); got {w}"
        if delta != (len(self.token_ids), w[1]):
            return unfit(f"delta {delta} (expected ({len(self.token_ids)}, {w[1]}))", w)
        return None

    def field_axes(self, axes):
        # the table's own placement; the k rows are small: replicated over the table's rows
        return {"base": tuple(axes), "delta": (None, axes[1])}

    def as_lora(self) -> LoraWeight:
        """The same dense weight as a rank-k LoRA leaf: ``W + onehot(ids).T @ (delta -
        W[ids])``, so products with the table (a tied head ``h @ E.T``) cost ``k`` extra
        columns, never a copy of the table."""
        ids = self.ids
        frozen = self.base_apply(
            lambda table: table[ids],
            lambda leaf: getattr(leaf, "dequantize_rows", lambda _: NotImplemented)(ids),
        )
        onehot = jax.nn.one_hot(ids, self.shape[0], dtype=self.delta.dtype).T  # (V, k)
        return LoraWeight(self.base, onehot, self.delta - frozen.astype(self.delta.dtype))

    def dot_general(self, other, **kwargs):
        return self.as_lora().dot_general(other, **kwargs)

    def transpose(self, permutation):
        return self.as_lora().transpose(permutation)

    def gather(self, indices, *, params, bind):
        """The embedding lookup ``table[ids]``: the frozen rows, with the trained rows at the
        chosen ids (any other gather uses the dense table)."""
        rows = row_lookup(self, indices, params)
        if rows is None:
            return NotImplemented
        ids, offset_axis, _ = rows
        frozen = self.base_apply(
            lambda table: bind(table, indices),
            lambda leaf: leaf.gather(indices, params=params, bind=bind),
        )
        frozen = jnp.moveaxis(frozen, offset_axis, -1)  # (*ids, d)
        token_ids = self.ids.astype(ids.dtype).reshape((1,) * ids.ndim + (-1,))
        hits = ids[..., None] == token_ids  # (*ids, k)
        trained = jnp.einsum("...k,kd->...d", hits.astype(self.delta.dtype), self.delta)
        out = jnp.where(hits.any(-1, keepdims=True), trained.astype(frozen.dtype), frozen)
        return jnp.moveaxis(out, -1, offset_axis)


def _token_ids(token_ids: Any, vocab: int, path: str) -> tuple[int, ...]:
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise LoraxTypeError(
            f"lorax.trainable_tokens: token_ids must be a non-empty list of ints; got {token_ids!r}"
        )
    if ids.min() < 0 or ids.max() >= vocab:
        bad = sorted({int(i) for i in ids if not 0 <= i < vocab})
        raise LoraxValueError(
            f"lorax.trainable_tokens: token_ids {bad} are outside the {vocab} rows of '{path}'"
        )
    if len(set(ids.tolist())) != ids.size:
        raise LoraxValueError(f"lorax.trainable_tokens: token_ids repeat ids: {ids.tolist()}")
    return tuple(int(i) for i in ids)


def trainable_tokens(
    params: Any,
    /,
    *,
    targets: Targets,
    token_ids: Sequence[int] | np.ndarray | jax.Array,
) -> Any:
    """Returns ``params`` with the rows ``token_ids`` of the targeted tables trainable.

    Args:
      params: the base parameters (embedding tables ``(vocab, d)``).
      targets: the tables, as for ``lorax.wrap`` (e.g. ``["embed_tokens"]``,
        ``["wte"]``); required, since a model often has several tables (token and
        position) of which only one should change.
      token_ids: the rows to train, distinct ints in ``[0, vocab)``: new tokens, or tokens
        whose meaning should change.

    Returns:
      The tree with :class:`TrainableTokensWeight` leaves on the targeted tables; only their
      ``delta`` (``k x d``) is trainable.

    Raises:
      LoraxValueError, LoraxTypeError: no targets, a targeted leaf that is not a 2-D table,
        or token ids that are empty, not integers, repeated or outside the table.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> p = {"embed": {"embedding": jnp.ones((10, 4))}, "out": {"kernel": jnp.ones((4, 4))}}
      >>> t = lorax.trainable_tokens(p, targets=["embed"], token_ids=[8, 9])
      >>> t["embed"]["embedding"].delta.shape
      (2, 4)
    """
    if targets is None:
        raise LoraxValueError(
            "lorax.trainable_tokens: pass targets= naming the embedding table(s), e.g. "
            "['embed_tokens']"
        )

    def make(site: Site) -> TrainableTokensWeight:
        shape = tuple(site.leaf.shape)
        if len(shape) != 2:
            raise LoraxValueError(
                f"lorax.trainable_tokens: '{site.path}' has shape {shape}; an embedding "
                "table (vocab, d) was expected"
            )
        ids = _token_ids(token_ids, shape[0], site.path)
        rows = materialize(site.leaf)[jnp.asarray(ids)]  # as the model reads them
        dtype = jnp.promote_types(site.leaf.dtype, jnp.float32)
        return TrainableTokensWeight(site.leaf, rows.astype(dtype), token_ids=ids)

    return build(params, make, targets=targets, what="lorax.trainable_tokens")
