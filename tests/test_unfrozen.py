"""BitFit and "modules to save": plain weights trained in full through the same split /
mask / optimizer / checkpoint machinery as adapters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fit

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="norm")(nn.Dense(16, name="body")(x))
        return nn.Dense(3, name="head")(jnp.tanh(x))


def _setup():
    model, x = Net(), jax.random.normal(jax.random.key(0), (32, 8))
    params = model.init(jax.random.key(1), x)["params"]
    return model, x, params


def test_bitfit_and_lora_train_only_what_they_should():
    model, x, params = _setup()
    y = jnp.sin(x[:, :3])
    tree = lorax.unfreeze(lorax.wrap(params, rank=2, targets=["body"]), targets=["bias"])
    trainable, frozen = lorax.split(tree)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}
    assert any("bias" in n for n in names) and any(".a" in n for n in names)
    assert not any("head']['kernel" in n for n in names)
    apply = lorax.lora(model.apply)  # Unfrozen leaves cause no densify warning (conftest)
    new, values = fit(
        lambda t: ((apply({"params": t}, x) - y) ** 2).mean(),
        tree,
        50,
        tx=lorax.optimizer(optax.adam(3e-2), tree),
    )
    assert values[-1] < 0.8 * values[0]
    np.testing.assert_array_equal(new["head"]["kernel"], params["head"]["kernel"])
    np.testing.assert_array_equal(new["body"]["kernel"].base, params["body"]["kernel"])
    assert not np.array_equal(new["head"]["bias"].value, params["head"]["bias"])
    # the merged tree is plain arrays with the trained biases
    merged = lorax.merge(new)
    np.testing.assert_array_equal(merged["head"]["bias"], new["head"]["bias"].value)
    np.testing.assert_allclose(
        apply({"params": new}, x), model.apply({"params": merged}, x), atol=1e-5
    )


def test_modules_to_save_round_trip(tmp_path):
    model, x, params = _setup()
    tree = lorax.unfreeze(lorax.wrap(params, rank=2, targets=["body"]), targets=["head", "norm"])
    trainable, frozen = lorax.split(tree)
    trainable = jax.tree.map(lambda v: v + 1.0, trainable)
    tree = lorax.combine(trainable, frozen)
    assert lorax.summary(tree).trainable == 16 * 3 + 3 + 2 * 16 + 8 * 2 + 2 * 16
    lorax.save(tmp_path / "ckpt", tree)
    loaded = lorax.load(tmp_path / "ckpt", params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(a, b)
    other = {**params, "head": {"kernel": jnp.zeros((16, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match=r"'head/bias'.*\(3,\).*\(4,\)"):
        lorax.load(tmp_path / "ckpt", other)
    with pytest.raises(ValueError, match="selects no plain array"):
        lorax.unfreeze(params, targets=["nothing"])
