"""A process that runs beside the test session: conftest starts it once when collection
ends, and the test that reports on it waits for it (tests/test_multidevice.py,
tests/test_background.py, tests/test_docs.py)."""

from __future__ import annotations

import subprocess
import tempfile
from typing import Any


class Background:
    """One child process, its output kept in a temporary file until it is waited for."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log: Any = None

    @property
    def started(self) -> bool:
        return self.proc is not None

    def start(self, args: list[str], **popen: Any) -> None:
        """Starts ``args`` (once: a second call does nothing)."""
        if self.proc is not None:
            return
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - read by wait()
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, text=True, **popen
        )

    def wait(self, timeout: float) -> tuple[int | None, str]:
        """Waits for the child (killed after ``timeout`` seconds); returns its exit code and
        the last 8000 characters of its output."""
        assert self.proc is not None, "the background process was never started"
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
        self.log.seek(0)
        tail = self.log.read()[-8000:]
        self.log.close()
        return self.proc.returncode, tail
