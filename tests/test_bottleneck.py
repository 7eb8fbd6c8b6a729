"""Bottleneck adapters (serial and parallel) against a hand-written reference; not
mergeable, and merge says where."""

import warnings

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
        return x + nn.Dense(12, name="proj")(jnp.tanh(nn.Dense(12, name="inner")(x))), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return layers(name="ScanLayers")(x, None)[0]


def _reference(params, tree, x, mode):
    """The same network written by hand with the adapter formula."""
    with jax.numpy_rank_promotion("allow"):
        return _reference_layers(params, tree, x, mode)


def _reference_layers(params, tree, x, mode):
    for layer in range(2):
        p = jax.tree.map(lambda v: v[layer], params["ScanLayers"])
        leaf = tree["ScanLayers"]["proj"]["kernel"]
        down, up = leaf.down[layer], leaf.up[layer]
        h = jnp.tanh(x @ p["inner"]["kernel"] + p["inner"]["bias"])
        y = h @ p["proj"]["kernel"]
        source = y if mode == "serial" else h
        x = x + y + jax.nn.gelu(source @ down) @ up + p["proj"]["bias"]
    return x


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_adapter_equals_reference_and_trains(mode):
    model, x = Net(), jax.random.normal(jax.random.key(0), (16, 3, 12))
    params = model.init(jax.random.key(1), x)["params"]
    tree = lorax.adapters(params, targets=["proj"], bottleneck=4, mode=mode, activation="gelu")
    apply = lorax.lora(model.apply)
    np.testing.assert_allclose(
        apply({"params": tree}, x), model.apply({"params": params}, x), atol=1e-6
    )  # up = 0: unchanged at init
    trainable, frozen = lorax.split(tree)
    trainable = jax.tree.map(
        lambda v: v + 0.2 * jax.random.normal(jax.random.key(2), v.shape), trainable
    )
    tree = lorax.combine(trainable, frozen)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(
            apply({"params": tree}, x), _reference(params, tree, x, mode), rtol=1e-5, atol=1e-5
        )
        got = jax.grad(lambda t: (apply({"params": lorax.combine(t, frozen)}, x) ** 2).sum())(
            trainable
        )
        want = jax.grad(
            lambda t: (_reference(params, lorax.combine(t, frozen), x, mode) ** 2).sum()
        )(trainable)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    y = jnp.sin(x)
    _, values = fit(
        lambda t: ((apply({"params": lorax.combine(t, frozen)}, x) - y) ** 2).mean(),
        trainable,
        40,
        lr=2e-2,
    )
    assert values[-1] < 0.8 * values[0]


def test_adapters_are_not_mergeable_and_say_where(tmp_path):
    model, x = Net(), jnp.ones((2, 3, 12))
    params = model.init(jax.random.key(1), x)["params"]
    tree = lorax.adapters(params, targets=["proj"])
    with pytest.raises(ValueError, match=r"'ScanLayers/proj/kernel'.*cannot be merged"):
        lorax.merge(tree)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lorax.LoraxDensifyWarning)
        with pytest.raises(lorax.LoraxDensifyError, match="proj/kernel"):
            lorax.lora(lambda p: jnp.sin(p["ScanLayers"]["proj"]["kernel"]))(tree)
    lorax.save(tmp_path / "a", tree)
    loaded = lorax.load(tmp_path / "a", params)
    np.testing.assert_array_equal(
        lorax.lora(model.apply)({"params": loaded}, x), lorax.lora(model.apply)({"params": tree}, x)
    )
    with pytest.raises(ValueError, match="2-D"):
        lorax.adapters(
            {"k": {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((2, 3))}}, targets=["k"]
        )


def test_adapter_on_nf4_base():
    model, x = Net(), jax.random.normal(jax.random.key(0), (4, 3, 12))
    params = model.init(jax.random.key(1), x)["params"]
    q = lorax.quantize(
        params, "nf4", targets=["proj", "inner"], compute_dtype=jnp.float32, block_size=32
    )
    tree = lorax.adapters(q, targets=["proj"], bottleneck=4, key=jax.random.key(3))
    trainable, frozen = lorax.split(tree)
    trainable = jax.tree.map(lambda v: v + 0.3, trainable)
    dense = lorax.adapters(lorax.merge(q), targets=["proj"], bottleneck=4, key=jax.random.key(3))
    dense = lorax.combine(
        jax.tree.map(lambda v: v + 0.3, lorax.split(dense)[0]), lorax.split(dense)[1]
    )
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(
            lorax.lora(model.apply)({"params": lorax.combine(trainable, frozen)}, x),
            lorax.lora(model.apply)({"params": dense}, x),
            atol=1e-5,
        )
