"""Shared test utilities: non-zero LoRA factors and the merged-vs-unmerged check."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax


def randomize_b(tree, key, scale=0.1):
    return _randomize_b(tree, key, scale)


@functools.partial(jax.jit, static_argnums=2)
def _randomize_b(tree, key, scale):
    """Gives every LoRA leaf a non-zero B, so the low-rank path matters."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lorax.is_lorax_leaf)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, leaf in zip(keys, leaves):
        if isinstance(leaf, lorax.LoraWeight):
            leaf = dataclasses.replace(
                leaf, b=scale * jax.random.normal(k, leaf.b.shape, leaf.b.dtype)
            )
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


def _loss(out):
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(out))


def check_lora_equals_merged(
    apply, wrapped, *args, rtol=1e-5, atol=1e-5, strict_promotion=True, **kwargs
):
    """lora(apply)(wrapped) == apply(merge(wrapped)), values and gradients w.r.t. A, B;
    under strict dtype promotion, so lorax never promotes dtypes behind the model's back."""
    with jax.numpy_dtype_promotion("strict" if strict_promotion else "standard"):
        return _check(apply, wrapped, *args, rtol=rtol, atol=atol, **kwargs)


def _check(apply, wrapped, *args, rtol, atol, **kwargs):
    # Under jit, as users run it (eager dispatch would compile every small op on its own).
    run = lambda f: jax.jit(lambda w: f(w, *args, **kwargs))  # noqa: E731
    lora_apply = lorax.lora(apply, strict=True)
    got = run(lora_apply)(wrapped)
    want = run(lambda w, *a, **k: apply(lorax.merge(w), *a, **k))(wrapped)
    assert_tree_close(got, want, rtol, atol)

    trainable, frozen = lorax.split(wrapped)
    assert jax.tree.leaves(trainable), "nothing was wrapped"
    g_got = jax.jit(
        jax.grad(lambda t: _loss(lora_apply(lorax.combine(t, frozen), *args, **kwargs)))
    )(trainable)
    g_want = jax.jit(
        jax.grad(lambda t: _loss(apply(lorax.merge(lorax.combine(t, frozen)), *args, **kwargs)))
    )(trainable)
    assert_tree_close(g_got, g_want, rtol=max(rtol, 1e-4), atol=max(atol, 1e-4))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_got))
    return got


def fit(loss, params, steps, lr=1e-2, tx=None):
    """Minimizes ``loss(params)`` with ``tx`` (default Adam at ``lr``) in a jitted loop;
    returns the final params and the loss at every step."""
    tx = optax.adam(lr) if tx is None else tx
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    values = []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return params, values
