"""PEFT interop beyond LoRA factors (issue 17, item 4), against PyTorch peft on the CPU
(float32): IA3 adapters, ``modules_to_save`` and LoRA's ``bias="all"`` / ``"lora_only"``.
Each adapter is trained-like (every trainable tensor perturbed), saved by one side and loaded
by the other, and the logits are compared (atol 1e-4)."""

import json

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import lorax
from lorax.errors import LoraxValueError
from lorax.io.peft import CONFIG_FILE, WEIGHTS_FILE
from lorax.models import gpt2, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_models import _hf_gpt2, _hf_llama, _tokens  # noqa: E402

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

FAMILIES = {"gpt2": gpt2, "llama": llama}
IDS = _tokens(2, 7, seed=3)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each tiny base saved once, and loaded by lorax (unscanned and scanned)."""
    out = {}
    for name, make in (("gpt2", _hf_gpt2), ("llama", _hf_llama)):
        directory = tmp_path_factory.mktemp(name)
        make().save_pretrained(directory)
        out[name] = {
            "dir": directory,
            **{s: FAMILIES[name].from_pretrained(directory, scan_layers=s) for s in (False, True)},
        }
    return out


def _torch_base(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


_APPLY = {}


def _lorax_logits(model, tree, ids=IDS):
    """The logits of the merged dense weights (one compile per model: every tree merges to
    the base's structure); ``lorax.lora`` itself is checked once, in
    test_lorax_adapters_load_in_peft."""
    apply = _APPLY.setdefault(id(model), jax.jit(model.apply))
    with jax.default_matmul_precision("highest"):
        return np.asarray(apply({"params": jax.jit(lorax.merge)(tree)}, ids))


def _perturb_torch(model, seed):
    """Every trainable tensor of a peft model moved, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _perturb_lorax(tree, seed):
    """Every trainable array of a lorax tree moved (LoRA factors, IA3 vectors, Unfrozen)."""
    trainable, frozen = lorax.split(tree)
    rng = np.random.default_rng(seed)
    moved = jax.tree.map(
        lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(x.dtype), trainable
    )
    return lorax.combine(moved, frozen)


def _kinds(tree):
    leaves = jax.tree.leaves(tree, is_leaf=lorax.is_lorax_leaf)
    return sorted({type(x).__name__ for x in leaves if lorax.is_lorax_leaf(x)})


PEFT_ADAPTERS = {
    "gpt2-ia3": (
        "gpt2",
        lambda: peft.IA3Config(
            target_modules=["c_fc", "mlp.c_proj"],  # biased: feedforward, input-scaled
            feedforward_modules=["c_fc", "mlp.c_proj"],
            modules_to_save=["ln_f"],
            fan_in_fan_out=True,
        ),
    ),
    "llama-ia3": (
        "llama",
        lambda: peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            modules_to_save=["lm_head", "model.norm"],
        ),
    ),
    "gpt2-lora-bias-all": (
        "gpt2",
        lambda: peft.LoraConfig(
            r=2,
            target_modules=["c_attn"],
            bias="all",
            modules_to_save=["ln_f"],
            fan_in_fan_out=True,
        ),
    ),
    "gpt2-lora-bias-lora-only": (
        "gpt2",
        lambda: peft.LoraConfig(
            r=2, target_modules=["c_attn", "c_fc"], bias="lora_only", fan_in_fan_out=True
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_ADAPTERS))
def test_peft_adapter_imports_and_exports_back(bases, tmp_path, case):
    name, make_config = PEFT_ADAPTERS[case]
    theirs = peft.get_peft_model(_torch_base(bases[name]["dir"]), make_config())
    theirs = _perturb_torch(theirs, seed=len(case))
    theirs.save_pretrained(tmp_path / "peft")
    want = _torch_logits(theirs)
    scan = case == "llama-ia3"  # one scanned import: the stacked paths take every layer
    model, params = bases[name][scan]
    assert np.abs(want - _torch_logits(_torch_base(bases[name]["dir"]))).max() > 1e-2
    tree = lorax.import_peft(tmp_path / "peft", params, model=name)
    assert "Unfrozen" in _kinds(tree)
    np.testing.assert_allclose(_lorax_logits(model, tree), want, atol=1e-4, rtol=1e-4)
    # and back: what lorax writes, peft loads to the same logits
    lorax.export_peft(tmp_path / "back", tree, model=name)
    again = peft.PeftModel.from_pretrained(_torch_base(bases[name]["dir"]), tmp_path / "back")
    np.testing.assert_allclose(_torch_logits(again.eval()), want, atol=1e-4, rtol=1e-4)
    ours = json.loads((tmp_path / "back" / CONFIG_FILE).read_text())
    mine = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert ours["peft_type"] == mine["peft_type"]
    assert ours.get("bias", "none") == mine.get("bias", "none")


def test_lorax_adapters_load_in_peft(bases, tmp_path):
    """Trees built in lorax: LoRA with trained biases (of adapted modules: "lora_only"; of
    others too: "all") and a saved module, and IA3 on a scanned Llama with a saved head."""
    model, params = bases["gpt2"][False]
    lora = lorax.wrap(params, rank=2, alpha=4, targets=["c_attn"], key=jax.random.key(0))
    cases = {
        "lora_only": lorax.unfreeze(lora, targets=r".*c_attn/bias"),
        "all": lorax.unfreeze(lora, targets=r".*(c_attn|c_fc)/bias|ln_f/.*"),
    }
    for bias, tree in cases.items():
        tree = _perturb_lorax(tree, seed=len(bias))
        out = tmp_path / bias
        lorax.export_peft(out, tree, model="gpt2")
        config = json.loads((out / CONFIG_FILE).read_text())
        assert config["bias"] == bias
        saved = load_file(out / WEIGHTS_FILE)
        assert "base_model.model.transformer.h.1.attn.c_attn.base_layer.bias" in saved
        if bias == "all":
            assert config["modules_to_save"] == ["transformer.ln_f"]
            assert "base_model.model.transformer.h.0.mlp.c_fc.bias" in saved
        theirs = peft.PeftModel.from_pretrained(_torch_base(bases["gpt2"]["dir"]), out)
        ours = _lorax_logits(model, tree)
        assert np.abs(ours - _lorax_logits(model, params)).max() > 1e-2
        np.testing.assert_allclose(_torch_logits(theirs.eval()), ours, atol=1e-4, rtol=1e-4)
        if bias == "all":  # lorax.lora's own forward, leaves unmerged: the same logits
            with jax.default_matmul_precision("highest"):
                lazy = jax.jit(lorax.lora(model.apply))({"params": tree}, IDS)
            np.testing.assert_allclose(np.asarray(lazy), ours, atol=1e-4, rtol=1e-4)

    model, params = bases["llama"][True]
    tree = lorax.ia3(params, targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
    tree = _perturb_lorax(lorax.unfreeze(tree, targets=["lm_head"]), seed=7)
    lorax.export_peft(tmp_path / "ia3", tree, model="llama")
    config = json.loads((tmp_path / "ia3" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "IA3" and config["modules_to_save"] == ["lm_head"]
    assert all(n.endswith("down_proj") for n in config["feedforward_modules"])
    theirs = peft.PeftModel.from_pretrained(_torch_base(bases["llama"]["dir"]), tmp_path / "ia3")
    np.testing.assert_allclose(
        _torch_logits(theirs.eval()), _lorax_logits(model, tree), atol=1e-4, rtol=1e-4
    )


def test_unrepresentable_combinations_are_errors(bases, tmp_path):
    _, params = bases["gpt2"][False]
    # peft's IA3 scales a biased module's whole output, lorax's its kernel: refused both ways
    with pytest.raises(LoraxValueError, match=r"h_0/attn/c_attn/kernel.*\(x·W \+ b\)·l"):
        lorax.export_peft(tmp_path / "a", lorax.ia3(params, targets=["c_attn"]))
    theirs = peft.get_peft_model(
        _torch_base(bases["gpt2"]["dir"]), peft.IA3Config(target_modules=["c_attn"])
    )
    theirs.save_pretrained(tmp_path / "a")
    with pytest.raises(LoraxValueError, match=r"h_0/attn/c_attn/kernel.*feedforward"):
        lorax.import_peft(tmp_path / "a", params)
    ia3 = lorax.ia3(params, targets=["c_attn"], feedforward=["c_attn"])
    with pytest.raises(LoraxValueError, match=r"h_0/attn/c_attn/bias.*carries an adapter"):
        lorax.export_peft(tmp_path / "a", lorax.unfreeze(ia3, targets=r".*c_attn/bias"))
    small = {"proj": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    tree = lorax.unfreeze(lorax.wrap(small, rank=2), targets=["bias"])
    with pytest.raises(LoraxValueError, match=r"no Hugging Face tensor is known.*'proj/bias'"):
        lorax.export_peft(tmp_path / "b", tree, model={"proj/kernel": "proj"})
    lora = lorax.wrap(params, rank=2, targets=["c_attn"])
    lorax.export_peft(tmp_path / "c", lora)
    config = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    for bad, match in [({"bias": "some"}, "bias='some'"), ({"lora_bias": True}, "lora_bias")]:
        (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps({**config, **bad}))
        with pytest.raises(LoraxValueError, match=match):
            lorax.import_peft(tmp_path / "c", params)
    # a full tensor for a parameter the adapter also adapts: one or the other
    (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps(config))
    tensors = load_file(tmp_path / "c" / WEIGHTS_FILE)
    kernel = np.asarray(params["h_0"]["attn"]["c_attn"]["kernel"])
    tensors["base_model.model.transformer.h.0.attn.c_attn.weight"] = kernel
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp_path / "c" / WEIGHTS_FILE))
    with pytest.raises(LoraxValueError, match=r"h_0/attn/c_attn/kernel.*both adapted"):
        lorax.import_peft(tmp_path / "c", params)


UNFREEZE = {  # what lorax.unfreeze may choose beside LoRA on c_attn
    "c_attn bias (lora_only)": r".*attn/c_attn/bias",
    "c_fc bias (all)": r".*mlp/c_fc/bias",
    "ln_1 bias (all)": r".*ln_1/bias",
    "ln_2 scale (modules_to_save)": r".*ln_2/scale",
    "ln_f (modules_to_save)": r"ln_f/.*",
    "wpe (modules_to_save)": r"wpe/embedding",
}


@settings(
    max_examples=12,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    chosen=st.sets(st.sampled_from(sorted(UNFREEZE)), min_size=1),
    scan=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unfrozen_round_trip_property(bases, tmp_path_factory, chosen, scan, seed):
    """Any mix of trained biases and saved modules, exported and imported back: the same
    merged weights, every Unfrozen path Unfrozen again, and the bias option peft needs."""
    _, params = bases["gpt2"][scan]
    lp = lorax.wrap(params, rank=2, targets=["c_attn"], key=jax.random.key(seed))
    tree = lorax.unfreeze(lp, targets="|".join(f"({UNFREEZE[c]})" for c in sorted(chosen)))
    tree = _perturb_lorax(tree, seed)
    out = tmp_path_factory.mktemp("rt")
    lorax.export_peft(out, tree, model="gpt2")
    config = json.loads((out / CONFIG_FILE).read_text())
    kinds = " ".join(chosen)
    want_bias = "all" if "(all)" in kinds else "lora_only" if "lora_only" in kinds else "none"
    assert config["bias"] == want_bias
    assert bool(config["modules_to_save"]) == ("modules_to_save" in kinds)
    back = lorax.import_peft(out, params, model="gpt2")
    flat = dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorax.is_lorax_leaf)[0])
    again = dict(jax.tree_util.tree_flatten_with_path(back, is_leaf=lorax.is_lorax_leaf)[0])
    for key, leaf in flat.items():
        if isinstance(leaf, lorax.Unfrozen):
            assert isinstance(again[key], lorax.Unfrozen)
    merged, merged_back = lorax.merge(tree), lorax.merge(back)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(merged_back), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
