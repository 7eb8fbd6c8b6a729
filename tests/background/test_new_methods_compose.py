"""VeRA, LoHa, LoKr and OFT compose with the rest of lorax as LoRA does: over an NF4 base,
inside ``nn.scan`` over ``nn.remat`` layers, unmerged equals merged (forward and the
gradient of the trainable half), and nothing densifies silently (the conftest fixture)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(32, use_bias=False, name="up")(x)
        return x + nn.Dense(16, use_bias=False, name="down")(jnp.tanh(h)), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        return layers(name="ScanLayers")(x, None)[0]  # lorax infers the stacked axis


METHODS = {
    "vera": lambda p, k: lorax.vera(p, rank=8, targets=["up", "down"], key=k),
    "loha": lambda p, k: lorax.loha(p, rank=4, targets=["up", "down"], key=k),
    "lokr": lambda p, k: lorax.lokr(p, rank=4, targets=["up", "down"], key=k),
    "oft": lambda p, k: lorax.oft(p, targets=["up", "down"], block_size=8),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_over_nf4_scanned_remat_layers_unmerged_equals_merged(method):
    model, x = Net(), jax.random.normal(jax.random.key(0), (3, 16))
    params = model.init(jax.random.key(1), x)["params"]
    base = lorax.quantize(params, "nf4", compute_dtype=jnp.float32)  # both sides in float32
    tree = METHODS[method](base, jax.random.key(2))
    trainable, frozen = lorax.split(tree)
    assert jax.tree.leaves(trainable)
    # move every trainable value off its initialisation, so each factor matters
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    trainable = jax.tree.unflatten(
        treedef, [v + 0.3 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
    )
    apply = lorax.lora(model.apply)

    def unmerged(t):
        return (apply({"params": lorax.combine(t, frozen)}, x) ** 2).sum()

    def merged(t):
        dense = lorax.merge(lorax.combine(t, frozen))
        return (model.apply({"params": dense}, x) ** 2).sum()

    fast = {"xla_backend_optimization_level": 0}  # compile time is this test's cost
    with jax.default_matmul_precision("highest"):
        value, grads = jax.jit(jax.value_and_grad(unmerged), compiler_options=fast)(trainable)
        want_value, want_grads = jax.jit(jax.value_and_grad(merged), compiler_options=fast)(
            trainable
        )
    np.testing.assert_allclose(value, want_value, rtol=2e-3)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3 * float(np.abs(w).max()))
