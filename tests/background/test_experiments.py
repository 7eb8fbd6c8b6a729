"""experiments/run.py --quick end to end: the files it writes and their schema, and the counts
it reports checked against the model's shapes (the measured values are never asserted)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
RUN_KEYS = {
    "variant",
    "method",
    "rank",
    "targets",
    "seed",
    "trainable",
    "trainable_percent",
    "held_out_loss",
    "perplexity",
    "accuracy",
    "train_seconds",
    "peak_bytes",
    "flops",
    "seconds_per_step",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    sys.path.insert(0, str(EXPERIMENTS))
    import run

    out = tmp_path_factory.mktemp("experiments")
    return run, out, run.main(["--quick", "--out", str(out)])


def test_quick_run_writes_every_file(quick):
    _, out, _ = quick
    for name in ("rank", "memory", "targets", "delta"):
        assert isinstance(json.loads((out / f"{name}.json").read_text()), dict)
    report = (out / "report.md").read_text()
    for heading in ("## 1. Rank", "## 2. Memory", "## 3. Target", "## 4. The learned update"):
        assert heading in report
    for png in (
        "accuracy_vs_params.png",
        "memory_vs_accuracy.png",
        "singular_values.png",
        "subspace_similarity.png",
    ):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report


def test_runs_have_the_schema_and_the_tables_their_rows(quick):
    run, _, results = quick
    sizes = run.QUICK
    rank = results["rank"]["runs"]
    assert {r["variant"] for r in rank} == {"full", *(f"lora r={r}" for r in sizes.ranks)}
    memory = {r["method"] for r in results["memory"]["runs"]}
    assert memory == {"full", "lora", "qlora", "dora", "ia3", "adalora"}
    assert {r["targets"] for r in results["targets"]["runs"]} == set(sizes.target_sets)
    for name in ("rank", "memory", "targets"):
        runs = results[name]["runs"]
        assert len(runs) == len({r["variant"] for r in runs}) * sizes.seeds
        for r in runs:
            assert r.keys() >= RUN_KEYS, RUN_KEYS - r.keys()
            assert math.isfinite(r["held_out_loss"]) and r["peak_bytes"] > 0
            assert 0.0 <= r["accuracy"] <= 1.0


def test_trainable_counts_follow_the_shapes(quick):
    """LoRA at rank r on a d x k weight trains r * (d + k); full fine-tuning trains all."""
    run, _, results = quick
    s = run.QUICK
    d, f = s.hidden, s.ffn
    per_layer = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d)}
    per_layer |= {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    runs = {r["variant"]: r for r in results["rank"]["runs"] + results["targets"]["runs"]}
    for r in s.ranks:
        want = s.layers * sum(r * (i + o) for i, o in per_layer.values())
        assert runs[f"lora r={r}"]["trainable"] == want
    assert runs[f"lora r={s.budget} Q"]["trainable"] == s.layers * s.budget * 2 * d
    full = runs["full"]
    assert full["trainable_percent"] == pytest.approx(100.0)


def test_delta_analysis_has_each_update_and_the_similarity_grid(quick):
    run, _, results = quick
    small, large = run.QUICK.delta_ranks
    seed = results["delta"]["seeds"][0]
    for name in ("full", f"lora r={small}", f"lora r={large}"):
        modules = seed[name]
        assert modules, name
        for m in modules.values():
            s = np.asarray(m["spectrum"], float).reshape(-1)
            assert np.all(np.diff(s) <= 1e-6 * max(s[0], 1e-30))  # descending
            assert 0.0 <= m[f"energy@{small}"] <= 1.0 + 1e-6
    grids = seed["similarity"]
    assert grids and all(np.shape(g) == (small, large) for g in grids.values())
    assert all(0.0 <= v <= 1.0 + 1e-5 for g in grids.values() for v in np.ravel(g))


def test_mean_spread_is_numpys():
    sys.path.insert(0, str(EXPERIMENTS))
    import report

    values = [0.25, 0.5, 1.5]
    m, s = report.mean_spread(values)
    assert m == pytest.approx(np.mean(values)) and s == pytest.approx(np.std(values, ddof=1))
    assert report.mean_spread([None, 2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in report.mean_spread([]))
