"""The Llama relatives (issue 17, item 5): Mistral with its sliding window, Qwen2 (q / k / v
biases, sliding layers past max_window_layers), Gemma ((1 + w) norms, scaled embeddings,
tanh-GELU, tied head) and Gemma 2 (soft-capping, sandwich norms, query_pre_attn_scalar,
alternating sliding layers), against transformers' PyTorch models on the CPU (float32):
random tiny configs saved by transformers, loaded by lorax.models.llama, logits compared
(atol 1e-4) on sequences longer than the window, padded or not, with and without the KV
cache; LoRA against the merged weights; adapters through export_peft / import_peft against
PyTorch peft; save_pretrained read back by transformers; configs lorax cannot honour refused."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import lorax
from lorax.errors import LoraxValueError
from lorax.io.peft import CONFIG_FILE
from lorax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
WINDOW = 4
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
FAMILIES = {  # name -> (torch class, config class, config overrides)
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": (  # layer 0 full attention, layer 1 sliding (max_window_layers=1)
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=16)),
    "gemma2": (  # caps small enough to bind on these logits
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
}
NAMES = sorted(FAMILIES)


def _hf(name, seed=0):
    cls, config_cls, overrides = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    config._attn_implementation = "eager"  # the reference: masks and caps spelled out
    model = getattr(transformers, cls)(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # O(1) random weights: equal logits are a real check
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, torch model), each saved once by transformers."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in NAMES:
        model = _hf(name)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


_LOADED = {}


def _load(saved, name):
    """The family's checkpoint loaded by lorax once (scanned layers: each layer's window is
    a scanned input), with one compiled apply for every test's [2, LENGTH] batch."""
    if name not in _LOADED:
        model, params = llama.from_pretrained(saved[name][0], scan_layers=True)
        _LOADED[name] = (model, params, _apply(model))
    return _LOADED[name]


def _apply(model):
    # compiled quickly (O0): these tiny models spend seconds in XLA's optimizer otherwise
    run = jax.jit(
        lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask),
        compiler_options=FAST,
    )
    return lambda params, ids, mask=None: np.asarray(
        run(params, ids, np.ones(ids.shape, np.int32) if mask is None else mask)
    )


FAST = {"xla_backend_optimization_level": 0}
_merge = jax.jit(lorax.merge, compiler_options=FAST)
LENGTH = 12  # three windows


def _tokens(batch=2, length=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, (batch, length))


def _torch_logits(model, ids, mask=None):
    kwargs = {}
    if mask is not None:  # positions count real tokens, as lorax computes them
        kwargs = {
            "attention_mask": torch.tensor(mask),
            "position_ids": torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)),
        }
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(saved, name):
    hf = saved[name][1]
    model, params, apply = _load(saved, name)
    assert model.config.model_type == name
    ids = _tokens()
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: the window counts slots, as transformers' mask
    expected = _torch_logits(hf, ids)
    assert np.abs(expected).max() > 1.0
    with jax.default_matmul_precision("highest"):
        ours = apply(params, ids, mask)
    np.testing.assert_allclose(ours[0], expected[0], atol=1e-4, rtol=1e-4)
    padded = _torch_logits(hf, ids, mask)[1, 3:]
    np.testing.assert_allclose(ours[1, 3:], padded, atol=1e-4, rtol=1e-4)


def test_the_window_binds(saved):
    """Without the window transformers' own logits differ past it, so the tests above check
    a mask that matters."""
    mistral, ids = saved["mistral"][1], _tokens()
    windowed = _torch_logits(mistral, ids)
    mistral.config.sliding_window = None  # transformers' Mistral reads it at each call
    try:
        full = _torch_logits(mistral, ids)
    finally:
        mistral.config.sliding_window = WINDOW
    np.testing.assert_allclose(windowed[:, :WINDOW], full[:, :WINDOW], atol=1e-5)
    assert np.abs(windowed[:, WINDOW:] - full[:, WINDOW:]).max() > 1e-2


def test_cached_decoding_equals_the_full_call(saved):
    """The KV-cache path masks the same windows (Gemma 2: one sliding layer, one full, logit
    caps): chunks of 3 tokens, each attending across the chunks before it."""
    model, params, apply = _load(saved, "gemma2")
    ids = _tokens(seed=1)
    step = jax.jit(
        lambda p, ids, cache: model.apply({"params": p}, ids, cache=cache), compiler_options=FAST
    )
    cache = model.init_cache(2, LENGTH)
    with jax.default_matmul_precision("highest"):
        full = apply(params, ids)
        chunks = []
        for i in range(0, LENGTH, 3):
            out, cache = step(params, ids[:, i : i + 3], cache)
            chunks.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_lora_through_peft_both_ways(saved, tmp_path, name):
    """A LoRA adapter PyTorch peft saved (every B random) imports with peft's logits, by
    lora(apply) and by apply on the merged weights; exported again, peft loads the same
    tensors and gives the same logits."""
    hf = saved[name][1]
    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets)
    torch_model = peft.get_peft_model(hf, config)
    ids = _tokens(seed=2)
    try:
        with torch.no_grad():
            for n, p in torch_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.3)
        torch_model.save_pretrained(tmp_path / "theirs")
        theirs = _torch_logits(torch_model.eval(), ids)
    finally:
        torch_model.unload()  # the shared torch model without its LoRA layers again
    assert np.abs(theirs - _torch_logits(hf, ids)).max() > 1e-2  # the adapter does something

    model, params, apply = _load(saved, name)
    lp = lorax.import_peft(tmp_path / "theirs", params, model=name)
    lora_apply = jax.jit(lorax.lora(model.apply, strict=True), compiler_options=FAST)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(lora_apply({"params": lp}, ids))
        merged = apply(_merge(lp), ids)
    np.testing.assert_allclose(ours, merged, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    lorax.export_peft(tmp_path / "ours", lp, model=name)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("theirs", "ours"))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    a, b = (json.loads((tmp_path / d / CONFIG_FILE).read_text()) for d in ("theirs", "ours"))
    assert (a["r"], a["lora_alpha"], a["fan_in_fan_out"]) == (b["r"], b["lora_alpha"], False)
    assert {m.rsplit(".", 1)[-1] for m in b["target_modules"]} == set(targets)
    if name != "gemma2":  # the same tensors and scale: peft's logits again (once is enough)
        return
    again = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    try:
        np.testing.assert_allclose(_torch_logits(again, ids), ours, atol=1e-4, rtol=1e-4)
    finally:
        again.unload()


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_loads_in_transformers(saved, tmp_path, name):
    directory, hf = saved[name]
    model, params, _ = _load(saved, name)
    llama.save_pretrained(tmp_path, model, params)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(again) is type(hf)
    ids = _tokens(seed=4)
    np.testing.assert_allclose(
        _torch_logits(again.eval(), ids), _torch_logits(hf, ids), atol=1e-5, rtol=1e-5
    )
    written = json.loads((tmp_path / "config.json").read_text())
    assert llama.LlamaConfig.from_hf(written).to_hf() == model.config.to_hf()


BAD = [  # (family, config.json changes, what the error names)
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation='relu'"),
    ("gemma", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types="),
    ("qwen2", {"layer_types": ["full_attention"]}, r"one of .* per layer \(2 layers\)"),
    ("qwen2", {"max_window_layers": -1, "layer_types": None}, "max_window_layers must be"),
    ("mistral", {"sliding_window": 0}, "sliding_window must be a positive int; got 0"),
    ("gemma2", {"attn_logit_softcapping": -1.0}, "attn_logit_softcapping must be a finite"),
    (
        "qwen2",
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
        "rope type 'yarn'",
    ),
    ("mistral", {"model_type": "mixtral"}, r"model_type='mixtral'.*'qwen2', 'gemma', 'gemma2'"),
]


@pytest.mark.parametrize("name,changes,match", BAD)
def test_configs_not_implemented_are_refused(saved, tmp_path, name, changes, match):
    directory = shutil.copytree(saved[name][0], tmp_path / name)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(LoraxValueError, match=match) as err:
        llama.from_pretrained(directory)
    assert str(directory / "config.json") in str(err.value)


def test_direct_configs_refuse_what_the_family_lacks():
    with pytest.raises(LoraxValueError, match="qkv_bias=True does not exist.*LlamaForCausalLM"):
        llama.LlamaConfig(qkv_bias=True)
    with pytest.raises(LoraxValueError, match="attention_bias=True .*Qwen2ForCausalLM"):
        llama.LlamaConfig(model_type="qwen2", attention_bias=True)
    with pytest.raises(LoraxValueError, match="sliding_window=4 does not exist"):
        llama.LlamaConfig(sliding_window=4)  # transformers' Llama would not slide
    assert llama.LlamaConfig(model_type="qwen2").qkv_bias  # Qwen2's biases are not optional
    with pytest.raises(LoraxValueError, match="model_type='falcon' is not supported"):
        llama.LlamaConfig(model_type="falcon")
