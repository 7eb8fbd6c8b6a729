"""Bad checkpoints and adapters from outside (issue 12): configs of architectures or features
the reference models do not implement, invalid JSON, truncated safetensors, adapter configs
whose r / lora_alpha would give a wrong scale. Each gets a lorax error naming the file, the
config key or the module, never wrong logits or a bare json / safetensors error."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers import randomize_b
from safetensors.numpy import load_file, save_file

import lorax
from lorax.errors import LoraxFileNotFoundError, LoraxTypeError, LoraxValueError
from lorax.models import generate, gpt2, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_models import VOCAB, _hf_gpt2, _hf_llama, _randomize, _tokens  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

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
)


def _hf(cls, config_cls, **overrides):
    return _randomize(cls(config_cls(**{**TINY, **overrides})), 2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, torch model) of tiny random checkpoints saved by transformers."""
    root = tmp_path_factory.mktemp("interop")
    models = {
        "gpt2": _hf_gpt2(),
        "llama": _hf_llama(),
        "mistral_window": _hf(
            transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=4
        ),
        "mistral_no_window": _hf(
            transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=None
        ),
        "mistral_wide_window": _hf(
            transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=64
        ),
        "qwen2": _hf(transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
    }
    out = {name: (root / name, model) for name, model in models.items()}
    for name, model in models.items():
        model.save_pretrained(root / name)
    models["llama"].save_pretrained(root / "llama_sharded", max_shard_size="20KB")
    out["llama_sharded"] = (root / "llama_sharded", models["llama"])
    return out


def _copy(saved, name, tmp_path):
    return shutil.copytree(saved[name][0], tmp_path / name)


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _logits(model, params, hf, ids):
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    return np.asarray(model.apply({"params": params}, ids)), theirs


# ---------------------------------------------------------------- architectures and features


@pytest.mark.parametrize("name", ["mistral_window", "mistral_no_window", "mistral_wide_window"])
def test_mistral_equals_transformers(saved, name):
    """Mistral's sliding window (4 of 20 tokens: binding; unrolled layers) or none."""
    directory, hf = saved[name]
    model, params = llama.from_pretrained(directory)
    ids = _tokens(2, 20)  # longer than a window of 4 would allow
    ours, theirs = _logits(model, params, hf, ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_other_architectures_are_refused(saved):
    with pytest.raises(lorax.LoraxError, match="model_type 'qwen2' checkpoint, not GPT-2"):
        gpt2.from_pretrained(saved["qwen2"][0])
    directory = saved["llama"][0]
    with pytest.raises(lorax.LoraxError) as err:
        gpt2.from_pretrained(directory)
    msg = str(err.value)
    assert "model_type 'llama' checkpoint, not GPT-2" in msg
    assert "lorax.models.llama.from_pretrained" in msg and str(directory) in msg
    with pytest.raises(
        lorax.LoraxError,
        match=r"model_type 'gpt2' checkpoint, not Llama.*"
        r"lorax\.models\.gpt2\.from_pretrained",
    ):
        llama.from_pretrained(saved["gpt2"][0])
    with pytest.raises(lorax.LoraxError, match="model_type 'mistral' checkpoint, not GPT-2"):
        gpt2.from_pretrained(saved["mistral_no_window"][0])


LLAMA_BAD = [  # config.json changes -> what the error names
    ({"model_type": "falcon"}, r"model_type 'falcon' checkpoint, not Llama.*'llama', 'mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional"),
    ({"model_type": "mistral", "sliding_window": "4096"}, "sliding_window must be a positive"),
    (
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
        r"rope type 'dynamic'.*rope_parameters",
    ),
    (
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
        "rope type 'yarn'",
    ),
    (
        {"rope_parameters": {"rope_type": "llama3", "factor": 2.0, "rope_theta": 1e4}},
        r"'llama3' needs \['low_freq_factor'",
    ),
    ({"rope_parameters": "llama3"}, "rope_parameters / rope_scaling must be an object"),
    ({"hidden_size": "32"}, "hidden_size must be a positive int; got str"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int; got 0"),
    ({"num_key_value_heads": -2}, "num_key_value_heads must be a positive int"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite number > 0"),
    (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        "quantization_config.*'gptq'.*lorax.quantize",
    ),
]


@pytest.mark.parametrize("changes,match", LLAMA_BAD)
def test_llama_config_features_not_implemented_are_refused(saved, tmp_path, changes, match):
    directory = _copy(saved, "llama", tmp_path)
    _edit_config(directory, **changes)
    with pytest.raises(lorax.LoraxError, match=match) as err:
        llama.from_pretrained(directory)
    assert str(directory / "config.json") in str(err.value)


GPT2_BAD = [
    ({"model_type": "llama"}, "model_type 'llama' checkpoint, not GPT-2"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"add_cross_attention": True}, "add_cross_attention=True"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"n_head": 0}, "n_head must be a positive int; got 0"),
    ({"n_embd": 32.0}, "n_embd must be a positive int; got float"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be a positive number"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
]


@pytest.mark.parametrize("changes,match", GPT2_BAD)
def test_gpt2_config_features_not_implemented_are_refused(saved, tmp_path, changes, match):
    directory = _copy(saved, "gpt2", tmp_path)
    _edit_config(directory, **changes)
    with pytest.raises(lorax.LoraxError, match=match) as err:
        gpt2.from_pretrained(directory)
    assert str(directory / "config.json") in str(err.value)


def test_several_eos_ids_load_and_generate(saved, tmp_path):
    """Llama 3 instruct configs list several eos ids; the config must stay hashable (jit)."""
    directory = _copy(saved, "llama", tmp_path)
    _edit_config(directory, eos_token_id=[0, 5])
    model, params = llama.from_pretrained(directory)
    assert model.config.eos_token_id == (0, 5)
    assert generate(model, params, _tokens(1, 4), 3).shape == (1, 3)
    llama.save_pretrained(tmp_path / "again", model, params)
    assert llama.from_pretrained(tmp_path / "again")[0].config == model.config


# ------------------------------------------------------------------- unreadable checkpoints


@pytest.mark.parametrize(
    "text",
    [
        '{"model_type": "gpt2", "n_embd": 3',
        "",
        "[1, 2]",
        "version https://git-lfs.github.com/spec/v1\noid sha256:ab",
    ],
)
def test_invalid_config_json_names_the_file(saved, tmp_path, text):
    directory = _copy(saved, "gpt2", tmp_path)
    (directory / "config.json").write_text(text)
    with pytest.raises(lorax.CheckpointError) as err:
        gpt2.from_pretrained(directory)
    assert str(directory / "config.json") in str(err.value)


def _truncate(file, keep):
    data = file.read_bytes()
    file.write_bytes(data[: keep(len(data))] if callable(keep) else keep)


CORRUPT = {
    "half": lambda n: n // 2,
    "last_byte_lost": lambda n: n - 1,
    "header_only": lambda n: 5,
    "empty": lambda n: 0,
    "garbage": b"not a safetensors" * 9,
}


@pytest.mark.parametrize("how", sorted(CORRUPT))
def test_corrupt_model_safetensors_names_the_file(saved, tmp_path, how):
    directory = _copy(saved, "gpt2", tmp_path)
    file = directory / "model.safetensors"
    _truncate(file, CORRUPT[how])
    with pytest.raises(lorax.CheckpointError, match="truncated or corrupt") as err:
        gpt2.from_pretrained(directory)
    assert str(file) in str(err.value)


def test_sharded_checkpoint_faults_name_the_file(saved, tmp_path):
    directory = _copy(saved, "llama_sharded", tmp_path)
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    last = directory / shards[-1]  # a truncated shard: found before anything is read
    original = last.read_bytes()
    _truncate(last, CORRUPT["half"])
    with pytest.raises(lorax.CheckpointError, match="truncated or corrupt") as err:
        llama.from_pretrained(directory)
    assert str(last) in str(err.value)
    last.unlink()  # a missing shard
    with pytest.raises(LoraxFileNotFoundError) as err:
        llama.from_pretrained(directory)
    assert shards[-1] in str(err.value) and str(index_file) in str(err.value)
    last.write_bytes(original)
    # the index puts a tensor in a shard that lacks it
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index_file.write_text(json.dumps({"weight_map": {**index["weight_map"], name: shards[-1]}}))
    with pytest.raises(lorax.CheckpointError, match="which lacks them") as err:
        llama.from_pretrained(directory)
    assert name in str(err.value) and shards[-1] in str(err.value)
    for text in ['{"weight_map": {', '{"metadata": {}}']:
        index_file.write_text(text)
        with pytest.raises(lorax.CheckpointError) as err:
            llama.from_pretrained(directory)
        assert str(index_file) in str(err.value)
    index_file.write_text(json.dumps(index))
    model, params = llama.from_pretrained(directory)  # and intact again, it loads


# ------------------------------------------------------------------------- PEFT adapters


@pytest.fixture
def adapter(saved, tmp_path):
    """A rank-4 adapter on GPT-2's c_attn (lora_alpha 8): (directory, params)."""
    _, params = gpt2.from_pretrained(saved["gpt2"][0])
    lp = randomize_b(lorax.wrap(params, rank=4, alpha=8, targets=["c_attn"]), jax.random.key(3))
    return lorax.export_peft(tmp_path / "adapter", lp), params


def _edit_adapter(directory, **changes):
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


ADAPTER_BAD = [  # adapter_config.json changes -> what the error names
    ({"r": 8}, r"'transformer\.h\.0\.attn\.c_attn' has rank 4 .* gives it r=8 \(from r\)"),
    ({"rank_pattern": {"c_attn": 2}}, r"c_attn' has rank 4 .* r=2 \(from rank_pattern\)"),
    ({"r": 0}, "r must be a positive int; got 0"),
    ({"r": -4}, "r must be a positive int; got -4"),
    ({"r": 4.0}, "r must be a positive int; got 4.0"),
    ({"r": "4"}, "r must be a positive int; got str"),
    ({"r": True}, "r must be a positive int; got bool"),
    ({"rank_pattern": {"c_attn": 0}}, r"rank_pattern\['c_attn'\] must be a positive int"),
    ({"rank_pattern": ["c_attn"]}, "rank_pattern must be an object"),
    ({"lora_alpha": "16"}, "lora_alpha must be a finite number; got str"),
    ({"lora_alpha": None}, "lora_alpha must be a finite number; got NoneType"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number; got nan"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number; got inf"),
    ({"alpha_pattern": {"c_attn": "8"}}, r"alpha_pattern\['c_attn'\] must be a finite"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": "0.1"}, "lora_dropout must be a number"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
]


@pytest.mark.parametrize("changes,match", ADAPTER_BAD)
def test_adapter_config_values_are_checked(adapter, changes, match):
    directory, params = adapter
    _edit_adapter(directory, **changes)
    with pytest.raises(lorax.LoraxError, match=match):
        lorax.import_peft(directory, params)


def test_rank_pattern_overrides_r(adapter):
    """r disagrees with the tensors, but rank_pattern names the module: that rank counts."""
    directory, params = adapter
    _edit_adapter(directory, r=16, rank_pattern={"c_attn": 4}, lora_alpha=6)
    lp = lorax.import_peft(directory, params)
    assert lp["h_0"]["attn"]["c_attn"]["kernel"].scale == pytest.approx(6 / 4)


def _rewrite_tensors(directory, change):
    file = directory / "adapter_model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B1 = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value(tensors[key]))


TENSOR_BAD = [  # (tensor, how it is spoiled, error, message)
    (A0, lambda a: a.astype(np.int32), LoraxTypeError, "is int32; LoRA factors"),
    (A0, lambda a: a > 0, LoraxTypeError, "is bool"),
    (
        B1,
        lambda b: np.where(np.arange(b.size).reshape(b.shape) == 3, np.nan, b),
        lorax.NonFiniteError,
        "inf or NaN",
    ),
    (B1, lambda b: np.full_like(b, np.inf), lorax.NonFiniteError, "inf or NaN"),
]


@pytest.mark.parametrize("key,spoil,error,match", TENSOR_BAD)
def test_adapter_factors_must_be_finite_floats(adapter, key, spoil, error, match):
    directory, params = adapter
    _rewrite_tensors(directory, _set(key, spoil))
    with pytest.raises(error, match=match) as err:
        lorax.import_peft(directory, params)
    assert key in str(err.value) and "adapter_model.safetensors" in str(err.value)


def test_adapter_factor_shapes(adapter):
    directory, params = adapter
    file = directory / "adapter_model.safetensors"
    original = file.read_bytes()
    _rewrite_tensors(directory, _set(A0, lambda a: a[0]))  # 1-D lora_A
    with pytest.raises(
        LoraxValueError,
        match=r"'transformer\.h\.0\.attn\.c_attn' has "
        r"lora_A \(32,\)",
    ):
        lorax.import_peft(directory, params)
    file.write_bytes(original)
    _rewrite_tensors(directory, lambda t: t.pop(B1))  # lora_A without its lora_B
    with pytest.raises(
        LoraxValueError,
        match=r"h\.1\.attn\.c_attn' has lora_A but no "
        "lora_B",
    ):
        lorax.import_peft(directory, params)


def test_an_adapter_on_some_layers_of_a_stack_is_refused(saved, adapter):
    """One stacked leaf holds every layer: an adapter that covers h.0 but not h.1 cannot be
    put on a scanned GPT-2's c_attn, and the error names the stack."""
    directory, _ = adapter
    _, scanned = gpt2.from_pretrained(saved["gpt2"][0], scan_layers=True)
    lorax.import_peft(directory, scanned)  # whole, it imports onto the stack
    _rewrite_tensors(directory, lambda t: [t.pop(k) for k in list(t) if ".h.1." in k])
    with pytest.raises(LoraxValueError, match=r"covers 1 of the 2 layers stacked in '.*c_attn"):
        lorax.import_peft(directory, scanned)


def test_dora_magnitude_shape_is_checked(saved, tmp_path):
    model, params = gpt2.from_pretrained(saved["gpt2"][0])
    lp = lorax.wrap(params, rank=4, targets=["c_attn"], dora=True)
    directory = lorax.export_peft(tmp_path / "dora", lp)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    _rewrite_tensors(directory, _set(key, lambda m: m[:-1]))
    with pytest.raises(
        LoraxValueError,
        match=r"lora_magnitude_vector' has shape \(95,\); "
        r"the module's output needs \(96,\)",
    ):
        lorax.import_peft(directory, params)


def test_bfloat16_adapter_imports(adapter):
    """Adapters saved from bf16 models hold BF16 tensors: they import, with the factors as
    stored (and pass the finiteness check, which numpy cannot run on bfloat16 directly)."""
    directory, params = adapter
    want = lorax.import_peft(directory, params)
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    file = directory / "adapter_model.safetensors"
    save_torch({k: v.to(torch.bfloat16) for k, v in load_torch(file).items()}, str(file))
    got = lorax.import_peft(directory, params)
    a, b = (x["h_0"]["attn"]["c_attn"]["kernel"] for x in (got, want))
    assert a.a.dtype == jax.numpy.bfloat16 and a.scale == b.scale
    np.testing.assert_allclose(np.asarray(a.b, np.float32), b.b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("text", ['{"peft_type": "LORA", "r": 4,', "", "null"])
def test_invalid_adapter_config_json_names_the_file(adapter, text):
    directory, params = adapter
    (directory / "adapter_config.json").write_text(text)
    with pytest.raises(lorax.CheckpointError) as err:
        lorax.import_peft(directory, params)
    assert str(directory / "adapter_config.json") in str(err.value)


@pytest.mark.parametrize("how", sorted(CORRUPT))
def test_corrupt_adapter_safetensors_names_the_file(adapter, how):
    directory, params = adapter
    file = directory / "adapter_model.safetensors"
    _truncate(file, CORRUPT[how])
    with pytest.raises(lorax.CheckpointError, match="truncated or corrupt") as err:
        lorax.import_peft(directory, params)
    assert str(file) in str(err.value)
