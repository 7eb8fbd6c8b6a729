"""LoRA dropout: on the low-rank path's input only, only with a dropout_rng, fresh per use
and per scan iteration, unbiased, and differentiable."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

W = jax.random.normal(jax.random.key(0), (16, 8))
X = jax.random.normal(jax.random.key(1), (4, 16))


def f(p, x):
    return x @ p["w"]


def _lp(dropout=0.5):
    return randomize_b(lorax.wrap({"w": W}, rank=4, dropout=dropout), jax.random.key(2), scale=0.5)


def test_dropout_needs_a_key_and_a_rate():
    lp = _lp()
    apply = jax.jit(lorax.lora(f))
    plain = apply(lp, X)
    np.testing.assert_allclose(plain, f(lorax.merge(lp), X), atol=1e-5)  # no key: no dropout
    a = apply(lp, X, dropout_rng=jax.random.key(3))
    b = apply(lp, X, dropout_rng=jax.random.key(3))
    c = apply(lp, X, dropout_rng=jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain) and not np.allclose(a, c)
    no_rate = _lp(dropout=0.0)
    np.testing.assert_array_equal(
        apply(no_rate, X, dropout_rng=jax.random.key(3)), apply(no_rate, X)
    )


def test_dropout_touches_only_the_low_rank_path_and_is_unbiased():
    lp = lorax.wrap({"w": W}, rank=4, dropout=0.5)  # B = 0: the low-rank path is zero
    apply = jax.jit(lorax.lora(f))
    np.testing.assert_allclose(apply(lp, X, dropout_rng=jax.random.key(5)), X @ W, atol=1e-5)
    lp = _lp(dropout=0.3)
    mean = np.mean(
        [
            np.asarray(apply(lp, X, dropout_rng=k))
            for k in jax.random.split(jax.random.key(6), 3000)
        ],
        axis=0,
    )
    low = f(lorax.merge(lp), X) - X @ W
    np.testing.assert_allclose(mean - X @ W, low, atol=0.08 * float(jnp.abs(low).max()))


def test_dropout_differs_per_use_and_per_scan_iteration_and_trains():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x, nn.Dense(8, use_bias=False, name="d")(x)  # same input every iteration

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(
                Layer, variable_axes={"params": 0}, split_rngs={"params": False}, length=2
            )(name="ScanLayers")(x, None)[1]

    model = Net()
    params = model.init(jax.random.key(0), X)["params"]  # the two layers share weights
    lp = randomize_b(lorax.wrap(params, rank=4, dropout=0.5), jax.random.key(1), scale=0.5)
    lp = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), lp)  # and factors
    apply = lorax.lora(model.apply)
    ys = apply({"params": lp}, X)
    np.testing.assert_array_equal(ys[0], ys[1])
    ys = apply({"params": lp}, X, dropout_rng=jax.random.key(7))
    assert not np.allclose(ys[0], ys[1])  # each iteration drew its own mask
    trainable, frozen = lorax.split(lp)
    grads = jax.jit(
        jax.grad(
            lambda t, k: (apply({"params": lorax.combine(t, frozen)}, X, dropout_rng=k) ** 2).sum()
        )
    )(trainable, jax.random.key(8))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_dropout_rate_survives_checkpoints_and_peft(tmp_path):
    import json

    lp = _lp(dropout=0.25)
    lorax.save(tmp_path / "ckpt", lp)
    assert lorax.load(tmp_path / "ckpt", {"w": W})["w"].dropout == 0.25
    lorax.export_peft(tmp_path / "peft", lp, model={"w": "proj"})
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.25
    assert lorax.import_peft(tmp_path / "peft", {"w": W}, model={"w": "proj"})["w"].dropout == 0.25
