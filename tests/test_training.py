"""Only adapters train: split/combine, lorax.optimizer, masked + set_to_zero and multi_transform
leave every frozen leaf (bases, biases) bit-equal."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


class MLP(nn.Module):
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, use_bias=self.use_bias, name="fc1")(x))
        return nn.Dense(4, use_bias=self.use_bias, name="fc2")(x)


def _data():
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jnp.sin(x[:, :4] * 2.0) + 0.5 * x[:, 4:]
    return x, y


def _setup(use_bias=True):
    model = MLP(use_bias)
    x, y = _data()
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    lp = lorax.wrap(params, rank=4, alpha=8, key=jax.random.key(2))
    apply = lorax.lora(model.apply)
    loss = lambda lp: jnp.mean((apply({"params": lp}, x) - y) ** 2)  # noqa: E731
    return params, lp, loss


def test_split_combine_trains_only_adapters():
    params, lp, loss = _setup()
    trainable, frozen = lorax.split(lp)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    # Optimizer state exists only for the adapter factors.
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_state == 2 * n_train + 1  # mu, nu, count

    @jax.jit
    def step(trainable, state):
        value, grads = jax.value_and_grad(lambda t: loss(lorax.combine(t, frozen)))(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    first = None
    for _ in range(100):
        trainable, state, value = step(trainable, state)
        first = value if first is None else first
    assert float(value) < 0.5 * float(first)
    out = lorax.combine(trainable, frozen)
    assert out["fc1"]["kernel"].base is params["fc1"]["kernel"]


def _not(mask):
    return jax.tree.map(lambda m: not m, mask)


# Every recipe the README and docstrings show for optimizing a whole wrapped tree.
RECIPES = {
    "lorax.optimizer": lambda tx, lp: lorax.optimizer(tx, lp),
    "masked + set_to_zero": lambda tx, lp: optax.chain(
        optax.masked(tx, lorax.mask(lp)), optax.masked(optax.set_to_zero(), _not(lorax.mask(lp)))
    ),
    "multi_transform": lambda tx, lp: optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero()},
        jax.tree.map(lambda m: "train" if m else "freeze", lorax.mask(lp)),
    ),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_no_frozen_leaf_moves_under_any_documented_recipe(recipe):
    """Biases, norm scales and bases stay bit-equal after several AdamW steps (weight decay
    included); optax.masked alone would move every unmasked leaf by its raw gradient."""
    params, before, loss = _setup()
    lp = _train(before, loss, RECIPES[recipe](optax.adamw(1e-2, weight_decay=0.1), before), 5)
    mask = lorax.mask(before)
    for m, old, new in zip(jax.tree.leaves(mask), jax.tree.leaves(before), jax.tree.leaves(lp)):
        if not m:
            np.testing.assert_array_equal(new, old)
    assert float(loss(lp)) < float(loss(before))
    assert float(jnp.abs(lp["fc1"]["kernel"].b).max()) > 0


def test_raw_optax_masked_is_not_a_recipe():
    """Why the recipes pair the mask with set_to_zero: optax.masked passes the raw gradient
    through where the mask is False, so biases move (README, lorax.mask docstring)."""
    params, lp, loss = _setup()
    tx = optax.masked(optax.adamw(1e-2), lorax.mask(lp))
    grads = jax.jit(jax.grad(loss))(lp)
    updates, _ = tx.update(grads, tx.init(lp), lp)
    np.testing.assert_array_equal(updates["fc1"]["bias"], grads["fc1"]["bias"])


def test_lorax_optimizer_freezes_everything_but_adapters():
    params, lp, loss = _setup()
    tx = lorax.optimizer(optax.adamw(1e-2, weight_decay=0.1), lp)
    n_state = sum(x.size for x in jax.tree.leaves(tx.init(lp)))
    n_train = sum(x.size for x in jax.tree.leaves(lorax.split(lp)[0]))
    assert n_state == 2 * n_train + 1
    _masked_steps(params, lp, loss, tx, biases=True)


def _train(lp, loss, tx, steps):
    """``steps`` jitted updates of the whole wrapped tree with ``tx``."""
    state = tx.init(lp)

    @jax.jit
    def step(lp, state):
        grads = jax.grad(loss)(lp)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state

    for _ in range(steps):
        lp, state = step(lp, state)
    return lp


def _masked_steps(params, lp, loss, tx, biases):
    start = loss(lp)
    lp = _train(lp, loss, tx, 30)
    assert float(loss(lp)) < float(start)
    for name in ("fc1", "fc2"):
        np.testing.assert_array_equal(lp[name]["kernel"].base, params[name]["kernel"])
        if biases:
            np.testing.assert_array_equal(lp[name]["bias"], params[name]["bias"])
        assert float(jnp.abs(lp[name]["kernel"].b).max()) > 0


def test_multi_transform_with_mask_labels():
    params, lp, loss = _setup()
    labels = jax.tree.map(lambda m: "train" if m else "freeze", lorax.mask(lp))
    tx = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)
    state = tx.init(lp)
    grads = jax.jit(jax.grad(loss))(lp)
    updates, state = tx.update(grads, state, lp)
    new = optax.apply_updates(lp, updates)
    np.testing.assert_array_equal(new["fc1"]["kernel"].base, params["fc1"]["kernel"])
    assert not np.array_equal(new["fc1"]["kernel"].b, lp["fc1"]["kernel"].b)


def test_gradient_of_frozen_base_is_zero():
    _, lp, loss = _setup()
    grads = jax.jit(jax.grad(loss))(lp)
    assert float(jnp.abs(grads["fc1"]["kernel"].base).max()) == 0.0
    assert float(jnp.abs(grads["fc1"]["bias"]).max()) > 0  # plain leaves are not frozen
    assert float(jnp.abs(grads["fc1"]["kernel"].a).max()) == 0.0  # B = 0 at init
    assert float(jnp.abs(grads["fc1"]["kernel"].b).max()) > 0


def test_combine_of_split_is_identity_and_mask_matches():
    _, lp, _ = _setup()
    t, f = lorax.split(lp)
    back = lorax.combine(t, f)
    assert jax.tree.structure(back, is_leaf=lorax.is_lorax_leaf) == jax.tree.structure(
        lp, is_leaf=lorax.is_lorax_leaf
    )
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        assert x is y
    m = lorax.mask(lp)
    assert m["fc1"]["kernel"].a is True and m["fc1"]["kernel"].base is False
    assert m["fc1"]["bias"] is False


def test_summary_counts():
    params, lp, _ = _setup()
    s = lorax.summary(lp)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    lora = 4 * (8 + 32) + 4 * (32 + 4)
    assert s.trainable == lora
    assert s.total == n_params + lora
    rows = {r.module: r for r in s.rows}
    assert rows["fc1"].trainable == 4 * (8 + 32)
    assert rows["fc1"].total == 8 * 32 + 32 + 4 * (8 + 32)
    assert "fc1" in str(s) and f"{lora:,}" in s.table()
