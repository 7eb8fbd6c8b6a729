"""Checkpoints of named adapters (:class:`lorax.AdapterSet`): one ``lorax.save`` per adapter
in a subdirectory, and a JSON manifest of the names, their order and the active one.

Layout of ``dir``::

    adapters.json      {"format": "lorax-adapters", "version": 1, "active": "b",
                        "adapters": [{"name": "a", "dir": "0"}, {"name": "b", "dir": "1"}]}
    0/, 1/, ...        one lorax adapter checkpoint each (any name is allowed: the
                       subdirectories are numbered, the manifest maps names to them)

An existing directory is handled as ``lorax.save`` handles one: refused without
``force=True``, replaced only when it holds named adapters, and never lost: the new one is
written completely beside it and swapped in with a rename.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax

from lorax.errors import (
    CheckpointError,
    LoraxError,
    LoraxFileNotFoundError,
    LoraxTypeError,
    LoraxValueError,
)
from lorax.io import checkpoint
from lorax.methods.named import AdapterSet, _attach

FORMAT, VERSION, MANIFEST = "lorax-adapters", 1, "adapters.json"


def is_adapters_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a complete checkpoint of named adapters."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def save_adapters(dir: str | os.PathLike, adapters: AdapterSet, /, *, force: bool = False) -> None:
    """Saves every adapter of ``adapters`` (never the base), with their names, their order
    and the active one.

    Args:
      dir: the directory to write.
      adapters: a :class:`lorax.AdapterSet`.
      force: replace an existing checkpoint of named adapters at ``dir``; a file, or a
        directory holding anything else, is never replaced.

    Raises:
      CheckpointError: ``dir`` exists (without ``force``) or is not a checkpoint of named
        adapters.
      LoraxTypeError: ``adapters`` is not a :class:`lorax.AdapterSet`.
      NonFiniteError: an adapter holds inf or NaN (nothing is written).
      LoraxValueError: called in a job of several processes (not supported yet).

    Example:
      >>> import jax.numpy as jnp, lorax, tempfile
      >>> params = {"w": jnp.ones((8, 4))}
      >>> ads = lorax.AdapterSet.create(lorax.wrap(params, rank=2), name="a")
      >>> ads = ads.add("b", lorax.wrap(params, rank=3)).select("b")
      >>> path = tempfile.mkdtemp() + "/adapters"
      >>> lorax.save_adapters(path, ads)
      >>> back = lorax.load_adapters(path, params)
      >>> back.names, back.active, back.tree()["w"].rank
      (('a', 'b'), 'b', 3)
    """
    if not isinstance(adapters, AdapterSet):
        raise LoraxTypeError(
            f"lorax.save_adapters: expected a lorax.AdapterSet; got {type(adapters).__name__} "
            "(lorax.save writes one wrapped tree)"
        )
    if jax.process_count() > 1:  # the renames and the manifest are not coordinated yet
        raise LoraxValueError(
            "lorax.save_adapters: runs in one process only; with several, save each adapter "
            "with lorax.save(path, adapters.select(name).tree())"
        )
    path = Path(dir).absolute()
    _restore_interrupted(path)
    if path.exists() or path.is_symlink():
        if not (path.is_dir() and not any(path.iterdir())):  # an empty directory: no loss
            if not force:
                raise CheckpointError(
                    f"lorax.save_adapters: '{path}' already exists; pass force=True to "
                    "replace the named adapters there"
                )
            if not is_adapters_dir(path):
                raise CheckpointError(
                    f"lorax.save_adapters: refusing to replace '{path}': it is "
                    f"{'a file' if not path.is_dir() else 'a directory'} that holds no named "
                    "adapters (force=True replaces those only)"
                )
    for name, own in adapters.adapters.items():  # refuse inf / NaN before writing anything
        arrays, _ = checkpoint.adapter_state(_attach(adapters.base, own))
        try:
            checkpoint._check_finite(arrays)
        except LoraxError as e:
            raise type(e)(f"lorax.save_adapters: adapter '{name}': {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    new = path.with_name(f"{path.name}.lorax-new-{time.time_ns()}")
    new.mkdir()
    entries = []
    for i, (name, own) in enumerate(adapters.adapters.items()):
        checkpoint.save(new / str(i), _attach(adapters.base, own), check_finite=False)
        entries.append({"name": name, "dir": str(i)})
    manifest = {"format": FORMAT, "version": VERSION, "active": adapters.active}
    manifest["adapters"] = entries
    (new / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it complete
    if path.is_dir() and any(path.iterdir()):
        checkpoint._replace_dir(new, path)
    else:
        if path.is_dir():
            path.rmdir()
        os.rename(new, path)
    checkpoint._remove_leftovers(path)


def _restore_interrupted(path: Path) -> None:
    """A save killed between its two renames leaves no ``path`` but complete siblings:
    the newest goes back into place."""
    if path.exists():
        return
    for _, _, p in checkpoint._siblings(path):
        if is_adapters_dir(p):
            os.rename(p, path)
            checkpoint._remove_leftovers(path)
            return


def load_adapters(dir: str | os.PathLike, base: Any, /) -> AdapterSet:
    """Reads what :func:`save_adapters` wrote, onto ``base``.

    Args:
      dir: the directory.
      base: the base parameters (dense, or quantized with ``lorax.quantize``), of the same
        structure and shapes as when saved.

    Returns:
      The :class:`lorax.AdapterSet`: the same names in the same order, the same one active
      (or disabled).

    Raises:
      FileNotFoundError: no directory there.
      CheckpointError: the directory holds no named adapters, or a manifest that is not
        valid; errors of ``lorax.load`` name the adapter.

    Example:
      >>> import jax.numpy as jnp, lorax, tempfile
      >>> params = {"w": jnp.ones((8, 4))}
      >>> path = tempfile.mkdtemp() + "/adapters"
      >>> lorax.save_adapters(path, lorax.AdapterSet.create(lorax.wrap(params, rank=2)))
      >>> lorax.load_adapters(path, params).names
      ('default',)
    """
    path = Path(dir).absolute()
    _restore_interrupted(path)
    if not path.is_dir():
        raise LoraxFileNotFoundError(f"lorax.load_adapters: no directory at '{path}'")
    if not is_adapters_dir(path):
        raise CheckpointError(
            f"lorax.load_adapters: '{path}' holds no named adapters (no readable "
            f"{MANIFEST}); a single adapter is read with lorax.load"
        )
    manifest = json.loads((path / MANIFEST).read_text())
    entries, active = manifest.get("adapters"), manifest.get("active")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(
            f"lorax.load_adapters: '{path}' was written by a newer lorax (version "
            f"{manifest['version']} > {VERSION})"
        )
    ok = isinstance(entries, list) and all(
        isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and e["name"]
        and isinstance(e.get("dir"), str)
        and Path(e["dir"]).name == e["dir"] not in ("", ".", "..")
        for e in entries
    )
    names = [e["name"] for e in entries] if ok else []
    if not ok or len(set(names)) != len(names) or (active is not None and active not in names):
        raise CheckpointError(
            f"lorax.load_adapters: the manifest of '{path}' is not valid (corrupt or edited): "
            f"adapters {entries!r}, active {active!r}"
        )
    adapters = None
    for e in entries:
        try:
            tree = checkpoint.load(path / e["dir"], base)
        except LoraxError as err:
            raise type(err)(f"lorax.load_adapters: adapter '{e['name']}': {err}") from None
        if adapters is None:
            adapters = AdapterSet.create(tree, name=e["name"])
        else:
            adapters = adapters.add(e["name"], tree)
    if adapters is None:  # saved with no adapters: the base alone
        return AdapterSet(base=base, adapters={}, active=None)
    return adapters.select(active) if active is not None else adapters.disable()
