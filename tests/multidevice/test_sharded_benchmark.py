"""benchmarks/sharded.py --quick: the compiled sharded steps and their collectives."""

import importlib.util
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sharded.py"


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_quick_run_reports_every_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the scripts import bench_shapes
    spec = importlib.util.spec_from_file_location("sharded_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--out", str(tmp_path / "sharded.json")])
    assert {(r["method"], r["mesh"]) for r in rows} == {("lora", "fsdp8"), ("dense", "fsdp8")}
    assert (tmp_path / "sharded.json").is_file()
    lora = next(r for r in rows if r["method"] == "lora")
    # structure, not speed: the frozen base is split 8 ways (norm scales, replicated, aside)
    # and no reduction carries a frozen weight's gradient
    assert lora["frozen_bytes_per_device"] * 8 < lora["frozen_bytes_total"] * 1.01
    assert not lora["frozen_sized_reduces"]
