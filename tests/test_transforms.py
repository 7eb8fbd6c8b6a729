"""lorax.lora composes with jit / grad / vmap, control flow, Flax's extras; never silent."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_close, check_lora_equals_merged, randomize_b

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

KEY = jax.random.key(0)


def _leaf(shape=(6, 5), rank=2, stack=None):
    w = jax.random.normal(KEY, shape)
    spec = lambda p, l: lorax.LoraSpec(stack_axes=stack)  # noqa: E731
    return randomize_b(
        lorax.wrap({"w": w}, rank=rank, alpha=4.0, targets=spec, key=jax.random.key(1)),
        jax.random.key(2),
    )["w"]


def test_jit_grad_vmap_around_lora():
    w = _leaf()
    x = jax.random.normal(KEY, (7, 3, 6))
    f = lambda w, x: jnp.tanh(x @ w)  # noqa: E731
    g = lorax.lora(f, strict=True)
    dense = lorax.merge(w)
    assert_tree_close(jax.jit(g)(w, x), f(dense, x))
    assert_tree_close(jax.vmap(g, in_axes=(None, 0))(w, x), jax.vmap(f, (None, 0))(dense, x))
    assert_tree_close(jax.jit(jax.vmap(g, in_axes=(None, 0)))(w, x), f(dense, x))
    gx = jax.grad(lambda x: g(w, x).sum())(x)
    assert_tree_close(gx, jax.grad(lambda x: f(dense, x).sum())(x))
    # Second order through the interpreter.
    hx = jax.grad(lambda x: jax.grad(lambda x: g(w, x).sum())(x).sum())(x)
    assert_tree_close(hx, jax.grad(lambda x: jax.grad(lambda x: f(dense, x).sum())(x).sum())(x))


def test_vmap_over_adapters():
    ws = jax.vmap(
        lambda k: randomize_b(lorax.wrap({"w": jax.random.normal(KEY, (6, 5))}, rank=2, key=k), k)[
            "w"
        ]
    )(jax.random.split(KEY, 3))
    x = jax.random.normal(KEY, (4, 6))
    f = lambda w, x: x @ w  # noqa: E731
    got = jax.vmap(lorax.lora(f, strict=True), in_axes=(0, None))(ws, x)
    want = jax.vmap(lambda w: f(lorax.merge(w), x))(ws)
    assert_tree_close(got, want)


def test_cond_while_fori_and_scan_with_lazy_weights():
    w = _leaf((5, 5))
    stacked = _leaf((3, 5, 5), stack=1)

    def f(w, stacked, x):
        x = jax.lax.cond(x.sum() > 0, lambda x: x @ w, lambda x: -(x @ w), x)
        x = jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ w), x)
        x, ys = jax.lax.scan(lambda c, layer: (jnp.tanh(c @ layer), c.sum()), x, stacked)
        return x, ys

    x = jax.random.normal(KEY, (2, 5))
    check_lora_equals_merged(lambda t, x: f(t["w"], t["s"], x), {"w": w, "s": stacked}, x)

    # while_loop is not reverse-differentiable in JAX itself: compare values only.
    g = lambda w, x: jax.lax.while_loop(  # noqa: E731
        lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x)
    )[1]
    assert_tree_close(jax.jit(lorax.lora(g, strict=True))(w, x), g(lorax.merge(w), x))


def test_unsupported_primitive_warns_with_path_and_strict_raises():
    lp = {"layer": {"kernel": _leaf()}}
    f = lambda p, x: x @ p["layer"]["kernel"] + jnp.cumsum(p["layer"]["kernel"], 0)[:2]  # noqa
    x = jnp.ones((2, 6))
    with pytest.warns(
        lorax.LoraxDensifyWarning,
        match=r"'cumsum' at .*test_transforms.py.* LoraWeight at "
        r"'layer/kernel'.*\(6, 5\) float32",
    ):
        got = lorax.lora(f)(lp, x)
    assert_tree_close(got, f(lorax.merge(lp), x))
    with pytest.raises(lorax.LoraxDensifyError, match="'cumsum'.*layer/kernel"):
        lorax.lora(f, strict=True)(lp, x)


def test_register_rule_for_a_new_primitive():
    import jax.extend

    lp = {"k": _leaf()}
    f = lambda p: jnp.cumsum(p["k"], axis=0)  # noqa: E731
    calls = []

    def rule(ctx, invals):
        calls.append(ctx.names)
        return ctx.bind(*[v.materialize() if lorax.is_lorax_leaf(v) else v for v in invals])

    prim = next(
        p
        for p in jax.extend.core.primitives.__dict__.values()
        if getattr(p, "name", None) == "cumsum"
    )
    with lorax.using_rules({prim: rule}):
        got = lorax.lora(f, strict=True)(lp)
    with pytest.raises(lorax.LoraxDensifyError):  # the block's rule is gone after it
        lorax.lora(f, strict=True)(lp)
    assert calls == [("k",)]
    assert_tree_close(got, f(lorax.merge(lp)))


def test_transpose_reshape_and_cast_stay_lazy():
    w = _leaf((6, 4))

    def f(w, x):
        wt = w.T  # (4, 6): groups swap
        w3 = w.reshape(2, 3, 4)  # in axes split
        return jnp.einsum("bjk,jkl->bl", x.reshape(-1, 2, 3), w3) + x @ wt.T

    x = jax.random.normal(KEY, (3, 6))
    check_lora_equals_merged(f, w, x)
    # A cast stays lazy too (strict would raise otherwise); bf16 rounding differs slightly.
    cast = lambda w, x: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)  # noqa: E731
    got = lorax.lora(cast, strict=True)(w, x)
    assert got.dtype == jnp.bfloat16
    assert_tree_close(got, cast(lorax.merge(w), x), rtol=3e-2, atol=3e-2)


def test_no_lorax_leaves_is_fn_itself():
    calls = []

    def f(x, *, scale):
        calls.append(type(x))
        return x * scale

    x = jnp.ones(3)
    assert lorax.lora(f)(x, scale=2.0).tolist() == [2.0, 2.0, 2.0]
    assert calls == [type(x)]  # called directly, not traced


def test_returning_the_leaf_itself_and_static_args():
    w = _leaf()
    out = lorax.lora(lambda w, n, flag: (w, n) if flag else None)(w, 3, True)
    assert out[0] is not None and out[1] == 3
    assert lorax.is_lorax_leaf(out[0])


class BNDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8, name="fc")(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dropout(0.5, deterministic=not train)(x)


def test_mutable_collections_and_rngs():
    model = BNDrop()
    x = jax.random.normal(KEY, (4, 6))
    variables = jax.jit(model.init, static_argnums=2)(KEY, x, False)
    lp = randomize_b(lorax.wrap(variables, rank=2, targets=["fc"]), jax.random.key(3))
    rngs = {"dropout": jax.random.key(7)}
    got, upd = lorax.lora(model.apply, strict=True)(lp, x, True, rngs=rngs, mutable=["batch_stats"])
    want, upd_ref = model.apply(lorax.merge(lp), x, True, rngs=rngs, mutable=["batch_stats"])
    assert_tree_close(got, want)
    assert_tree_close(upd, upd_ref)
    assert not np.allclose(upd["batch_stats"]["BatchNorm_0"]["mean"], 0)
