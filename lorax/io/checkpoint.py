"""Adapter-only checkpoints with orbax: the trainable arrays of every lorax leaf plus the
metadata that rebuilds the leaves on a base (kind, rank, scale, the base's shape).

A checkpoint is one orbax composite of two items, ``adapter`` (the arrays) and ``lorax``
(JSON metadata), written to a temporary directory and renamed when complete, so a crash
mid-save leaves the previous checkpoint as it was. Pass an ``orbax.checkpoint.
CheckpointManager`` instead of a path for step-numbered checkpoints (``max_to_keep``,
``latest_step``, async saves: its options apply as set).
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lorax import tree
from lorax.errors import (
    CheckpointError,
    LoraxFileNotFoundError,
    LoraxKeyError,
    LoraxValueError,
    NonFiniteError,
)
from lorax.leaf import LEAF_KINDS, is_lorax_leaf, leaf_kind
from lorax.paths import path_str

# Version 2 records leaf kinds by their registered names ("lora"); version 1 recorded class
# names ("LoraWeight"), which the kinds keep as aliases, so both load.
FORMAT, VERSION = "lorax-adapter", 2


def saved_fields(cls: type) -> tuple[str, ...]:
    """The fields a checkpoint holds for a leaf kind: its trainable arrays and any frozen
    state of its own (AdaLoRA's rank mask), everything but the base it goes on."""
    return (*cls.trainable_fields, *(n for n in cls.frozen_fields if n != "base"))


def adapter_state(tree: Any) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The arrays a checkpoint holds (``"{path}/{field}"`` -> array) and its metadata."""
    from lorax.sharding import unbox

    arrays, leaves = {}, {}
    tree = unbox(tree)  # Flax partitioning boxes: their values
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]:
        if not is_lorax_leaf(leaf) or not leaf.trainable_fields:
            continue  # dense or quantized base weights are not written
        path = path_str(key_path)
        if any(getattr(leaf, name) is None for name in leaf.frozen_fields):
            raise LoraxValueError(
                f"lorax.save: '{path}' has no base (the trainable half of "
                "lorax.split?); save the combined tree "
                "(lorax.combine(trainable, frozen))"
            )
        static = {name: getattr(leaf, name) for name in leaf.static_fields}
        entry = {
            "kind": leaf.kind,
            "static": static,
            "has_base": "base" in leaf.frozen_fields,
            "base_shape": list(leaf.shape),
            "fields": {},
        }
        for name in saved_fields(type(leaf)):
            value = getattr(leaf, name)
            if value is None and name in leaf.optional_fields:
                continue  # a factor this leaf's layout does without (LoKr's w1_b)
            if value is None:
                raise LoraxValueError(
                    f"lorax.save: '{path}' has no '{name}'; save the combined "
                    "tree (lorax.combine(trainable, frozen)), not one half"
                )
            arrays[f"{path}/{name}"] = value
            entry["fields"][name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
        leaves[path] = entry
    if not leaves:
        raise LoraxValueError(
            "lorax.save: the tree has no adapter leaves (nothing trainable to "
            "save); wrap it with lorax.wrap first"
        )
    metadata = {"format": FORMAT, "version": VERSION, "leaves": leaves}
    metadata["digest"] = digest(leaves, arrays)
    return arrays, metadata


def host_value(x: Any) -> np.ndarray:
    """The whole value of an array on this host; an array sharded over several processes
    is gathered from all of them (adapters are small), so every process calls this."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def digest(leaves: dict[str, Any], arrays: dict[str, Any]) -> str:
    """SHA-256 of the metadata and every array's bytes: a checkpoint edited or corrupted
    after it was written no longer matches it."""
    h = hashlib.sha256(json.dumps(leaves, sort_keys=True).encode())
    for name in sorted(arrays):
        value = host_value(arrays[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def save(
    target: str | os.PathLike | ocp.CheckpointManager,
    tree: Any,
    /,
    *,
    step: int | None = None,
    force: bool = False,
    check_finite: bool = True,
) -> None:
    """Saves the adapter of ``tree`` (never its base weights).

    A save never loses the checkpoint it replaces: the new one is written completely beside
    the target and then swapped in with a rename, so at every instant, even if the process
    is killed, the path holds one complete checkpoint (the old or the new) that
    :func:`load` reads.

    Args:
      target: a directory, or an ``orbax.checkpoint.CheckpointManager`` (whose directory
        must be absolute, as orbax requires).
      tree: a wrapped tree (``lorax.wrap``, or ``lorax.combine(trainable, frozen)``).
      step: the step number; required with a manager.
      force: replace an existing lorax checkpoint at ``target`` (plain paths only). A file,
        or a directory that is not a lorax checkpoint, is never replaced.
      check_finite: refuse adapter arrays holding inf or NaN (a diverged run must not
        overwrite a good checkpoint).

    Raises:
      CheckpointError: the target exists (without ``force``), is not a lorax checkpoint,
        the manager already has ``step``, or its directory is relative.
      NonFiniteError: an adapter array holds inf or NaN (naming its path).

    Example:
      >>> import jax.numpy as jnp, lorax, tempfile
      >>> lp = lorax.wrap({"w": jnp.ones((8, 8))}, rank=2)
      >>> path = tempfile.mkdtemp() + "/adapter"
      >>> lorax.save(path, lp)
      >>> lorax.save(path, lp, force=True)        # replaces it atomically
      >>> lorax.load(path, {"w": jnp.ones((8, 8))})["w"].a.shape
      (8, 2)
    """
    arrays, metadata = adapter_state(tree)
    if check_finite:
        _check_finite(arrays)
    args = ocp.args.Composite(
        adapter=ocp.args.StandardSave(arrays), lorax=ocp.args.JsonSave(metadata)
    )
    if isinstance(target, ocp.CheckpointManager):
        _check_manager(target, "save")
        if step is None:
            raise LoraxValueError("lorax.save: a CheckpointManager needs step=")
        if force:
            raise LoraxValueError(
                "lorax.save: force=True is for plain paths; to replace a "
                "step of a CheckpointManager, delete it first "
                "(manager.delete(step))"
            )
        if step in target.all_steps():
            raise CheckpointError(
                f"lorax.save: step {step} already exists in "
                f"'{target.directory}'; the manager would keep the old one "
                "and drop this save. Save another step, or delete it first "
                "(manager.delete(step))."
            )
        target.save(step, args=args)
        return
    _save_to_path(Path(target).absolute(), args, force)


def _check_finite(arrays: dict[str, jax.Array]) -> None:
    for name, value in arrays.items():
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(host_value(value)).all():
            raise NonFiniteError(
                f"lorax.save: '{name}' holds inf or NaN; nothing was written "
                "(pass check_finite=False to save it anyway)"
            )


def _check_manager(manager: ocp.CheckpointManager, verb: str) -> None:
    # orbax fails on relative paths deep inside (and, saving asynchronously, only logs it)
    if not Path(str(manager.directory)).is_absolute():
        raise CheckpointError(
            f"lorax.{verb}: the CheckpointManager's directory '{manager.directory}' is "
            "relative; orbax needs an absolute one: "
            f"CheckpointManager(os.path.abspath('{manager.directory}'), ...)"
        )


# --------------------------------------------------------------------------------------
# Writing a plain path: complete beside the target, then swapped in by rename
# --------------------------------------------------------------------------------------
#
# The new checkpoint goes to ``<name>.lorax-new-<n>`` (orbax itself writes there through a
# temporary directory it renames when complete), then replaces ``<name>``: in one atomic
# exchange where the OS has one (Linux renameat2), else in two renames (old aside to
# ``<name>.lorax-old-<n>``, new into place). A process killed between those two renames
# leaves no ``<name>`` but two complete siblings; :func:`_recovered` finds the newest
# (load reads it; the next save moves it back into place).

_SIBLING = re.compile(r"\.lorax-(new|old)-(\d+)$")


def _save_to_path(path: Path, args: Any, force: bool) -> None:
    _restore_interrupted(path)
    if path.exists() or path.is_symlink():
        if not (path.is_dir() and not any(path.iterdir())):  # an empty directory: no loss
            if not force:
                raise CheckpointError(
                    f"lorax.save: '{path}' already exists; pass force=True "
                    "to replace the lorax checkpoint there"
                )
            if not is_checkpoint(path):
                raise CheckpointError(
                    f"lorax.save: refusing to replace '{path}': it is "
                    f"{'a file' if not path.is_dir() else 'a directory'} that is not a lorax "
                    "checkpoint (force=True replaces lorax checkpoints only)"
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.time_ns()
    if jax.process_count() > 1:  # every process writes its shards into the same directory
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    new = path.with_name(f"{path.name}.lorax-new-{stamp}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(new, args=args)
    if jax.process_index() == 0:  # one process swaps it in (a shared filesystem)
        if path.is_dir() and any(path.iterdir()):
            _replace_dir(new, path)
        else:
            if path.is_dir():
                path.rmdir()
            os.rename(new, path)
        _remove_leftovers(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lorax.save {path}")


def _replace_dir(new: Path, path: Path) -> None:
    """Puts the complete directory ``new`` at ``path`` and deletes the old one there."""
    if _exchange(new, path):  # ``new`` now holds the old checkpoint
        shutil.rmtree(new)
        return
    old = path.with_name(f"{path.name}.lorax-old-{time.time_ns()}")
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directories (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or file system cannot."""
    if _renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _find_renameat2() -> Any:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _find_renameat2()


def _siblings(path: Path) -> list[tuple[bool, int, Path]]:
    """The ``<name>.lorax-{new,old}-<n>`` directories beside ``path``: new ones (the save
    that was under way) first, then old ones, newest first."""
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.iterdir():
        m = _SIBLING.fullmatch(p.name[len(path.name) :]) if p.name.startswith(path.name) else None
        if m:
            found.append((m.group(1) == "new", int(m.group(2)), p))
    return sorted(found, reverse=True)


def _recovered(path: Path) -> Path | None:
    """Where the checkpoint of ``path`` is when a save was killed mid-swap: the newest
    complete sibling (None if there is none)."""
    for _, _, p in _siblings(path):
        if is_checkpoint(p):
            return p
    return None


def _restore_interrupted(path: Path) -> None:
    if not path.exists() and (found := _recovered(path)) is not None:
        os.rename(found, path)
        _remove_leftovers(path)


def _remove_leftovers(path: Path) -> None:
    """Siblings of an interrupted save (``path`` itself is complete when this runs)."""
    for _, _, p in _siblings(path):
        shutil.rmtree(p, ignore_errors=True)
    for p in path.parent.glob(f"{glob.escape(path.name)}.lorax-new-*.orbax-checkpoint-tmp*"):
        shutil.rmtree(p, ignore_errors=True)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding a complete lorax adapter checkpoint."""
    path = Path(path)
    try:
        metadata = json.loads((path / "lorax" / "metadata").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(metadata, dict)
        and metadata.get("format") == FORMAT
        and (path / "adapter").is_dir()
    )


def load(
    source: str | os.PathLike | ocp.CheckpointManager, base: Any, /, *, step: int | None = None
) -> Any:
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
      CheckpointError: a corrupt checkpoint, or one whose metadata or arrays were edited
        after the save (a SHA-256 digest of both is written with them).
      ValueError: not a lorax checkpoint, a base of other shapes or of an integer dtype, or
        adapter paths the base lacks (each error names the path).
    """
    manager = source if isinstance(source, ocp.CheckpointManager) else None
    if manager is not None:
        _check_manager(manager, "load")
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise LoraxFileNotFoundError(
                f"lorax.load: no checkpoint for step {step} in "
                f"{manager.directory} (steps: {manager.all_steps()})"
            )
        where = f"{manager.directory} step {step}"
        restore = lambda args: manager.restore(step, args=args)  # noqa: E731
    else:
        path = Path(source).absolute()  # type: ignore[arg-type]  # a path here (see above)
        if not path.exists() and (found := _recovered(path)) is not None:
            path = found  # a save was killed mid-swap: its complete sibling
        if not path.is_dir():
            raise LoraxFileNotFoundError(f"lorax.load: no checkpoint directory at '{path}'")
        where = str(path)

        def restore(args):
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                return checkpointer.restore(path, args=args)

    try:
        metadata = restore(ocp.args.Composite(lorax=ocp.args.JsonRestore()))["lorax"]
    except Exception as e:
        raise LoraxValueError(
            f"lorax.load: '{where}' is not a lorax adapter checkpoint (no "
            f"readable 'lorax' metadata): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise LoraxValueError(f"lorax.load: '{where}' holds metadata of another format")
    if metadata.get("version", 0) > VERSION:
        raise LoraxValueError(
            f"lorax.load: '{where}' was written by a newer lorax (format "
            f"version {metadata['version']} > {VERSION})"
        )
    entries = _checked_entries(metadata.get("leaves"), where)
    shardings = _adapter_shardings(base, entries)
    abstract = {
        key: jax.ShapeDtypeStruct(
            tuple(f["shape"]), np.dtype(f["dtype"]), sharding=shardings.get(key)
        )
        for path, entry in entries.items()
        for name, f in entry["fields"].items()
        for key in [f"{path}/{name}"]
    }
    try:
        arrays = restore(ocp.args.Composite(adapter=ocp.args.StandardRestore(abstract)))
        arrays = dict(arrays["adapter"])
    except Exception as e:
        raise CheckpointError(
            f"lorax.load: the adapter arrays in '{where}' cannot be read "
            f"(corrupt or incomplete checkpoint): {type(e).__name__}: {e}"
        ) from e
    if set(arrays) != set(abstract) or any(
        tuple(arrays[k].shape) != a.shape or arrays[k].dtype != a.dtype for k, a in abstract.items()
    ):
        raise CheckpointError(
            f"lorax.load: the adapter arrays in '{where}' are not those its "
            "metadata lists (corrupt or edited checkpoint)"
        )
    if "digest" in metadata and metadata["digest"] != digest(entries, arrays):
        raise CheckpointError(
            f"lorax.load: '{where}' does not match the digest written with "
            "it: its metadata or arrays were edited or corrupted after the "
            "save"
        )
    return attach(base, entries, arrays, where)


def _checked_entries(entries: Any, where: str) -> dict[str, Any]:
    """The metadata's leaf entries, each checked for what rebuilding a leaf relies on."""

    def bad(path: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"lorax.load: the metadata of '{where}' for '{path}' {what} "
            "(corrupt or edited checkpoint)"
        )

    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"lorax.load: the metadata of '{where}' lists no adapter leaves")
    for path, entry in entries.items():
        if not isinstance(entry, dict) or not {"kind", "static", "base_shape", "fields"} <= set(
            entry
        ):
            raise bad(path, "lacks kind / static / base_shape / fields")
        try:
            cls = leaf_kind(entry["kind"])
        except LoraxKeyError:
            known = sorted({c.kind for c in LEAF_KINDS.values()})
            raise bad(
                path,
                f"names the leaf kind {entry['kind']!r}, which this lorax does "
                f"not know (known: {known})",
            ) from None
        fields, static = entry["fields"], entry["static"]
        required = set(saved_fields(cls)) - set(cls.optional_fields)
        if not isinstance(fields, dict) or not required <= set(fields) <= set(saved_fields(cls)):
            listed = sorted(fields) if isinstance(fields, dict) else fields
            raise bad(
                path,
                f"lists the fields {listed!r}; a {cls.__name__} saves {sorted(saved_fields(cls))}",
            )
        for name, f in fields.items():
            shape, dtype = (f.get("shape"), f.get("dtype")) if isinstance(f, dict) else (0, None)
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise bad(path, f"gives '{name}' the shape {shape!r}")
            try:
                floating = dtype is not None and jnp.issubdtype(np.dtype(dtype), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise bad(path, f"gives '{name}' the dtype {dtype!r}; adapters are floating")
        statics = {f.name: f for f in dataclasses.fields(cls) if f.name in cls.static_fields}
        if not isinstance(static, dict) or not set(static) <= set(statics):
            raise bad(path, f"has static fields {static!r}; a {cls.__name__} has {sorted(statics)}")
        for name, value in static.items():
            default = statics[name].default
            if isinstance(default, float) and not (
                type(value) in (int, float) and math.isfinite(value)
            ):
                raise bad(path, f"gives {name} the value {value!r}; a finite number is needed")
            if isinstance(default, (str, bool)) and type(value) is not type(default):
                raise bad(
                    path, f"gives {name} the value {value!r}; a {type(default).__name__} is needed"
                )
        if static.get("scale", 1.0) == 0 or not 0 <= static.get("dropout", 0.0) < 1:
            raise bad(
                path,
                f"has scale {static.get('scale')!r} / dropout "
                f"{static.get('dropout')!r}; a nonzero scale and a dropout in "
                "[0, 1) are needed",
            )
        shape = entry["base_shape"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(path, f"gives the base the shape {shape!r}")
    return entries


def _adapter_shardings(base: Any, entries: dict[str, Any]) -> dict[str, Any]:
    """Where each saved array goes: a base weight placed on a mesh (``NamedSharding``) gets
    its adapter with the specs ``lorax.partition_specs`` derives, whatever mesh it was saved
    from (orbax reads each process's slices); other bases (one device, or a quantized base
    whose dense spec is unknown: replicated on its mesh) as before."""
    from jax.sharding import NamedSharding, PartitionSpec

    from lorax.paths import FlatTree
    from lorax.sharding import field_specs

    flat = FlatTree.of(base)
    by_path = dict(zip(flat.paths, flat.leaves, strict=True))
    out: dict[str, Any] = {}
    for path, entry in entries.items():
        leaf = by_path.get(path)
        arrays = [x for x in jax.tree.leaves(leaf) if isinstance(x, jax.Array)]
        named = [x.sharding for x in arrays if isinstance(x.sharding, NamedSharding)]
        if not named:
            continue
        mesh = named[0].mesh
        assert leaf is not None  # it holds arrays
        if is_lorax_leaf(leaf) or not entry.get("has_base", True):
            spec = named[0].spec if not is_lorax_leaf(leaf) else PartitionSpec()
            for name in entry["fields"]:
                fspec = spec if not entry.get("has_base", True) else PartitionSpec()
                out[f"{path}/{name}"] = NamedSharding(mesh, fspec)
            continue
        try:
            shape = lambda f: jax.ShapeDtypeStruct(tuple(f["shape"]), np.dtype(f["dtype"]))  # noqa: E731
            fields = {name: shape(f) for name, f in entry["fields"].items()}
            stand_in = leaf_kind(entry["kind"])(
                base=jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), **fields, **entry["static"]
            )
            specs = field_specs(stand_in, leaf.sharding.spec, mesh=mesh)
        except Exception:  # noqa: BLE001 - a mismatch is reported by attach, by path
            continue
        for name in entry["fields"]:
            out[f"{path}/{name}"] = NamedSharding(mesh, getattr(specs, name))
    return out


def attach(base: Any, entries: dict[str, Any], arrays: dict[str, Any], where: str) -> Any:
    """Puts saved leaves on ``base`` by path, checking each base shape."""

    def rebuild(path: str, leaf: Any) -> Any:
        entry = entries.get(path)
        if entry is None:
            return None
        if tuple(leaf.shape) != tuple(entry["base_shape"]):
            raise LoraxValueError(
                f"lorax.load: the adapter for '{path}' was trained on a base of "
                f"shape {tuple(entry['base_shape'])}; this base has "
                f"{tuple(leaf.shape)} there"
            )
        cls = leaf_kind(entry["kind"])
        trained = {name: arrays[f"{path}/{name}"] for name in entry["fields"]}
        if not entry.get("has_base", True):  # a fully trained weight replaces the base's
            return cls(**trained, **entry["static"])
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise LoraxValueError(
                f"lorax.load: the base at '{path}' is {jnp.dtype(leaf.dtype)}"
                "; an adapter goes on a floating weight (or an NF4 / int8 "
                "leaf from lorax.quantize)"
            )
        return cls(base=leaf, **trained, **entry["static"])

    out, found = tree.attach(base, rebuild, what=f"lorax.load ({where})", error=CheckpointError)
    missing = sorted(set(entries) - found)
    if missing:
        raise LoraxValueError(
            f"lorax.load: the checkpoint '{where}' has adapters for {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, which the base does not have"
        )
    return out
