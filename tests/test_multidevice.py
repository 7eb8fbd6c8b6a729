"""Runs tests/multidevice (sharded and multi-process training) in a process of its own with
8 simulated CPU devices: XLA_FLAGS must be set before JAX starts, and this process keeps
one device so that every other test runs as on a plain machine."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


_RUN: dict = {}


def start() -> None:
    """Starts the multi-device suite in the background (once); conftest calls this when
    collection is done, so it runs beside the rest of the tests."""
    if _RUN or len(jax.devices()) >= 8:
        return
    # no backend optimization: the compiles dominate, and both sides of each comparison
    # run under the same flags
    flags = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    )
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - read by the test, later
    _RUN["log"] = log
    _RUN["proc"] = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-x", str(ROOT / "tests" / "multidevice")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.skipif(len(jax.devices()) >= 8, reason="collected directly on 8 devices")
def test_multidevice_suite_on_8_simulated_devices():
    start()  # already running when conftest started it
    proc, log = _RUN["proc"], _RUN["log"]
    try:
        proc.wait(timeout=1500)
    finally:
        proc.kill()
    log.seek(0)
    tail = log.read()[-8000:]
    log.close()
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail
