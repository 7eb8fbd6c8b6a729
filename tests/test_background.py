"""Runs tests/background (the main job, examples/finetune_gpt2.py, end to end, the
benchmark scripts' and experiments' smoke runs, and the comparisons with peft's AdaLoRA,
DoRA, merging and IA3 code: long, compile-bound, one device as everywhere else) in a
process of its own that starts when collection ends, so that they run beside the rest of
the suite on the core it leaves idle; this test waits for it and reports its log."""

import os
import sys
from pathlib import Path

from background_process import Background

ROOT = Path(__file__).resolve().parents[1]
ENV_FLAG = "LORAX_TESTS_IN_BACKGROUND"  # set in the child: conftest collects the folder there

_RUN = Background()


def start() -> None:
    """Starts the child (once); conftest calls this when collection is done."""
    _RUN.start(
        [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "background")],
        cwd=ROOT,
        env={**os.environ, ENV_FLAG: "1"},
    )


def test_background_suite():
    start()  # already running when conftest started it
    returncode, tail = _RUN.wait(timeout=1500)
    assert returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
