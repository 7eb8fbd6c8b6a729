"""IA3: unmerged equals merged, gradients equal the dense computation, it trains, and it
saves / loads; outputs (keys, values) and inputs (feed-forward) scaled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fit

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((2, 8), name="value")(x)  # (16, 2, 8)
        h = nn.DenseGeneral(16, axis=(-2, -1), name="down")(jnp.tanh(h))  # (2, 8, 16)
        return x + h, None


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="key")(x)
        layers = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x = layers(name="ScanLayers")(x, None)[0]
        return nn.Dense(3, name="ff_out")(jnp.tanh(x))


def _perturbed(params, base=None):
    tree = lorax.ia3(
        params if base is None else base,
        targets=["key", "value", "down", "ff_out"],
        feedforward=["down", "ff_out"],
    )
    trainable, frozen = lorax.split(tree)
    trainable = jax.tree.map(
        lambda v: v + 0.5 * jax.random.normal(jax.random.key(v.size), v.shape), trainable
    )
    return lorax.combine(trainable, frozen)


def test_ia3_equals_merged_with_dense_gradients():
    model, x = Net(), jax.random.normal(jax.random.key(0), (4, 5, 16))
    params = model.init(jax.random.key(1), x)["params"]
    fresh = lorax.ia3(params, targets=["key", "value", "down"], feedforward=["down"])
    np.testing.assert_allclose(
        lorax.lora(model.apply)({"params": fresh}, x), model.apply({"params": params}, x), atol=1e-6
    )
    tree = _perturbed(params)
    leaf = tree["ScanLayers"]["down"]["kernel"]
    assert leaf.on == "in" and leaf.vector.shape == (2, 2, 8)
    assert tree["ScanLayers"]["value"]["kernel"].vector.shape == (2, 2, 8)
    trainable, frozen = lorax.split(tree)
    with jax.default_matmul_precision("highest"):
        out = lorax.lora(model.apply)({"params": tree}, x)
        np.testing.assert_allclose(
            out, model.apply({"params": lorax.merge(tree)}, x), rtol=1e-5, atol=1e-5
        )
        loss = lambda t: (
            lorax.lora(model.apply)(  # noqa: E731
                {"params": lorax.combine(t, frozen)}, x
            )
            ** 2
        ).sum()
        dense = lambda t: (
            model.apply(  # noqa: E731
                {"params": lorax.merge(lorax.combine(t, frozen))}, x
            )
            ** 2
        ).sum()
        got, want = jax.grad(loss)(trainable), jax.grad(dense)(trainable)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_ia3_on_nf4_trains_and_round_trips(tmp_path):
    model, x = Net(), jax.random.normal(jax.random.key(0), (32, 5, 16))
    y = jnp.cos(x[..., :3])
    params = model.init(jax.random.key(1), x)["params"]
    q = lorax.quantize(params, "nf4", compute_dtype=jnp.float32, targets=["key", "value", "down"])
    tree = lorax.ia3(q, targets=["key", "value", "down", "ff_out"], feedforward=["down", "ff_out"])
    trainable, frozen = lorax.split(tree)
    assert sum(v.size for v in jax.tree.leaves(trainable)) == 16 + 2 * 16 + 2 * 16 + 16
    apply = lorax.lora(model.apply)
    loss = lambda t: ((apply({"params": lorax.combine(t, frozen)}, x) - y) ** 2).mean()  # noqa
    trainable, values = fit(loss, trainable, 60, lr=5e-2)
    assert values[-1] < 0.8 * values[0]
    tree = lorax.combine(trainable, frozen)
    lorax.save(tmp_path / "ia3", tree)
    loaded = lorax.load(tmp_path / "ia3", q)
    np.testing.assert_array_equal(apply({"params": loaded}, x), apply({"params": tree}, x))
