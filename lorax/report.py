"""``lorax.summary``: trainable and total parameters per module, as data and as a table."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lorax.leaf import is_lorax_leaf
from lorax.paths import path_str
from lorax.tree import split


@dataclasses.dataclass(frozen=True)
class ModuleRow:
    module: str
    trainable: int
    total: int
    bytes: int
    rank: int | None = None  # ranks an adaptive-rank leaf (AdaLoRA) keeps, else None

    @property
    def bits_per_param(self) -> float:
        """Bits held per parameter the module stands for (32 for float32, 4.127 for NF4)."""
        return 8 * self.bytes / self.total if self.total else 0.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """Rows per module (the path without its last component) and the totals.

    ``total`` counts the parameters of the model the tree computes (a LoRA leaf counts its
    base's dense size plus its factors); ``bytes`` counts the arrays actually held. A row's
    ``rank`` is the rank its AdaLoRA leaves keep (summed over stacked layers), else None;
    the table shows a ``rank`` column when a row has one.
    """

    rows: tuple[ModuleRow, ...]
    trainable: int
    total: int
    bytes: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def table(self) -> str:
        width = max([len("module")] + [len(r.module) for r in self.rows])
        ranked = any(r.rank is not None for r in self.rows)
        head = (
            f"{'module':<{width}}  {'trainable':>12}  {'total':>14}  {'bytes':>14}  "
            f"{'bits/param':>10}" + (f"  {'rank':>6}" if ranked else "")
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            rank = "" if not ranked else f"  {'' if r.rank is None else r.rank:>6}"
            lines.append(
                f"{r.module:<{width}}  {r.trainable:>12,}  {r.total:>14,}  "
                f"{r.bytes:>14,}  {r.bits_per_param:>10.3f}{rank}"
            )
        lines.append("-" * len(head))
        bits = 8 * self.bytes / self.total if self.total else 0.0
        lines.append(
            f"{'total':<{width}}  {self.trainable:>12,}  {self.total:>14,}  "
            f"{self.bytes:>14,}  {bits:>10.3f}"
        )
        lines.append(
            f"trainable: {self.trainable:,} of {self.total:,} "
            f"({100 * self.trainable_fraction:.4f}%)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _count(x: Any) -> tuple[int, int]:
    """(parameters the leaf stands for, bytes it holds)."""
    if x is None:
        return 0, 0
    held = sum(
        int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        for a in jax.tree.leaves(x)
        if hasattr(a, "shape")
    )
    if is_lorax_leaf(x):
        # The dense weight it stands for, plus its trainable extras (LoRA factors, ...).
        extras = sum(
            int(np.prod(a.shape))
            for f in x.trainable_fields
            for a in jax.tree.leaves(getattr(x, f))
        )
        return int(np.prod(x.shape)) + extras, held
    if hasattr(x, "shape"):
        return int(np.prod(x.shape)), held
    return 0, 0


def summary(params: Any, /) -> Summary:
    """Counts trainable and total parameters per module of a (wrapped) tree.

    Args:
      params: any parameter tree, typically from ``lorax.wrap``.

    Returns:
      A :class:`Summary`; ``print(summary)`` shows it as a table.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"dense": {"kernel": jnp.ones((16, 16)), "bias": jnp.ones(16)}},
      ...                 rank=2)
      >>> s = lorax.summary(lp)
      >>> s.trainable, s.total
      (64, 336)
    """
    from lorax.sharding import unbox

    params = unbox(params)  # Flax partitioning boxes: count what they hold
    trainable_tree, _ = split(params)
    rows: dict[str, list[int]] = {}
    ranks: dict[str, int] = {}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lorax_leaf)[0]
    t_flat = jax.tree_util.tree_flatten_with_path(
        trainable_tree, is_leaf=lambda x: x is None or is_lorax_leaf(x)
    )[0]
    for (path, leaf), (_, t_leaf) in zip(flat, t_flat, strict=True):
        module = path_str(path).rpartition("/")[0] or "<root>"
        total, held = _count(leaf)
        trainable = 0
        if t_leaf is not None:
            trainable = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t_leaf))
        kept = getattr(leaf, "kept_rank", None) if is_lorax_leaf(leaf) else None
        if kept is not None:
            ranks[module] = ranks.get(module, 0) + kept
        acc = rows.setdefault(module, [0, 0, 0])
        acc[0] += trainable
        acc[1] += total
        acc[2] += held
    out = tuple(ModuleRow(m, *v, rank=ranks.get(m)) for m, v in rows.items())
    return Summary(
        out, sum(r.trainable for r in out), sum(r.total for r in out), sum(r.bytes for r in out)
    )
