"""Tree surgery on wrapped trees: split / combine, mask, merge (equinox's partition style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from lorax.errors import LoraxValueError, NotMergeableError
from lorax.leaf import LoraxLeaf, is_lorax_leaf
from lorax.paths import path_str


def _leaf_parts(leaf: LoraxLeaf) -> tuple[LoraxLeaf, LoraxLeaf]:
    """The leaf with only its trainable fields, and with only its frozen ones."""
    return (
        leaf.replace(**dict.fromkeys(leaf.frozen_fields)),
        leaf.replace(**dict.fromkeys(leaf.trainable_fields)),
    )


def split(params: Any, /) -> tuple[Any, Any]:
    """Splits a wrapped tree into ``(trainable, frozen)``, with ``None`` in the holes.

    Args:
      params: a tree from ``lorax.wrap`` (or any pytree).

    Returns:
      ``trainable`` holds only the adapter arrays (e.g. LoRA ``a``, ``b``); ``frozen`` holds
      everything else. Differentiate and optimize ``trainable`` only; ``lorax.combine``
      puts them back together.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, rank=2)
      >>> trainable, frozen = lorax.split(lp)
      >>> [x.shape for x in jax.tree.leaves(trainable)]
      [(8, 2), (2, 8)]
    """
    trainable = jax.tree.map(
        lambda x: _leaf_parts(x)[0] if is_lorax_leaf(x) else None, params, is_leaf=is_lorax_leaf
    )
    frozen = jax.tree.map(
        lambda x: _leaf_parts(x)[1] if is_lorax_leaf(x) else x, params, is_leaf=is_lorax_leaf
    )
    return trainable, frozen


def combine(trainable: Any, frozen: Any, /) -> Any:
    """Inverse of :func:`split`: fills each ``None`` of one tree from the other.

    Args:
      trainable: the first tree of :func:`split` (possibly updated by an optimizer).
      frozen: the second tree of :func:`split`.

    Returns:
      The wrapped tree.

    Raises:
      ValueError: if the trees do not line up (the message names the first path that
        differs), or if a lorax leaf's trainable arrays do not fit its frozen base (e.g. an
        adapter of another rank or for another base; the message names the path).

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((8, 8))}, rank=2)
      >>> t, f = lorax.split(lp)
      >>> lorax.combine(t, f)["w"].a.shape
      (8, 2)
    """
    from lorax.sharding import is_box

    is_hole = lambda x: x is None or is_box(x)  # noqa: E731 - a Flax box is one value

    def pick(path, t, f):
        if t is not None and f is not None:
            raise LoraxValueError(
                f"lorax.combine: '{path_str(path)}' is set in both trees; "
                "expected it in exactly one (trees from lorax.split)"
            )
        return f if t is None else t

    try:
        # The trainable tree leads: each hole takes the frozen subtree there, whole (a
        # frozen NF4 base is one hole in the trainable tree).
        out = jax.tree_util.tree_map_with_path(pick, trainable, frozen, is_leaf=is_hole)
    except ValueError as err:
        if "set in both trees" in str(err):
            raise
        t_flat, t_def = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=is_hole)
        f_flat, f_def = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=is_hole)
        raise LoraxValueError(
            "lorax.combine: the trainable and frozen trees do not line up: "
            + _first_difference(t_flat, f_flat, t_def, f_def)
        ) from None
    # Shapes only (static under jit): a mismatch would otherwise fail deep inside the model.
    from lorax.sharding import unbox_leaf

    for key_path, leaf in jax.tree_util.tree_leaves_with_path(out, is_leaf=is_lorax_leaf):
        if is_lorax_leaf(leaf):
            leaf = unbox_leaf(leaf)[0]
            _check_whole(
                leaf,
                path_str(key_path),
                "lorax.combine",
                "it is in neither tree (trees from one lorax.split?)",
            )
            problem = leaf.misfit()
            if problem:
                raise LoraxValueError(f"lorax.combine: at '{path_str(key_path)}' {problem}")
    return out


def holes(leaf: LoraxLeaf) -> list[str]:
    """The array fields of ``leaf`` that are None: what :func:`split` leaves out of each
    half. Only leaves with trainable fields are split (a whole frozen base, NF4 included,
    becomes one None); a leaf without any, e.g. an NF4 base, may have optional None fields
    (no double quantization) and is never a half."""
    if not leaf.trainable_fields:
        return []
    return [
        name
        for name in (*leaf.trainable_fields, *leaf.frozen_fields)
        if getattr(leaf, name) is None and name not in leaf.optional_fields
    ]


def _check_whole(leaf: LoraxLeaf, path: str, where: str, why: str) -> None:
    """Refuses a lorax leaf with None fields when its other fields are arrays (half of a
    split); trees of other things (shardings, labels) are let through."""
    missing = holes(leaf)
    if missing and any(hasattr(x, "shape") for x in jax.tree.leaves(leaf)):
        raise LoraxValueError(
            f"{where}: the {type(leaf).__name__} at '{path}' has no "
            f"{', '.join(repr(m) for m in missing)}: {why}"
        )


def _first_difference(t_flat, f_flat, t_def, f_def) -> str:
    t_paths = [path_str(p) for p, _ in t_flat]
    f_paths = [path_str(p) for p, _ in f_flat]
    for a, b in zip(t_paths, f_paths, strict=False):
        if a != b:
            return f"trainable has '{a}' where frozen has '{b}'"
    if len(t_paths) != len(f_paths):
        longer, name = (
            (t_paths, "trainable") if len(t_paths) > len(f_paths) else (f_paths, "frozen")
        )
        return f"{name} has extra entries from '{longer[min(len(t_paths), len(f_paths))]}'"
    return f"same paths but different node types or metadata:\n  {t_def}\n  {f_def}"


def mask(params: Any, /) -> Any:
    """A bool tree of ``params``'s structure: True on trainable adapter arrays.

    ``lorax.optimizer(tx, lp)`` uses it; to build your own, make labels for
    ``optax.multi_transform`` from it, or pair ``optax.masked(tx, mask)`` with
    ``optax.set_to_zero`` on the rest: ``optax.masked`` alone passes the raw gradient
    through where the mask is False, so biases would move.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, rank=2)
      >>> jax.tree.leaves(lorax.mask(lp))
      [False, False, True, True]
    """
    trainable, _ = split(params)
    return jax.tree.map(lambda t, x: t is not None, trainable, params, is_leaf=lambda x: x is None)


def merge(params: Any, /) -> Any:
    """Replaces every lorax leaf by its dense weight (for export or plain inference).

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((8, 8))}, rank=2)
      >>> lorax.merge(lp)["w"].shape
      (8, 8)
    """

    from lorax.sharding import rebox, unbox_leaf

    def dense(key_path, x):
        if not is_lorax_leaf(x):
            return x
        x, box = unbox_leaf(x)  # Flax boxes: the dense weight gets the weight's box
        _check_whole(
            x,
            path_str(key_path),
            "lorax.merge",
            "this is one half of lorax.split; lorax.combine(trainable, frozen) first",
        )
        try:
            return rebox(x.materialize(), box)
        except NotMergeableError as e:  # e.g. a bottleneck adapter: say where
            raise NotMergeableError(f"lorax.merge: '{path_str(key_path)}': {e}") from None

    return jax.tree_util.tree_map_with_path(dense, params, is_leaf=is_lorax_leaf)


def attach(
    params: Any,
    build: Callable[[str, Any], Any],
    *,
    what: str,
    error: type[Exception] = LoraxValueError,
) -> tuple[Any, set[str]]:
    """Puts adapters read from a file on ``params``: the one walk of ``lorax.load`` and
    ``lorax.import_peft``.

    ``build(path, leaf)`` returns the new lorax leaf for a path, or None to keep the leaf.
    A leaf that is adapted already is refused (an adapter goes on the base), and each new
    leaf is checked with ``misfit`` (the check of :func:`combine`), so a mismatch fails here,
    by path, not later inside a model.

    Returns:
      The new tree and the set of paths that got an adapter (the callers check it against
      what the file holds).
    """
    found: set[str] = set()

    def visit(key_path: Any, leaf: Any) -> Any:
        path = path_str(key_path)
        new = build(path, leaf)
        if new is None:
            return leaf
        if is_lorax_leaf(leaf) and leaf.trainable_fields:
            raise LoraxValueError(
                f"{what}: '{path}' of the base already has an adapter; pass the base parameters"
            )
        problem = new.misfit()
        if problem:
            raise error(f"{what}: the adapter for '{path}' does not fit: {problem}")
        found.add(path)
        return new

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_lorax_leaf), found
