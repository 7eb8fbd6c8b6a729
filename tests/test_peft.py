"""Hugging Face PEFT interop against the real library (PyTorch, CPU, float32): adapters
exported here load in peft with the same logits, and adapters trained in peft load here."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b

import lorax
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.io.peft import CONFIG_FILE, WEIGHTS_FILE, PeftModuleMap, register_peft_family
from lorax.models import gpt2, llama
from lorax.paths import path_str

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

from test_models import _hf_gpt2, _hf_llama, _tokens  # noqa: E402

MODELS = {"gpt2": (_hf_gpt2, gpt2), "llama": (_hf_llama, llama)}
PATTERN_MODULE = {"gpt2": "c_fc", "llama": "down_proj"}  # a pattern key must match a path
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {}
    for name, (make, _) in MODELS.items():
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
    lp = lorax.wrap(
        params,
        rank=4,
        alpha=8,
        targets=TARGETS[name],
        key=jax.random.key(0),
        rank_pattern={PATTERN_MODULE[name]: 2},
        alpha_pattern={PATTERN_MODULE[name]: 3.0},
    )
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
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=TARGETS[name][:2],
        use_rslora=True,
        rank_pattern={TARGETS[name][1]: 2},
        fan_in_fan_out=name == "gpt2",
    )
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
        n_leaves = sum(
            isinstance(x, lorax.LoraWeight)
            for x in jax.tree.leaves(lp, is_leaf=lambda x: isinstance(x, lorax.LoraWeight))
        )
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
    other = jax.tree.map(
        lambda x: (
            jnp.zeros((x.shape[0], 2 * x.shape[1])) if x.ndim == 2 and x.shape == (32, 96) else x
        ),
        params,
    )
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*\(32, 192\)"):
        lorax.import_peft(tmp_path, other)
    # tensors that fit nothing are an error, not dropped
    with pytest.raises(ValueError, match="fit no parameter"):
        lorax.import_peft(tmp_path, {"wte": params["wte"], "h_0": params["h_0"]})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        lorax.import_peft(tmp_path, params)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "BOFT"}))
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


# ----------------------------------------------------- the module-map protocol (issue 13)


class _TinyBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1], name="proj")(x), None


class Tiny(nn.Module):
    """A model of one's own, not lorax's: its PEFT module map is its own method."""

    n_layers: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        blocks = nn.scan(
            _TinyBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.n_layers,
        )
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(2, name="head")(x)

    def peft_modules(self, params):
        return PeftModuleMap(
            modules={
                "embed/kernel": "encoder.embed",
                "head/kernel": "classifier",
                "blocks/proj/kernel": [
                    (f"encoder.layer.{i}.proj", i) for i in range(self.n_layers)
                ],
            },
            task_type=None,
        )


class TorchTiny(torch.nn.Module):
    """Tiny in PyTorch, with the module names of Tiny.peft_modules."""

    def __init__(self, params, n_layers):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.embed = self._linear(params["embed"])
        self.encoder.layer = torch.nn.ModuleList()
        for i in range(n_layers):
            block = torch.nn.Module()
            block.proj = self._linear(jax.tree.map(lambda x, i=i: x[i], params["blocks"]["proj"]))
            self.encoder.layer.append(block)
        self.classifier = self._linear(params["head"])

    @staticmethod
    def _linear(p):
        kernel, bias = np.asarray(p["kernel"]), np.asarray(p["bias"])
        layer = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(kernel.T))
            layer.bias.copy_(torch.tensor(bias))
        return layer

    def forward(self, x):
        x = self.encoder.embed(x)
        for block in self.encoder.layer:
            x = x + block.proj(x)
        return self.classifier(x)


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    params = model.init(jax.random.key(1), x)["params"]
    lp = lorax.wrap(params, rank=3, alpha=6, key=jax.random.key(2), rank_pattern={"head": 2})
    return model, params, randomize_b(lp, jax.random.key(3)), x


def _lora_leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorax.is_lorax_leaf)[0]
    return {path_str(p): v for p, v in flat if isinstance(v, lorax.LoraWeight)}


def test_own_model_family_round_trips(tiny, tmp_path):
    """A model outside lorax.models brings its own module map: exported, the files name its
    modules (a scanned stack as one module per layer); imported, the same factors."""
    model, params, lp, x = tiny
    lorax.export_peft(tmp_path, lp, model=model)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(
        ["encoder.embed", "classifier"] + [f"encoder.layer.{i}.proj" for i in range(3)]
    )
    assert config["fan_in_fan_out"] is False and config["task_type"] is None
    assert config["r"] == 3 and config["rank_pattern"] == {"classifier": 2}
    back = lorax.import_peft(tmp_path, params, model=model)
    want, got = _lora_leaves(lp), _lora_leaves(back)
    assert sorted(want) == sorted(got) == ["blocks/proj/kernel", "embed/kernel", "head/kernel"]
    for path in want:
        np.testing.assert_array_equal(got[path].a, want[path].a)
        np.testing.assert_array_equal(got[path].b, want[path].b)
        assert got[path].scale == pytest.approx(want[path].scale)
    np.testing.assert_allclose(
        lorax.lora(model.apply)({"params": back}, x),
        lorax.lora(model.apply)({"params": lp}, x),
        rtol=1e-6,
        atol=1e-6,
    )


def test_own_model_family_loads_in_peft(tiny, tmp_path):
    """The same adapter in PyTorch peft, on the same model written in torch: the same
    outputs."""
    model, params, lp, x = tiny
    lorax.export_peft(tmp_path, lp, model=model)
    torch_model = peft.PeftModel.from_pretrained(TorchTiny(params, 3), tmp_path).eval()
    with torch.no_grad():
        theirs = torch_model(torch.tensor(np.asarray(x))).numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(lorax.lora(model.apply)({"params": lp}, x))
    assert np.abs(ours - model.apply({"params": params}, x)).max() > 1e-3
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)


def test_registered_family_name(tiny, tmp_path):
    """A name registered with register_peft_family works as "gpt2" does: a family object or
    a function of the params."""
    model, params, lp, _ = tiny
    register_peft_family("tiny-test", model)
    lorax.export_peft(tmp_path / "a", lp, model="tiny-test")
    register_peft_family("tiny-test-fn", lambda p: model.peft_modules(p))
    lorax.export_peft(tmp_path / "b", lp, model="tiny-test-fn")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    back = lorax.import_peft(tmp_path / "a", params, model="tiny-test-fn")
    assert sorted(_lora_leaves(back)) == sorted(_lora_leaves(lp))


def test_unknown_family_name(tiny, tmp_path):
    _, params, lp, _ = tiny
    for call in (
        lambda: lorax.export_peft(tmp_path, lp, model="no-such-family"),
        lambda: lorax.import_peft(tmp_path / "absent", params, model="no-such-family"),
    ):
        with pytest.raises(LoraxValueError, match="no model family 'no-such-family'") as err:
            call()  # import_peft: before looking for the (absent) directory
        assert "'gpt2'" in str(err.value) and "'llama'" in str(err.value)  # registered
        assert "import lorax.models" in str(err.value)


def test_model_argument_errors(tiny, tmp_path):
    model, params, lp, _ = tiny
    with pytest.raises(LoraxTypeError, match="model must name a family.*got int 3"):
        lorax.export_peft(tmp_path, lp, model=3)

    class Bad:
        def peft_modules(self, params):
            return {"head/kernel": "classifier"}

    with pytest.raises(
        LoraxTypeError, match="Bad.peft_modules returned dict, not a lorax.io.peft.PeftModuleMap"
    ):
        lorax.export_peft(tmp_path, lp, model=Bad())
    with pytest.raises(LoraxTypeError, match="family .* must have a method peft_modules"):
        register_peft_family("bad", 3)
    with pytest.raises(LoraxTypeError, match="name must be a non-empty string"):
        register_peft_family("", model)
    # a stack whose map lists fewer layers than it holds: refused both ways
    short = PeftModuleMap(
        modules={
            **model.peft_modules(params).modules,
            "blocks/proj/kernel": [("encoder.layer.0.proj", 0), ("encoder.layer.1.proj", 1)],
        }
    )
    with pytest.raises(LoraxValueError, match="lists 2 stacked layers for 'blocks/proj/kernel'"):
        lorax.export_peft(tmp_path, lp, model=short)
    lorax.export_peft(tmp_path, lp, model=model)
    with pytest.raises(LoraxValueError, match="lists 2 stacked layers for 'blocks/proj/kernel'"):
        lorax.import_peft(tmp_path, params, model=short)


@pytest.mark.parametrize(
    "modules,error,match",
    [
        ([("a", None)], LoraxTypeError, "modules must be a mapping"),
        ({"w/kernel": []}, LoraxValueError, r"modules\['w/kernel'\] must be a module name"),
        ({"w/kernel": [("a", 0), ("b", 2)]}, LoraxValueError, "each layer 0 .. n-1 once"),
        ({"w/kernel": [("a", 0), ("b", 0)]}, LoraxValueError, "each layer 0 .. n-1 once"),
        ({"w/kernel": [("a", None), ("b", 0)]}, LoraxValueError, "one without a layer index"),
        ({"w/kernel": [("a", "0")]}, LoraxTypeError, "layer str '0'"),
        ({"w/kernel": [(3, None)]}, LoraxTypeError, "names module 3"),
        ({"w/kernel": ["a"]}, LoraxTypeError, "each entry is a pair"),
        ({1: "a"}, LoraxTypeError, "a key of modules is int 1"),
    ],
)
def test_module_map_is_checked(modules, error, match):
    with pytest.raises(error, match=match):
        PeftModuleMap(modules=modules)
    with pytest.raises(LoraxTypeError, match="fan_in_fan_out must be True or False"):
        PeftModuleMap(modules={}, fan_in_fan_out="yes")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_reference_families_agree_with_their_instances(bases, name, scan_layers):
    """model="gpt2" reads the layers from the paths, model=GPT2(...) from its config: the same
    map; fan_in_fan_out comes from the family (GPT-2's Conv1D), not from a class name."""
    module = MODELS[name][1]
    model, params = module.from_pretrained(bases[name], scan_layers=scan_layers)
    by_name = lorax.io.peft.peft_module_map(params, name)
    assert by_name == model.peft_modules(params) == module.peft_modules(params)
    assert by_name.fan_in_fan_out is (name == "gpt2")
    per_layer = 4 if name == "gpt2" else 7  # Llama's untied head is one module more
    assert len(by_name.modules) == per_layer * (1 if scan_layers else 2) + ("lm_head" in params)


def _imports(file):
    tree = ast.parse(Path(file).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_core_does_not_import_the_models():
    """lorax.io.peft knows no model: the models import it and register themselves."""
    import lorax.io.peft as core

    assert not [m for m in _imports(core.__file__) if m.startswith("lorax.models")]
    assert "lorax.io.peft" in set(_imports(Path(core.__file__).parents[1] / "models/gpt2.py"))
    if any(m.startswith("lorax.models") for m in _imports(lorax.__file__)):
        pytest.skip("lorax/__init__.py imports lorax.models: the registry is always full")
    # in a fresh process, the core alone: no models, and "gpt2" says how to get them
    code = (
        "import sys, lorax, lorax.io.peft\n"
        "assert 'lorax.models' not in sys.modules, 'lorax.models was imported'\n"
        "try:\n"
        "    lorax.io.peft.peft_module_map({}, 'gpt2')\n"
        "except lorax.LoraxError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr
    assert "no model family 'gpt2'" in done.stdout and "import lorax.models" in done.stdout


def test_an_interrupted_export_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    """Each file is written under a temporary name and renamed into place: a write that
    dies half way leaves the adapter that was there, readable, never a truncated file."""
    from safetensors.numpy import load_file

    from lorax.io import peft as peft_io

    first = {"w": np.arange(4, dtype=np.float32)}
    peft_io.write_adapter(tmp_path, first, {"r": 1})

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00")  # a header length and no header
        raise KeyboardInterrupt

    monkeypatch.setattr(peft_io, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        peft_io.write_adapter(tmp_path, {"w": np.zeros(4, np.float32)}, {"r": 2})
    again = load_file(str(tmp_path / peft_io.WEIGHTS_FILE))
    np.testing.assert_array_equal(again["w"], first["w"])
    assert json.loads((tmp_path / peft_io.CONFIG_FILE).read_text()) == {"r": 1}
