"""The benchmark scripts at tiny shapes: what they build and count is checked independently
(their timings are never asserted)."""

import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax
from lorax.quant import NF4Weight

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name):
    if str(BENCH) not in sys.path:  # train_step imports profile_summary as a sibling
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qlora_65b():
    return load("qlora_65b")


def test_layer_by_layer_nf4_equals_quantizing_the_dense_stack(qlora_65b):
    key, n, shape = jax.random.key(3), 3, (64, 96)
    built = qlora_65b.nf4_layers(key, n, shape, 0.02)
    dense = jnp.stack(
        [0.02 * jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(key, n)]
    )
    reference = lorax.quantize({"ScanLayers": {"kernel": dense}}, "nf4")["ScanLayers"]["kernel"]
    assert isinstance(built, NF4Weight) and built.shape == (n, *shape)
    np.testing.assert_array_equal(built.codes, reference.codes)
    np.testing.assert_array_equal(built.absmax, reference.absmax)  # double-quant codes
    # the mean of the block scales (and so the second-level scales) is summed in another
    # order inside lax.map: equal to rounding
    np.testing.assert_allclose(built.block_absmax(), reference.block_absmax(), rtol=1e-6)


def test_qlora_65b_small_run_trains_every_projection(qlora_65b, tmp_path):
    result = qlora_65b.main(["--small", "--steps", "3", "--seq", "64", "--out", str(tmp_path)])
    d, ff, layers, r = 256, 688, 4, 16  # the --small config; no GQA
    per_layer = r * (4 * (d + d) + 3 * (d + ff))  # q, k, v, o; gate, up, down
    assert result["trainable_params"] == layers * per_layer
    assert all(np.isfinite(result["losses"]))
    assert result["losses"][-1] < result["losses"][0]
    assert (tmp_path / "qlora_65b.jsonl").read_text().count("\n") == 1


def test_qlora_65b_analyze_accounts_for_every_argument(qlora_65b, tmp_path):
    result = qlora_65b.main(["--small", "--analyze", "--out", str(tmp_path)])
    # frozen NF4 + bf16 tree, then float32 factors and AdamW's two moments, the tokens
    trainable_bytes = 3 * 4 * result["trainable_params"]
    tokens_bytes = 4 * result["batch"] * (result["seq"] + 1)
    expected = result["frozen_gb"] * 1e9 + trainable_bytes + tokens_bytes
    assert result["arguments_gb"] * 1e9 == pytest.approx(expected, abs=2e6)
    assert result["aliased_gb"] == pytest.approx(trainable_bytes / 1e9, abs=2e-3)
    assert result["predicted_peak_gb"] > result["arguments_gb"]


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
    anchors = [
        dict(model="gpt2-124m", mode="lora", tok_s=row["tok_s"] // 2, step_ms=1.0, peak_gib=1.0),
        dict(
            model="gpt2-124m",
            mode="lora+compile",
            tok_s=row["tok_s"] * 2,
            step_ms=1.0,
            peak_gib=1.0,
        ),
    ]
    text = train_step.table([row], anchors)
    line = next(li for li in text.splitlines() if li.startswith("| gpt2-124m | lora |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert float(cells[6][:-1]) == pytest.approx(row["tok_s"] / (row["tok_s"] // 2), abs=0.01)
    assert float(cells[7][:-1]) == pytest.approx(0.5, abs=0.01)
    assert cells[8] == "-"


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_gpu_train_step_lowers_with_cudnn_flash_attention(mode, monkeypatch):
    """The benchmarks' GPU program, lowered for CUDA on this CPU machine: lorax.lora passes
    the cuDNN fused attention (a custom_vjp around custom calls) through, forward and
    backward, inside nn.scan and remat, over LoRA and NF4 leaves."""
    import optax

    from lorax.models import llama

    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name in (
        "check_cudnn_version",
        "check_compute_capability",
        "is_cuda_compute_capability_equal",
    ):
        if not hasattr(fused, name):
            pytest.skip(f"this JAX has no {name}: the cuDNN checks moved")
    # what a CUDA backend would answer; only the trace and the StableHLO lowering run here
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda c: c == "9.0")

    config = llama.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    model = llama.Llama(
        config,
        jnp.bfloat16,
        scan_layers=True,
        remat_policy="nothing_saveable",
        attention_impl="cudnn",
    )
    params = jax.eval_shape(
        lambda: jax.tree.map(
            lambda x: x.astype(jnp.bfloat16),
            model.clone(attention_impl=None).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))[
                "params"
            ],
        )
    )

    def build(p):
        if mode == "qlora":
            p = lorax.quantize(p, "nf4", targets=r".*ScanLayers/.*kernel")
        return lorax.split(
            lorax.wrap(
                p, rank=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"], dtype=jnp.float32
            )
        )

    trainable, frozen = jax.eval_shape(build, params)
    tx = optax.adamw(1e-4)

    def loss(t, f, tokens):
        logits = lorax.lora(model.apply)({"params": lorax.combine(t, f)}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        ).mean()

    def step(t, s, f, tokens):
        value, grads = jax.value_and_grad(loss)(t, f, tokens)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    tokens = jax.ShapeDtypeStruct((2, 129), jnp.int32)
    lowered = (
        jax.jit(step, donate_argnums=(0, 1))
        .trace(trainable, jax.eval_shape(tx.init, trainable), frozen, tokens)
        .lower(lowering_platforms=("cuda",))
    )
    text = lowered.as_text()
    assert "__cudnn$fmhaSoftmax" in text and "__cudnn$fmhaSoftmaxBackward" in text
    # no dense [layers, d, d] update of a frozen weight: only the factors get gradients
    out_shapes = [x.shape for x in jax.tree.leaves(lowered.out_info)]
    assert max(math.prod(s) for s in out_shapes) < 256 * 256


def test_multi_adapter_benchmark_runs_every_mode(tmp_path):
    results = load("multi_adapter").main(
        [
            "--small",
            "--repeats",
            "1",
            "--adapters",
            "3",
            "--batch",
            "4",
            "--prompt",
            "16",
            "--new",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["mode"] for r in results] == ["merged", "single", "multi"]
    assert [r["adapters"] for r in results] == [1, 1, 3]
    assert all(r["prefill_tok_s"] > 0 and r["generate_tok_s"] > 0 for r in results)
    assert (tmp_path / "multi_adapter.jsonl").read_text().count("\n") == 3


@pytest.fixture(scope="module")
def peers():
    return load("peers")


def _numpy_decoder_loss(params, tokens, shape) -> float:
    """The loss of lowrank_cost's decoder with hand LoRA, in float64 numpy on the merged
    weights ``W + s A B``: the reference the benchmark's three methods must reproduce."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    s = shape.alpha / shape.rank

    def dense(m, x):
        w = m["kernel"] + s * m["lora_a"] @ m["lora_b"] if "lora_a" in m else m["kernel"]
        return x @ w

    def norm(m, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * m["scale"] + m["bias"]

    def gelu(x):  # flax's default, the tanh approximation
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    inputs, labels = np.asarray(tokens[:, :-1]), np.asarray(tokens[:, 1:])
    b, n = inputs.shape
    h, dh = shape.heads, shape.d // shape.heads
    x = p["embed"]["embedding"][inputs] + p["pos"][:n]
    for i in range(shape.layers):
        blk = p[f"block_{i}"]
        a = norm(blk["ln1"], x)
        q, k, v = (dense(blk["attn"][c], a).reshape(b, n, h, dh) for c in "qkv")
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + dense(blk["attn"]["o"], np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, -1))
        x = x + dense(blk["fc2"], gelu(dense(blk["fc1"], norm(blk["ln2"], x))))
    logits = dense(p["head"], norm(p["ln_f"], x))
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, labels[..., None], -1).mean())


def test_peers_names_the_bench_extra_when_qwix_is_missing(peers, monkeypatch):
    import tomllib

    extras = tomllib.loads((BENCH.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(d.startswith("qwix") for d in extras["bench"])
    assert not any(d.startswith("qwix") for d in extras["test"])
    monkeypatch.setitem(sys.modules, "qwix", None)  # what importing it gives: nothing
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[bench\]'"):
        peers.main(["--smoke"])


def test_peers_smoke_three_methods_train_the_same_lora(peers, tmp_path):
    pytest.importorskip(
        "qwix",
        reason="qwix is not installed: it is in the 'bench' extra, not 'test' "
        "(python -m pip install -e '.[bench]' to run the peers benchmark)",
    )
    out = tmp_path / "peers.jsonl"
    # lowrank_cost's decoder broadcasts its position table and causal mask over the batch
    shape = peers.SMOKE
    with jax.numpy_rank_promotion("allow"):
        rows = peers.main(["--smoke", "--out", str(out)])
        params, tokens = peers.init(shape)
    reference = _numpy_decoder_loss(params, tokens, shape)
    assert [r["method"] for r in rows] == ["hand", "lorax", "qwix"]
    # r x (in + out) for q, k, v, o (d -> d), fc1 (d -> ff) and fc2 (ff -> d), per layer
    trainable = shape.layers * shape.rank * (4 * 2 * shape.d + 2 * (shape.d + shape.ff))
    hand = rows[0]
    for row in rows:
        assert row["trainable"] == trainable, row["method"]
        assert row["loss_step0"] == pytest.approx(reference, rel=1e-5), row["method"]
        assert row["ref_loss"] == pytest.approx(reference, rel=1e-5)
        assert row["grad_rel_err"] <= 1e-4 and row["grad_rel_err_hand"] <= 1e-4, row
        assert row["ok"] and row["temp_bytes"] > 0 and row["ms"] > 0
        # no dense weight gradient: a full dW per projection would add over 10% here
        assert 0.9 < row["flops"] / hand["flops"] < 1.1, row["method"]
    assert out.read_text().count("\n") == 3
    table = peers.table(rows).splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["hand", "lorax", "qwix"]


def test_load_quantized_small_measures_both_loads(tmp_path):
    """benchmarks/load_quantized.py --shape small: the checkpoint it writes loads (sharded,
    one file per layer) and both loads report their trees; the peaks are printed, not
    asserted (tests/test_streaming_load.py checks what is alive during the load)."""
    bench = load("load_quantized")
    result = bench.run("small", "float32", tmp_path / "ckpt", keep=True)
    config = bench.config_of("small")
    d, ff, layers, vocab = 768, 3072, 6, 2048
    weights = layers * (4 * d * d + 3 * d * ff)
    norms = (2 * layers + 1) * d
    assert config.hidden_size == d and config.intermediate_size == ff
    assert result["checkpoint_bytes"] == 4 * (weights + norms + 2 * vocab * d)
    assert result["dense"]["tree_bytes"] == result["checkpoint_bytes"]
    assert result["nf4"]["tree_bytes"] < result["dense"]["tree_bytes"] / 4
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) == layers + 1
    assert "| nf4 |" in bench.table(result)
