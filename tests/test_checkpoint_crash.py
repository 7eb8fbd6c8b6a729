"""Checkpoints survive a process killed (SIGKILL) in the middle of a save: at every instant
the path holds one complete checkpoint, and a load never returns a half-written tree.

Real subprocesses save in a loop, each version's adapter arrays filled with its number, and
are killed at several moments; the parent then loads what is on disk and checks that every
array belongs to one version, no older than the last save that returned.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lorax
from lorax.io import checkpoint

CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, orbax.checkpoint as ocp
    import lorax
    mode, path, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if not exchange:  # the two-rename swap of platforms without renameat2
        lorax.io.checkpoint._renameat2 = None
    params = {"q": {"kernel": jnp.zeros((128, 256))}, "v": {"kernel": jnp.zeros((256, 128))}}
    lp = lorax.wrap(params, rank=16)
    trainable, frozen = lorax.split(lp)
    sync = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=2)
    manager = ocp.CheckpointManager(path, options=sync) if mode == "manager" else None
    for i in range(1, 10_000):
        version = lorax.combine(jax.tree.map(lambda x: jnp.full_like(x, i), trainable), frozen)
        if mode == "force":
            lorax.save(path, version, force=True)
        elif mode == "plain":
            lorax.save(f"{path}/{i}", version)
        else:
            lorax.save(manager, version, step=i)
        print(i, flush=True)
""")

BASE = {"q": {"kernel": jnp.zeros((128, 256))}, "v": {"kernel": jnp.zeros((256, 128))}}


def _version(tree) -> int:
    """The one version every adapter array of ``tree`` holds (fails on a mixed tree)."""
    trainable, _ = lorax.split(tree)
    values = {float(v) for x in jax.tree.leaves(trainable) for v in np.unique(np.asarray(x))}
    assert len(values) == 1 and float(int(values.pop())) >= 1, "a half-written tree loaded"
    return int(np.asarray(jax.tree.leaves(trainable)[0]).flat[0])


def _start(mode, path, exchange):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(path), str(int(exchange))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


# (mode, renameat2 exchange, seconds after the first completed save at which to kill)
RUNS = [
    ("force", True, 0.0),
    ("force", True, 0.25),
    ("force", False, 0.05),
    ("force", False, 0.3),
    ("plain", True, 0.15),
    ("manager", True, 0.15),
]


def test_killed_saves_leave_one_complete_checkpoint(tmp_path):
    children = []
    for n, (mode, exchange, delay) in enumerate(RUNS):  # all at once: they share the CPUs
        path = tmp_path / f"{n}-{mode}"
        children.append((mode, path, delay, _start(mode, path, exchange)))
    for mode, path, delay, child in children:
        first = child.stdout.readline()
        assert first.strip() == "1", f"the {mode} child failed before its first save"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        announced = [int(line) for line in [first] + child.stdout.read().split()]
        last = max(announced)
        if mode == "force":
            assert _version(lorax.load(path, BASE)) >= last
            lorax.save(path, lorax.wrap(BASE, rank=2), force=True)  # the next save recovers
            assert lorax.load(path, BASE)["q"]["kernel"].rank == 2
            assert sorted(
                p.name for p in path.parent.iterdir() if p.name.startswith(path.name)
            ) == [path.name]
        elif mode == "plain":
            # every numbered checkpoint is complete or absent; the announced ones are there
            for step in range(1, last + 2):
                if (path / str(step)).exists():
                    assert _version(lorax.load(path / str(step), BASE)) == step
                else:
                    assert step > last
        else:
            with ocp.CheckpointManager(path) as manager:
                assert manager.latest_step() >= last
                assert _version(lorax.load(manager, BASE)) == manager.latest_step()


def _wrapped(value):
    lp = lorax.wrap(BASE, rank=4)
    trainable, frozen = lorax.split(lp)
    return lorax.combine(jax.tree.map(lambda x: jnp.full_like(x, value), trainable), frozen)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_crash_inside_the_two_rename_swap(tmp_path, monkeypatch, fail_at):
    """Where the OS has no atomic exchange, a crash between the renames (or before the old
    copy is deleted) still leaves a checkpoint that load reads and the next save repairs."""
    path = tmp_path / "adapter"
    lorax.save(path, _wrapped(1))
    monkeypatch.setattr(checkpoint, "_renameat2", None)
    calls = {"n": 0}
    real_rename, real_rmtree = os.rename, checkpoint.shutil.rmtree

    def dying(real):
        def step(*args, **kwargs):
            if "orbax" in str(args[0]):  # orbax's own renames inside its write
                return real(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)

        return step

    # the swap's steps, in order: rename old aside, rename new in, delete old
    monkeypatch.setattr(checkpoint.os, "rename", dying(real_rename))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", dying(real_rmtree))
    with pytest.raises(KeyboardInterrupt):
        lorax.save(path, _wrapped(2), force=True)
    monkeypatch.undo()
    loaded = _version(lorax.load(path, BASE))
    assert loaded == (1 if fail_at == 1 else 2)  # old before the swap, new from its middle
    lorax.save(path, _wrapped(3), force=True)
    assert _version(lorax.load(path, BASE)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_overwrite_refuses_what_is_not_a_lorax_checkpoint(tmp_path):
    lp = _wrapped(1)
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.npy").write_text("precious")
    with ocp.StandardCheckpointer() as c:  # an orbax checkpoint of something else
        c.save(tmp_path / "other", {"x": jnp.ones(3)})
    for name in ["notes.txt", "data", "other"]:
        with pytest.raises(lorax.CheckpointError, match=f"'.*{name}'.*not a lorax checkpoint"):
            lorax.save(tmp_path / name, lp, force=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert (tmp_path / "data" / "x.npy").read_text() == "precious"
    assert (tmp_path / "other").is_dir()
    with pytest.raises(lorax.CheckpointError, match="already exists; pass force=True"):
        lorax.save(tmp_path / "data", lp)
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    lorax.save(tmp_path / "empty", lp)
    assert _version(lorax.load(tmp_path / "empty", BASE)) == 1


def test_manager_errors_instead_of_dropping_a_save(tmp_path, monkeypatch):
    lp = _wrapped(1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(lorax.CheckpointError, match="'ckpt/run' is relative.*abspath"):
        lorax.save(ocp.CheckpointManager("ckpt/run"), lp, step=1)
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        lorax.save(manager, lp, step=1)
        with pytest.raises(lorax.CheckpointError, match="step 1 already exists"):
            lorax.save(manager, _wrapped(2), step=1)
        manager.wait_until_finished()
        assert _version(lorax.load(manager, BASE)) == 1


def test_non_finite_adapter_is_not_saved(tmp_path):
    lorax.save(tmp_path / "good", _wrapped(1))
    with pytest.raises(lorax.NonFiniteError, match="'q/kernel/a' holds inf or NaN"):
        lorax.save(tmp_path / "good", _wrapped(np.nan), force=True)
    assert _version(lorax.load(tmp_path / "good", BASE)) == 1
    lorax.save(tmp_path / "debug", _wrapped(np.inf), check_finite=False)  # when asked to


def test_half_a_split_is_refused_naming_the_path(tmp_path):
    trainable, frozen = lorax.split(_wrapped(1))
    with pytest.raises(lorax.LoraxError, match="'q/kernel' has no base.*combine"):
        lorax.save(tmp_path / "t", trainable)
    with pytest.raises(lorax.LoraxError, match="'q/kernel' has no 'a'.*combine"):
        lorax.save(tmp_path / "f", frozen)
    assert not any(tmp_path.iterdir())
