"""DoRA: unmerged equals merged, gradients equal the dense computation with the norm held
constant, it trains, it round-trips through checkpoints, and it equals PyTorch peft's DoRA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fit, randomize_b

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


def _perturb(lp, key):
    """Non-zero B and a magnitude away from the base's norms, so every term matters."""
    lp = randomize_b(lp, key, scale=0.3)
    trainable, frozen = lorax.split(lp)
    trainable = jax.tree.map(lambda x: x * 1.3 if x.ndim == 1 else x, trainable)
    return lorax.combine(trainable, frozen)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(24, name="up")(x)
        x = nn.DenseGeneral((4, 6), name="heads")(jnp.tanh(x))  # kernel (24, 4, 6)
        x = nn.DenseGeneral(16, axis=(-2, -1), name="merge")(jnp.tanh(x))  # kernel (4, 6, 16)
        return x


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(16, name="d")(x)), None


class Stack(nn.Module):
    """Three layers under nn.scan: stacked kernels, one DoRA magnitude row per layer."""

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return nn.Dense(5, name="head")(layers(name="ScanLayers")(x, None)[0])


def _dense_reference(lp):
    """W' = m (W + sAB) / stop_gradient(||W + sAB||), written densely per leaf."""

    def leaf(x):
        if not isinstance(x, lorax.DoraWeight):
            return x
        merged = lorax.LoraWeight(x.base, x.a, x.b, scale=x.scale).materialize()
        ns, ni = x.stack_ndim, x.in_ndim
        axes = tuple(range(ns, ns + ni))
        norm = jax.lax.stop_gradient(jnp.sqrt((merged**2).sum(axes, keepdims=True)))
        return jnp.expand_dims(x.magnitude, axes) * merged / norm

    return jax.tree.map(leaf, lp, is_leaf=lambda x: isinstance(x, lorax.DoraWeight))


@pytest.mark.parametrize("model,shape", [(Net(), (5, 16)), (Stack(), (5, 16))])
def test_dora_equals_merged_and_dense_gradients(model, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    params = model.init(jax.random.key(1), x)["params"]
    lp = lorax.wrap(params, rank=3, alpha=6, dora=True, key=jax.random.key(2))
    # jitted: one compile each instead of one per primitive (the values are the same)
    apply, dense_apply = jax.jit(lorax.lora(model.apply)), jax.jit(model.apply)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(
            apply({"params": lp}, x), dense_apply({"params": params}, x), atol=1e-5
        )  # at init
        lp = _perturb(lp, jax.random.key(3))
        unmerged = apply({"params": lp}, x)
        np.testing.assert_allclose(
            unmerged, dense_apply({"params": lorax.merge(lp)}, x), rtol=1e-5, atol=1e-5
        )
        trainable, frozen = lorax.split(lp)
        loss = lambda t: (
            lorax.lora(model.apply)({"params": lorax.combine(t, frozen)}, x) ** 2
        ).sum()  # noqa: E731
        dense_loss = lambda t: (  # noqa: E731
            model.apply({"params": _dense_reference(lorax.combine(t, frozen))}, x) ** 2
        ).sum()
        got, want = jax.jit(jax.grad(loss))(trainable), jax.jit(jax.grad(dense_loss))(trainable)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got))


def test_dora_on_nf4_base_trains():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (64, 16))
    y = jnp.sin(3 * x)
    params = model.init(jax.random.key(1), x)["params"]
    q = lorax.quantize(params, "nf4", compute_dtype=jnp.float32)
    lp = lorax.wrap(q, rank=4, dora=True, key=jax.random.key(2))
    trainable, frozen = lorax.split(lp)
    apply = lorax.lora(model.apply)
    loss = lambda t: ((apply({"params": lorax.combine(t, frozen)}, x) - y) ** 2).mean()  # noqa
    trainable, values = fit(loss, trainable, 80, lr=3e-2)
    assert values[-1] < 0.7 * values[0]
    lp = lorax.combine(trainable, frozen)
    np.testing.assert_allclose(
        apply({"params": lp}, x), model.apply({"params": lorax.merge(lp)}, x), atol=1e-4
    )


def test_dora_checkpoint_round_trip(tmp_path):
    params = Net().init(jax.random.key(1), jnp.ones((1, 16)))["params"]
    lp = _perturb(lorax.wrap(params, rank=3, dora=True), jax.random.key(4))
    lorax.save(tmp_path / "dora", lp)
    loaded = lorax.load(tmp_path / "dora", params)
    assert isinstance(loaded["up"]["kernel"], lorax.DoraWeight)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)


torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_equals_peft(tmp_path, name):
    """Exported here and loaded by peft (use_dora), and trained in peft and imported here:
    the same logits as PyTorch peft's DoRA (float32, CPU)."""
    from test_models import _hf_gpt2, _hf_llama, _tokens

    from lorax.models import gpt2, llama

    hf = _hf_gpt2() if name == "gpt2" else _hf_llama()
    hf.save_pretrained(tmp_path / "base")
    module = gpt2 if name == "gpt2" else llama
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    model, params = module.from_pretrained(tmp_path / "base", scan_layers=True)
    lp = _perturb(
        lorax.wrap(params, rank=4, alpha=8, targets=targets, dora=True, key=jax.random.key(0)),
        jax.random.key(1),
    )
    lorax.export_peft(tmp_path / "ours", lp, model=model)
    ids = _tokens()
    base = type(hf).from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(lorax.lora(model.apply)({"params": lp}, ids))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)

    # peft-trained DoRA, imported
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=targets[:2], use_dora=True, fan_in_fan_out=name == "gpt2"
    )
    trained = peft.get_peft_model(type(hf).from_pretrained(tmp_path / "base"), config)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=2e-2)
    batch = torch.tensor(_tokens(4, 12, seed=5))
    for _ in range(4):
        loss = trained(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval().save_pretrained(tmp_path / "theirs")
    imported = lorax.import_peft(tmp_path / "theirs", params, model=model)
    with torch.no_grad():
        expected = trained(torch.tensor(ids)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(lorax.lora(model.apply)({"params": imported}, ids))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
