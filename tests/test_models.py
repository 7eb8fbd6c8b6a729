"""The reference models against transformers' PyTorch models on the CPU (float32): random
small configs saved with save_pretrained, loaded by lorax, compared logit by logit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax
from lorax.models import generate, gpt2, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

VOCAB = 97


def _randomize(model, seed):
    """Every parameter random and O(1)-scaled, so equal logits are a real check (the
    default init leaves norms at 1 and logits near 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5)
                + (1.0 if p.ndim == 1 else 0.0)
            )
    return model.eval()


def _hf_gpt2(**overrides):
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=48,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    return _randomize(transformers.GPT2LMHeadModel(config), 0)


def _hf_llama(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    kwargs.update(overrides)
    return _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)), 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, torch model) for each saved random model."""
    root = tmp_path_factory.mktemp("hf")
    models = {
        "gpt2": _hf_gpt2(),
        "llama": _hf_llama(),
        "llama_tied_bias": _hf_llama(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    sharded = root / "llama_sharded"
    models["llama"].save_pretrained(sharded, max_shard_size="20KB")
    out["llama_sharded"] = (sharded, models["llama"])
    return out


LOADERS = {
    "gpt2": gpt2.from_pretrained,
    "llama": llama.from_pretrained,
    "llama_tied_bias": llama.from_pretrained,
    "llama_sharded": llama.from_pretrained,
}


def _tokens(batch=2, length=11, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, (batch, length))


def _torch_logits(model, ids, mask=None):
    kwargs = {}
    if mask is not None:  # positions count real tokens, as transformers' generate has them
        kwargs = {
            "attention_mask": torch.tensor(mask),
            "position_ids": torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)),
        }
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("name", sorted(LOADERS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_equal_transformers(checkpoints, name, scan_layers):
    directory, hf = checkpoints[name]
    model, params = LOADERS[name](directory, scan_layers=scan_layers)
    ids = _tokens()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    expected = _torch_logits(hf, ids)
    assert np.abs(expected).max() > 1.0  # the comparison is not of near-zero numbers
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_is_sharded(checkpoints):
    directory, _ = checkpoints["llama_sharded"]
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_left_padded_batch_equals_transformers(checkpoints, name):
    directory, hf = checkpoints[name]
    model, params = LOADERS[name](directory)
    ids = _tokens(3, 9, seed=1)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ours = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    expected = _torch_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_remat_policy_and_bf16_compute(checkpoints):
    directory, hf = checkpoints["llama"]
    ids = _tokens()
    expected = _torch_logits(hf, ids)
    model, params = llama.from_pretrained(directory, scan_layers=True, remat_policy="dots_saveable")
    grads = jax.grad(lambda p: model.apply({"params": p}, ids).sum())(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    model, params = llama.from_pretrained(directory, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ours = np.asarray(model.apply({"params": params}, ids))
    assert ours.dtype == np.float32
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() < 0.1 * scale


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_saved_checkpoint_loads_in_transformers(checkpoints, tmp_path, name):
    directory, hf = checkpoints[name]
    model, params = LOADERS[name](directory, scan_layers=True)
    module = gpt2 if name == "gpt2" else llama
    module.save_pretrained(tmp_path, model, params)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _tokens()
    np.testing.assert_allclose(_torch_logits(auto, ids), _torch_logits(hf, ids), atol=1e-5)
    again, params2 = LOADERS[name](tmp_path)
    assert again.config == model.config


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_generation_equals_full_recomputation(checkpoints, name):
    directory, hf = checkpoints[name]
    model, params = LOADERS[name](directory)
    prompt = _tokens(2, 5, seed=2)
    new = np.asarray(generate(model, params, prompt, 8))
    full = jax.jit(lambda p, s: model.apply({"params": p}, s))
    seq = np.zeros((2, 13), np.int32)
    seq[:, :5] = prompt
    for i in range(5, 13):  # no cache: the whole sequence again for every token (the model is
        # causal, so the zeros after position i change nothing before it: one compiled shape)
        seq[:, i] = np.asarray(jnp.argmax(full(params, seq)[:, i - 1], -1))
    np.testing.assert_array_equal(new, seq[:, 5:])
    # the cached logits themselves equal the full forward pass at every position
    cached = jax.jit(lambda p, s, c: model.apply({"params": p}, s, cache=c))
    cache = model.init_cache(2, seq.shape[1])
    first, cache = cached(params, seq[:, :5], cache)
    steps = [first]
    for i in range(5, seq.shape[1]):
        logits, cache = cached(params, seq[:, i : i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full(params, seq), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and transformers' greedy decoding agrees
        hf_new = hf.generate(
            torch.tensor(prompt),
            max_new_tokens=8,
            do_sample=False,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            pad_token_id=0,
            eos_token_id=None,
        )
    np.testing.assert_array_equal(new, hf_new.numpy()[:, 5:])


def test_left_padded_generation_equals_rows_alone(checkpoints):
    directory, _ = checkpoints["llama"]
    model, params = llama.from_pretrained(directory)
    long, short = _tokens(1, 7, seed=3)[0], _tokens(1, 4, seed=4)[0]
    ids = np.stack([long, np.concatenate([[0, 0, 0], short])])
    mask = np.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    batched = np.asarray(generate(model, params, ids, 6, attention_mask=mask))
    np.testing.assert_array_equal(batched[0], generate(model, params, long[None], 6)[0])
    np.testing.assert_array_equal(batched[1], generate(model, params, short[None], 6)[0])


def test_sampling_and_eos():
    model = gpt2.GPT2(
        gpt2.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    prompt = _tokens(4, 4)
    a = generate(model, params, prompt, 10, temperature=1.0, top_k=3, key=jax.random.key(1))
    b = generate(model, params, prompt, 10, temperature=1.0, top_k=3, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)  # same key, same samples
    logits = model.apply({"params": params}, prompt)[:, -1]
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    assert all(int(a[r, 0]) in top3[r] for r in range(4))  # top-k respected
    greedy = np.asarray(generate(model, params, prompt, 10))
    eos = int(greedy[0, 1])
    stopped = np.asarray(generate(model, params, prompt, 10, eos_token_id=eos, pad_token_id=-1))
    for want, got in zip(greedy, stopped):  # each row as greedy up to its first eos, then pad
        hits = np.flatnonzero(want == eos)
        end = hits[0] + 1 if hits.size else len(want)
        assert list(got[:end]) == list(want[:end]) and (got[end:] == -1).all()
    assert (stopped == -1).any()
    with pytest.raises(ValueError, match="key"):
        generate(model, params, prompt, 3, temperature=0.5)
    with pytest.raises(ValueError, match="positions"):
        generate(model, params, prompt, 40)


def test_lora_and_nf4_on_reference_models(checkpoints):
    """The models run unmerged under lorax.lora (no densification: the conftest fixture
    fails on a LoraxDensifyWarning), scanned or not, and generate from LoRA / NF4 trees."""
    directory, _ = checkpoints["llama"]
    ids = _tokens()
    for scan_layers in (False, True):
        model, params = llama.from_pretrained(directory, scan_layers=scan_layers)
        lp = lorax.wrap(
            params, rank=4, targets=["q_proj", "v_proj", "down_proj"], key=jax.random.key(0)
        )
        lp = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 and x.shape[0] == 4 else x, lp)
        with jax.default_matmul_precision("highest"):
            unmerged = jax.jit(lorax.lora(model.apply))({"params": lp}, ids)
            merged = jax.jit(model.apply)({"params": lorax.merge(lp)}, ids)
        np.testing.assert_allclose(unmerged, merged, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(
            generate(model, lp, ids[:, :4], 5), generate(model, lorax.merge(lp), ids[:, :4], 5)
        )
    qlp = lorax.wrap(lorax.quantize(params, "nf4"), rank=4, targets=["q_proj", "v_proj"])
    np.testing.assert_array_equal(
        generate(model, qlp, ids[:, :4], 5), generate(model, lorax.merge(qlp), ids[:, :4], 5)
    )


def test_gpt2_lora_targets_read_as_in_peft(checkpoints):
    directory, _ = checkpoints["gpt2"]
    model, params = gpt2.from_pretrained(directory, scan_layers=True)
    lp = lorax.wrap(params, rank=4, targets=["c_attn"])
    leaf = lp["ScanLayers"]["attn"]["c_attn"]["kernel"]
    assert isinstance(leaf, lorax.LoraWeight)
    assert leaf.a.shape == (2, 32, 4) and leaf.b.shape == (2, 4, 96)  # one pair per layer


def test_loader_errors(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        gpt2.from_pretrained("lorax-test/no-such-model")
    directory, hf = checkpoints["gpt2"]
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "config.json").write_text((directory / "config.json").read_text())
        gpt2.from_pretrained(tmp_path)
    # a config that does not match the weights names the tensor and both shapes
    wrong = tmp_path / "wrong"
    hf.save_pretrained(wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["n_inner"] = 64
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.c_fc\.weight.*\(32, 128\).*\(32, 64\)"):
        gpt2.from_pretrained(wrong)
    config["n_inner"] = None
    config["n_layer"] = 1
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="does not use"):
        gpt2.from_pretrained(wrong)


def test_from_pretrained_quantizes_tensor_by_tensor(tmp_path):
    cfg = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = llama.Llama(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    llama.save_pretrained(tmp_path, model, params)
    _, got = llama.from_pretrained(tmp_path, quantize="nf4")
    want = lorax.quantize(llama.from_pretrained(tmp_path)[1], "nf4")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(lorax.LoraxError, match="quantize='nf8'"):
        llama.from_pretrained(tmp_path, quantize="nf8")
