"""The benchmark scripts at tiny shapes: what they build and count is checked independently
(their timings are never asserted)."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax
from lorax.quant import NF4Weight

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    if str(BENCH) not in sys.path:  # train_step imports profile_summary as a sibling
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qlora_65b():
    return load("qlora_65b")


def test_layer_by_layer_nf4_equals_quantizing_the_dense_stack(qlora_65b):
    key, n, shape = jax.random.key(3), 3, (64, 96)
    built = qlora_65b.nf4_layers(key, n, shape, 0.02)
    dense = jnp.stack([0.02 * jax.random.normal(k, shape, jnp.float32)
                       for k in jax.random.split(key, n)])
    reference = lorax.quantize({"ScanLayers": {"kernel": dense}}, "nf4")["ScanLayers"]["kernel"]
    assert isinstance(built, NF4Weight) and built.shape == (n, *shape)
    np.testing.assert_array_equal(built.codes, reference.codes)
    np.testing.assert_array_equal(built.absmax, reference.absmax)  # double-quant codes
    # the mean of the block scales (and so the second-level scales) is summed in another
    # order inside lax.map: equal to rounding
    np.testing.assert_allclose(built.block_absmax(), reference.block_absmax(), rtol=1e-6)


def test_qlora_65b_small_run_trains_every_projection(qlora_65b, tmp_path):
    result = qlora_65b.main(["--small", "--steps", "3", "--out", str(tmp_path)])
    d, ff, layers, r = 256, 688, 4, 16  # the --small config; no GQA
    per_layer = r * (4 * (d + d) + 3 * (d + ff))  # q, k, v, o; gate, up, down
    assert result["trainable_params"] == layers * per_layer
    assert all(np.isfinite(result["losses"]))
    assert result["losses"][-1] < result["losses"][0]
    assert (tmp_path / "qlora_65b.jsonl").read_text().count("\n") == 1


def test_qlora_65b_analyze_accounts_for_every_argument(qlora_65b, tmp_path):
    result = qlora_65b.main(["--small", "--analyze", "--out", str(tmp_path)])
    model = qlora_65b.config_for(type("Args", (), {"small": True, "layers": None})())
    # frozen NF4 + bf16 tree, then float32 factors and AdamW's two moments, the tokens
    trainable_bytes = 3 * 4 * result["trainable_params"]
    tokens_bytes = 4 * result["batch"] * (result["seq"] + 1)
    expected = result["frozen_gb"] * 1e9 + trainable_bytes + tokens_bytes
    assert result["arguments_gb"] * 1e9 == pytest.approx(expected, abs=2e6)
    assert result["aliased_gb"] == pytest.approx(trainable_bytes / 1e9, abs=2e-3)
    assert result["predicted_peak_gb"] > result["arguments_gb"]
    assert model.num_hidden_layers == result["layers"]


def test_profile_summary_attributes_time_to_ops(tmp_path):
    summary_module = load("profile_summary")
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            f(x).block_until_ready()
    summary = summary_module.summarize(str(tmp_path), steps=2)
    assert summary["busy_ms"] > 0 and summary["top"]
    times = [ms for _, _, ms, _ in summary["top"]]
    assert times == sorted(times, reverse=True)
    assert sum(summary["kinds"].values()) == pytest.approx(summary["busy_ms"], rel=1e-3)
    with pytest.raises(FileNotFoundError, match="xplane"):
        summary_module.summarize(str(tmp_path / "empty"))


def test_train_step_counts_and_table(tmp_path):
    train_step = load("train_step")
    row = train_step.measure("gpt2-124m", "lora", small=True, remat=None, steps=2)
    # --small GPT-2: 2 layers, c_attn 128 -> 384, r = 8
    assert row["trainable"] == 2 * 8 * (128 + 384)
    assert np.isfinite(row["loss"]) and row["tok_s"] > 0
    anchors = [dict(model="gpt2-124m", mode="lora", tok_s=row["tok_s"] // 2, step_ms=1.0,
                    peak_gib=1.0),
               dict(model="gpt2-124m", mode="lora+compile", tok_s=row["tok_s"] * 2,
                    step_ms=1.0, peak_gib=1.0)]
    text = train_step.table([row], anchors)
    line = next(li for li in text.splitlines() if li.startswith("| gpt2-124m | lora |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert float(cells[6][:-1]) == pytest.approx(row["tok_s"] / (row["tok_s"] // 2), abs=0.01)
    assert float(cells[7][:-1]) == pytest.approx(0.5, abs=0.01)
    assert cells[8] == "-"
