"""Adapter-only checkpoints with orbax: the trainable arrays of every lorax leaf plus the
metadata that rebuilds the leaves on a base (kind, rank, scale, the base's shape).

A checkpoint is one orbax composite of two items, ``adapter`` (the arrays) and ``lorax``
(JSON metadata), written to a temporary directory and renamed when complete, so a crash
mid-save leaves the previous checkpoint as it was. Pass an ``orbax.checkpoint.
CheckpointManager`` instead of a path for step-numbered checkpoints (``max_to_keep``,
``latest_step``, async saves: its options apply as set).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lorax.errors import LoraxFileNotFoundError, LoraxValueError
from lorax.leaves import LEAF_KINDS, is_lorax_leaf
from lorax.targets import path_str

FORMAT, VERSION = "lorax-adapter", 1


def adapter_state(tree: Any) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The arrays a checkpoint holds (``"{path}/{field}"`` -> array) and its metadata."""
    arrays, leaves = {}, {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]:
        if not is_lorax_leaf(leaf) or not getattr(leaf, "trainable_fields", ()):
            continue  # dense or quantized base weights are not written
        path = path_str(key_path)
        fields = dataclasses.fields(leaf)
        frozen = [f.name for f in fields if not f.metadata.get("static")
                  and f.name not in leaf.trainable_fields]
        if frozen not in (["base"], []):
            raise LoraxValueError(f"lorax.save: '{path}' ({type(leaf).__name__}) has frozen fields "
                                  f"{frozen}; a checkpoint can rebuild leaves whose only frozen "
                                  "field is 'base'")
        static = {f.name: getattr(leaf, f.name) for f in fields if f.metadata.get("static")}
        entry = {"kind": type(leaf).__name__, "static": static, "has_base": bool(frozen),
                 "base_shape": list(leaf.shape), "fields": {}}
        for name in leaf.trainable_fields:
            value = getattr(leaf, name)
            if value is None:
                raise LoraxValueError(f"lorax.save: '{path}' has no '{name}'; save the combined "
                                      "tree (lorax.combine(trainable, frozen)), not one half")
            arrays[f"{path}/{name}"] = value
            entry["fields"][name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
        leaves[path] = entry
    if not leaves:
        raise LoraxValueError("lorax.save: the tree has no adapter leaves (nothing trainable to "
                              "save); wrap it with lorax.wrap first")
    return arrays, {"format": FORMAT, "version": VERSION, "leaves": leaves}


def save(target: str | os.PathLike | ocp.CheckpointManager, tree: Any,
         step: int | None = None, *, force: bool = False) -> None:
    """Saves the adapter of ``tree`` (never its base weights).

    Args:
      target: a directory, or an ``orbax.checkpoint.CheckpointManager``.
      tree: a wrapped tree (``lorax.wrap``, or ``lorax.combine(trainable, frozen)``).
      step: the step number; required with a manager.
      force: overwrite an existing directory (plain paths only).

    Example:
      >>> import jax.numpy as jnp, lorax, tempfile
      >>> lp = lorax.wrap({"w": jnp.ones((8, 8))}, rank=2)
      >>> path = tempfile.mkdtemp() + "/adapter"
      >>> lorax.save(path, lp)
      >>> lorax.load(path, {"w": jnp.ones((8, 8))})["w"].a.shape
      (8, 2)
    """
    arrays, metadata = adapter_state(tree)
    args = ocp.args.Composite(adapter=ocp.args.StandardSave(arrays),
                              lorax=ocp.args.JsonSave(metadata))
    if isinstance(target, ocp.CheckpointManager):
        if step is None:
            raise LoraxValueError("lorax.save: a CheckpointManager needs step=")
        target.save(step, args=args)
        return
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(Path(target).absolute(), args=args, force=force)


def load(source: str | os.PathLike | ocp.CheckpointManager, base: Any,
         step: int | None = None) -> Any:
    """Rebuilds the wrapped tree: the saved adapter on ``base``.

    Args:
      source: a directory written by :func:`save`, or a ``CheckpointManager``.
      base: the base parameters (dense, or quantized with ``lorax.quantize``) of the same
        structure and shapes as when saved.
      step: with a manager, the step to load; default the latest.

    Returns:
      ``base`` with the saved lorax leaves in place.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: not a lorax checkpoint, a corrupt one, a base of other shapes, or adapter
        paths the base lacks (each error names the path).
    """
    manager = source if isinstance(source, ocp.CheckpointManager) else None
    if manager is not None:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise LoraxFileNotFoundError(f"lorax.load: no checkpoint for step {step} in "
                                         f"{manager.directory} (steps: {manager.all_steps()})")
        where = f"{manager.directory} step {step}"
        restore = lambda args: manager.restore(step, args=args)  # noqa: E731
    else:
        path = Path(source).absolute()
        if not path.is_dir():
            raise LoraxFileNotFoundError(f"lorax.load: no checkpoint directory at '{path}'")
        where = str(path)

        def restore(args):
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                return checkpointer.restore(path, args=args)

    try:
        metadata = restore(ocp.args.Composite(lorax=ocp.args.JsonRestore()))["lorax"]
    except Exception as e:
        raise LoraxValueError(f"lorax.load: '{where}' is not a lorax adapter checkpoint (no "
                              f"readable 'lorax' metadata): {type(e).__name__}: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise LoraxValueError(f"lorax.load: '{where}' holds metadata of another format")
    if metadata.get("version", 0) > VERSION:
        raise LoraxValueError(f"lorax.load: '{where}' was written by a newer lorax (format "
                              f"version {metadata['version']} > {VERSION})")
    entries = metadata["leaves"]
    abstract = {f"{path}/{name}": jax.ShapeDtypeStruct(tuple(f["shape"]), np.dtype(f["dtype"]))
                for path, entry in entries.items() for name, f in entry["fields"].items()}
    try:
        arrays = restore(ocp.args.Composite(adapter=ocp.args.StandardRestore(abstract)))
        arrays = arrays["adapter"]
    except Exception as e:
        raise LoraxValueError(f"lorax.load: the adapter arrays in '{where}' cannot be read "
                              f"(corrupt or incomplete checkpoint): {type(e).__name__}: {e}"
                              ) from e
    return attach(base, entries, arrays, where)


def attach(base: Any, entries: dict[str, Any], arrays: dict[str, Any], where: str) -> Any:
    """Puts saved leaves on ``base`` by path, checking each base shape."""
    found = set()

    def rebuild(key_path, leaf):
        path = path_str(key_path)
        entry = entries.get(path)
        if entry is None:
            return leaf
        found.add(path)
        if is_lorax_leaf(leaf) and getattr(leaf, "trainable_fields", ()):
            raise LoraxValueError(f"lorax.load: '{path}' of the base already has an adapter; pass "
                                  "the base parameters")
        if tuple(leaf.shape) != tuple(entry["base_shape"]):
            raise LoraxValueError(f"lorax.load: the adapter for '{path}' was trained on a base of "
                                  f"shape {tuple(entry['base_shape'])}; this base has "
                                  f"{tuple(leaf.shape)} there")
        cls = LEAF_KINDS.get(entry["kind"])
        if cls is None:
            raise LoraxValueError(f"lorax.load: '{path}' is a {entry['kind']}, which this lorax "
                                  "does not know")
        trained = {name: arrays[f"{path}/{name}"] for name in entry["fields"]}
        if not entry.get("has_base", True):  # a fully trained weight replaces the base's
            return cls(**trained, **entry["static"])
        return cls(base=leaf, **trained, **entry["static"])

    out = jax.tree_util.tree_map_with_path(rebuild, base, is_leaf=is_lorax_leaf)
    missing = sorted(set(entries) - found)
    if missing:
        raise LoraxValueError(f"lorax.load: the checkpoint '{where}' has adapters for {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, which the base does not have")
    return out
