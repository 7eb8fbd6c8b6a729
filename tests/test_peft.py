"""Hugging Face PEFT interop against the real library (PyTorch, CPU, float32): adapters
exported here load in peft with the same logits, and adapters trained in peft load here."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b

import lorax
from lorax.models import gpt2, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_models import _hf_gpt2, _hf_llama, _tokens  # noqa: E402

MODELS = {"gpt2": (_hf_gpt2, gpt2), "llama": (_hf_llama, llama)}
PATTERN_MODULE = {"gpt2": "c_fc", "llama": "down_proj"}  # a pattern key must match a path
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {}
    for name, (make, module) in MODELS.items():
        directory = tmp_path_factory.mktemp(name)
        make().save_pretrained(directory)
        out[name] = directory
    return out


def _torch_base(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def _peft_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_exported_adapter_loads_in_peft(bases, tmp_path, name, scan_layers):
    model, params = MODELS[name][1].from_pretrained(bases[name], scan_layers=scan_layers)
    lp = lorax.wrap(params, rank=4, alpha=8, targets=TARGETS[name], key=jax.random.key(0),
                    rank_pattern={PATTERN_MODULE[name]: 2},
                    alpha_pattern={PATTERN_MODULE[name]: 3.0})
    lp = randomize_b(lp, jax.random.key(1))
    lorax.export_peft(tmp_path, lp, model=name, base_model_name="test/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "test/base"
    torch_model = peft.PeftModel.from_pretrained(_torch_base(bases[name]), tmp_path).eval()
    ids = _tokens()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(lorax.lora(model.apply)({"params": lp}, ids))
    base = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(ours - base).max() > 1e-2  # the adapter changes the outputs
    np.testing.assert_allclose(_peft_logits(torch_model, ids), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_adapter_trained_in_peft_imports(bases, tmp_path, name):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS[name][:2],
                             use_rslora=True, rank_pattern={TARGETS[name][1]: 2},
                             fan_in_fan_out=name == "gpt2")
    torch_model = peft.get_peft_model(_torch_base(bases[name]), config)
    opt = torch.optim.AdamW([p for p in torch_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(_tokens(4, 12, seed=5))
    for _ in range(5):  # brief training: B is no longer zero
        loss = torch_model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch_model.eval()
    torch_model.save_pretrained(tmp_path)
    for scan_layers in (False, True):
        model, params = MODELS[name][1].from_pretrained(bases[name], scan_layers=scan_layers)
        lp = lorax.import_peft(tmp_path, params, model=name)
        n_leaves = sum(isinstance(x, lorax.LoraWeight) for x in
                       jax.tree.leaves(lp, is_leaf=lambda x: isinstance(x, lorax.LoraWeight)))
        per_layer = 3 if name == "gpt2" else 2  # GPT-2's "c_proj" names attn's and mlp's
        assert n_leaves == per_layer * (1 if scan_layers else 2)
        check = _tokens(2, 9, seed=6)
        with jax.default_matmul_precision("highest"):
            ours = np.asarray(lorax.lora(model.apply)({"params": lp}, check))
        np.testing.assert_allclose(ours, _peft_logits(torch_model, check), atol=1e-4, rtol=1e-4)
        # and back out again: the same tensors
        lorax.export_peft(tmp_path / f"again{scan_layers}", lp, model=model)
        from safetensors.numpy import load_file
        theirs = load_file(tmp_path / "adapter_model.safetensors")
        mine = load_file(tmp_path / f"again{scan_layers}" / "adapter_model.safetensors")
        assert sorted(theirs) == sorted(mine)
        for k in theirs:
            np.testing.assert_array_equal(theirs[k], mine[k])


def test_import_onto_nf4_base(bases, tmp_path):
    model, params = gpt2.from_pretrained(bases["gpt2"])
    lp = randomize_b(lorax.wrap(params, rank=4, targets=["c_attn"]), jax.random.key(2))
    lorax.export_peft(tmp_path, lp)
    qlp = lorax.import_peft(tmp_path, lorax.quantize(params, "nf4", compute_dtype=jnp.float32))
    ids = _tokens()
    got = lorax.lora(model.apply)({"params": qlp}, ids)
    want = model.apply({"params": lorax.merge(qlp)}, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_import_errors(bases, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, params = gpt2.from_pretrained(bases["gpt2"])
    lp = randomize_b(lorax.wrap(params, rank=4, targets=["c_attn"]), jax.random.key(2))
    lorax.export_peft(tmp_path, lp)
    # a base of another shape: the error names the module, the factors and the base shape
    other = jax.tree.map(lambda x: jnp.zeros((x.shape[0], 2 * x.shape[1]))
                         if x.ndim == 2 and x.shape == (32, 96) else x, params)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*\(32, 192\)"):
        lorax.import_peft(tmp_path, other)
    # tensors that fit nothing are an error, not dropped
    with pytest.raises(ValueError, match="fit no parameter"):
        lorax.import_peft(tmp_path, {"wte": params["wte"], "h_0": params["h_0"]})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        lorax.import_peft(tmp_path, params)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not LORA"):
        lorax.import_peft(tmp_path, params)
    missing = tmp_path / "missing"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lorax.import_peft(missing, params)
    with pytest.raises(FileNotFoundError, match="Hub could not provide"):
        lorax.import_peft("lorax-test/no-such-adapter", params)
    with pytest.raises(ValueError, match="no LoRA leaves"):
        lorax.export_peft(tmp_path / "x", params)
