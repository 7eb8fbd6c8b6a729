"""Two processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train
sharded LoRA steps on one 8-device mesh and save; this process reloads the adapter onto
another mesh and checks it against the same steps run on one device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lorax
from lorax.models import partitioning
from tests.helpers import assert_tree_close
from tests.multidevice.multihost_setup import setup, train

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices to reload on")
def test_two_processes_train_save_and_reload_elsewhere(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the worker sets 4 devices per process
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "multidevice" / "multihost_worker.py"),
                str(i),
                str(port),
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        finally:
            p.kill()
        logs.append(out)
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)

    model, lp, ids = setup()
    want, want_losses = train(model, lp, ids)  # the same steps on one device
    got_losses = json.loads((tmp_path / "losses.json").read_text())
    np.testing.assert_allclose(got_losses, want_losses, rtol=2e-5)

    # Reload on one process, onto a base placed on another mesh (TP 8): resharded on read.
    mesh = partitioning.make_mesh("tp=8")
    base = _base(lp)
    specs = partitioning.logical_axes(base)
    placed = lorax.shard(base, specs, mesh=mesh, rules=partitioning.RULES["tp"])
    loaded = lorax.load(tmp_path / "adapter", placed)
    assert_tree_close(lorax.split(loaded)[0], want, rtol=1e-4, atol=1e-5)
    exported = lorax.import_peft(tmp_path / "peft", _base(lp), model=model)
    assert_tree_close(lorax.split(exported)[0], want, rtol=1e-4, atol=1e-5)
    b = loaded["ScanLayers"]["attn"]["c_attn"]["kernel"].b
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")  # derived, on TP 8


def _base(lp):
    """The base weights of a wrapped tree (the frozen half, with each LoRA leaf's base)."""
    return jax.tree.map(
        lambda x: x.base if isinstance(x, lorax.LoraWeight) else x, lp, is_leaf=lorax.is_lorax_leaf
    )
