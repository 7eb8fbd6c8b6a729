"""Runs tests/background (the main job, examples/finetune_gpt2.py, end to end, and the
benchmark scripts' smoke runs: long, compile-bound, one device as everywhere else) in a
process of its own that starts when collection ends, so that they run beside the rest of
the suite on the core it leaves idle; this test waits for it and reports its log."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_FLAG = "LORAX_TESTS_IN_BACKGROUND"  # set in the child: conftest collects the folder there

_RUN: dict = {}


def start() -> None:
    """Starts the child (once); conftest calls this when collection is done."""
    if _RUN:
        return
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - read by the test, later
    _RUN["log"] = log
    _RUN["proc"] = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "background")],
        cwd=ROOT,
        env={**os.environ, ENV_FLAG: "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_background_suite():
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
    assert " passed" in tail and " failed" not in tail, tail
