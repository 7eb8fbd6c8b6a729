"""Quickstart: LoRA-fine-tune a small Flax transformer block stack with lorax (CPU, ~1 min).

A base model is first fit to one function (task A), then only LoRA factors are trained to
adapt it to a related function (task B). Prints the trainable-parameter table, the task-B
loss before and after, and checks that the merged weights give the same outputs.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.SelfAttention(num_heads=4, name="attn")(h)
        h = nn.Dense(256, name="up")(nn.LayerNorm()(x))
        return x + nn.Dense(64, name="down")(nn.gelu(h)), None


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(64, name="embed_in")(x)
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(
            name="ScanBlocks"
        )(x, None)
        return nn.Dense(1, name="head")(x)[..., 0]


def task(key, shift):
    x = jax.random.normal(key, (256, 16, 4))
    y = jnp.sin(x.sum(-1) + shift) * jnp.cumsum(x[..., 0], axis=1) / 4
    return x, y


def fit(loss_fn, params, steps, lr):
    tx = optax.adam(lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
        params, state, loss = step(params, state)
    return params, float(loss)


def main():
    model = Model()
    xa, ya = task(jax.random.key(0), 0.0)
    xb, yb = task(jax.random.key(1), 0.7)
    params = jax.jit(model.init)(jax.random.key(2), xa)["params"]
    mse = lambda out, y: jnp.mean((out - y) ** 2)  # noqa: E731

    t0 = time.time()
    params, loss_a = fit(lambda p: mse(model.apply({"params": p}, xa), ya), params, 200, 3e-3)
    print(f"base model, task A: loss {loss_a:.4f}  ({time.time() - t0:.1f}s)")

    lp = lorax.wrap(params, rank=4, alpha=8, targets=["attn", "up", "down"], key=jax.random.key(3))
    print(lorax.summary(lp))
    apply = lorax.lora(model.apply)
    trainable, frozen = lorax.split(lp)
    loss_b = lambda t: mse(apply({"params": lorax.combine(t, frozen)}, xb), yb)  # noqa: E731
    before = float(jax.jit(loss_b)(trainable))
    t0 = time.time()
    trainable, after = fit(loss_b, trainable, 200, 3e-3)
    print(f"task B with LoRA: loss {before:.4f} -> {after:.4f}  ({time.time() - t0:.1f}s)")

    lp = lorax.combine(trainable, frozen)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32-like f32 matmuls
        merged = model.apply({"params": lorax.merge(lp)}, xb)
        unmerged = jax.jit(apply)({"params": lp}, xb)
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    print("merged weights reproduce the adapted model: ok")


if __name__ == "__main__":
    main()
