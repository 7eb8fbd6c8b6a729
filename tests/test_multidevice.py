"""Runs tests/multidevice (sharded and multi-process training) in a process of its own with
8 simulated CPU devices: XLA_FLAGS must be set before JAX starts, and this process keeps
one device so that every other test runs as on a plain machine."""

import os
import sys
from pathlib import Path

import jax
import pytest
from background_process import Background

ROOT = Path(__file__).resolve().parents[1]


_RUN = Background()


def start() -> None:
    """Starts the multi-device suite in the background (once); conftest calls this when
    collection is done, so it runs beside the rest of the tests."""
    if _RUN.started or len(jax.devices()) >= 8:
        return
    # no backend optimization: the compiles dominate, and both sides of each comparison
    # run under the same flags
    flags = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    )
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    _RUN.start(
        [sys.executable, "-m", "pytest", "-q", "-x", str(ROOT / "tests" / "multidevice")],
        cwd=ROOT,
        env=env,
    )


@pytest.mark.skipif(len(jax.devices()) >= 8, reason="collected directly on 8 devices")
def test_multidevice_suite_on_8_simulated_devices():
    start()  # already running when conftest started it
    returncode, tail = _RUN.wait(timeout=1500)
    assert returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail
