"""The code in the documentation runs: every ```python block of README.md and docs/**/*.md.

Each file is one story: its blocks run in order in one fresh namespace, in a fresh
temporary working directory (so a page can write checkpoints to relative paths). A block is
left out only when the line before its fence is ``<!-- skip: why -->``; the reason is
required and printed with the results (keep such blocks rare: GPU, network, long runs).

All files run in one child process, so that what a page registers (a rule, a leaf kind)
stays out of the rest of the test session, with XLA's CPU backend optimizing less: the
blocks are dominated by compiling many small programs, not by running them. A densify
warning is an error there: no page may form a dense weight by accident.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from background_process import Background

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n`]*$")
SKIP = re.compile(r"^\s*<!--\s*skip\b:?\s*(?P<why>.*?)\s*-->\s*$", re.S)
# 8 simulated devices: the sharding examples build an FSDP 4 x TP 2 mesh
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line of the first code line, code, skip reason or None)`` of each python block."""
    return parse(path.read_text(encoding="utf-8"), name(path))


def parse(text: str, where: str) -> list[tuple[int, str, str | None]]:
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        start = OPEN.match(lines[i])
        if not start:
            i += 1
            continue
        indent, lang = start["indent"], start["lang"]
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{where}:{i + 1}: a code fence is never closed")
        if lang == "python":
            code = "\n".join(
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[i + 1 : j]
            )
            skip = SKIP.match(_comment_before(lines, i))
            why = " ".join(skip["why"].split()) if skip else None
            out.append((i + 2, code + "\n", why))
        i = j + 1
    return out


def _comment_before(lines: list[str], i: int) -> str:
    """The HTML comment (possibly over several lines) that ends on the last non-blank line
    before line ``i``, or that line itself."""
    k = next((k for k in range(i - 1, -1, -1) if lines[k].strip()), None)
    if k is None:
        return ""
    if not lines[k].rstrip().endswith("-->"):
        return lines[k]
    first = next((j for j in range(k, -1, -1) if "<!--" in lines[j]), k)
    return "\n".join(lines[first : k + 1])


def run_files(paths: list[Path], workdir: Path) -> dict[str, dict]:
    """Runs each file's blocks (in this process) in a directory of its own under
    ``workdir``: ``{file: {"error": traceback or None, "output", "seconds", "skipped"}}``."""
    import contextlib
    import io
    import linecache
    import time
    import traceback
    import warnings

    import lorax

    results = {}
    for path in paths:
        here = workdir / name(path).replace("/", "_")
        here.mkdir(parents=True)
        os.chdir(here)
        namespace = {"__name__": f"docs_{path.stem}"}
        result = results[name(path)] = {"error": None, "skipped": [], "output": ""}
        out, start = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("error", lorax.LoraxDensifyWarning)
            for line, code, skip in blocks(path):
                where = f"{name(path)}:{line}"
                if skip is not None:
                    result["skipped"].append(f"{where}: {skip}")
                    continue
                # registered so that a traceback shows the block's own lines
                linecache.cache[where] = (len(code), None, code.splitlines(True), where)
                try:
                    exec(compile(code, where, "exec"), namespace)
                except BaseException:  # noqa: BLE001 - reported, with the block's lines
                    result["error"] = traceback.format_exc()
                    break
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["output"] = out.getvalue()[-4000:]
    return results


_RUN = Background()
_WORK: list[Path] = []


def start() -> None:
    """Starts the child process in the background (once); conftest calls this when
    collection is done, so the pages run beside the other tests (the child compiles on one
    core, mostly while the main process waits on the other)."""
    if _RUN.started:
        return
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="lorax-docs-"))
    _WORK.append(work)
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip(),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
    }
    files = [str(p) for p in FILES if blocks(p)]
    _RUN.start([sys.executable, __file__, str(work), *files], env=env, cwd=work)


@pytest.fixture(scope="module")
def results():
    start()  # already running when conftest started it
    returncode, tail = _RUN.wait(timeout=900)
    assert returncode == 0, tail
    work = _WORK[0]
    found = json.loads((work / "results.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    with_time = sorted(found.items(), key=lambda kv: -kv[1]["seconds"])
    print("\n" + "\n".join(f"  {r['seconds']:6.1f}s  {f}" for f, r in with_time))
    for _f, r in with_time:
        for s in r["skipped"]:
            print(f"  not run: {s}")
    return found


@pytest.mark.parametrize("path", [p for p in FILES if blocks(p)], ids=name)
def test_python_blocks_run(results, path):
    result = results[name(path)]
    assert result["error"] is None, (
        f"{name(path)}: a block failed\n{result['error']}\n--- its output ---\n{result['output']}"
    )


@pytest.mark.parametrize("path", FILES, ids=name)
def test_skipped_blocks_say_why(path):
    for line, _, skip in blocks(path):
        assert skip is None or skip, f"{name(path)}:{line}: <!-- skip: ... --> needs a reason"


def test_blocks_are_found():
    assert len(FILES) > 3 and sum(len(blocks(p)) for p in FILES) > 10
    text = (
        "text\n<!-- skip: needs a GPU -->\n```python\nx = 1\n```\n```bash\nls\n```\n"
        "- item\n\n    ```python\n    y = 2\n    ```\n<!-- skip: long\n  run -->\n\n"
        "```python\nz = 3\n```\n<!-- a note -->\n```python\nw = 4\n```\n"
    )
    assert parse(text, "t.md") == [
        (4, "x = 1\n", "needs a GPU"),
        (12, "y = 2\n", None),
        (18, "z = 3\n", "long run"),
        (22, "w = 4\n", None),
    ]


if __name__ == "__main__":  # the child process: python tests/test_docs.py WORKDIR FILE...
    workdir = Path(sys.argv[1])
    found = run_files([Path(p) for p in sys.argv[2:]], workdir / "run")
    (workdir / "results.json").write_text(json.dumps(found, indent=1))
