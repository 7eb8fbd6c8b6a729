"""experiments/run.py --quick end to end: the files it writes and their schema, and the counts
it reports checked against the model's shapes (the measured values are never asserted)."""

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

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


def _tiny_gpt2_checkpoint(directory: Path, text: str) -> None:
    """A random two-layer GPT-2 and a byte-level BPE tokenizer trained on ``text``, written as
    a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    import jax.numpy as jnp
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lorax.models import gpt2

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    config = gpt2.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = gpt2.GPT2(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    gpt2.save_pretrained(directory, model, params)


def test_model_and_data_run_on_a_gpt2_checkpoint(tmp_path):
    """--model DIR --data FILE: the checkpoint is the base, perplexity on the text's held-out
    tenth is the measure (no accuracy), and every method of the other tables builds on GPT-2's
    names (its fused c_attn has target sets of its own). The delta analysis is the default
    path's (test_delta_analysis_has_each_update_and_the_similarity_grid)."""
    sys.path.insert(0, str(EXPERIMENTS))
    import run

    text = "lorax fine-tunes flax models with low-rank adapters, on CPU, GPU and TPU. " * 60
    (tmp_path / "notes.txt").write_text(text)
    _tiny_gpt2_checkpoint(tmp_path / "gpt2", text)
    out = tmp_path / "out"
    argv = ["--quick", "--model", str(tmp_path / "gpt2"), "--data", str(tmp_path / "notes.txt")]
    results = run.main([*argv, "--seq", "16", "--experiments", "rank", "--out", str(out)])

    assert set(results) == {"rank"} and results["rank"]["arch"] == "gpt2"
    runs = {r["variant"]: r for r in results["rank"]["runs"]}
    assert set(runs) == {"full", *(f"lora r={r}" for r in run.QUICK.ranks)}
    d, layers = 32, 2  # every block projection: c_attn (d, 3d), c_proj (d, d), c_fc, mlp c_proj
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    for r in run.QUICK.ranks:
        run_r = runs[f"lora r={r}"]
        assert run_r["trainable"] == layers * sum(r * (i + o) for i, o in shapes)
        assert "accuracy" not in run_r and math.isfinite(run_r["perplexity"])
    assert "## 1. Rank" in (out / "report.md").read_text()

    # the other tables' methods on GPT-2's names (built, not trained: the rank run trains)
    task = run.load_task(run.parse_args([*argv, "--seq", "16"]), run.QUICK, print)
    for variant in run.variants(run.QUICK, run.GPT2_TARGETS):
        if variant.method in ("full", "lora"):
            continue
        tree, _ = run.build(variant, task.params, task, run.QUICK, 0, run.GPT2_TARGETS)
        trainable, _ = lorax.split(tree)
        assert sum(x.size for x in jax.tree.leaves(trainable)) > 0, variant.name


def test_model_without_data_stops_with_a_message(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    import run

    _tiny_gpt2_checkpoint(tmp_path / "gpt2", "some text to train a tokenizer on. " * 20)
    with pytest.raises(SystemExit, match="--model needs --data"):
        run.main(["--quick", "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")])
