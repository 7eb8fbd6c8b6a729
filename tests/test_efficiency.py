"""Cost of a LoRA train step, read from the compiled program; no dense delta is formed."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax

D, FF, HEADS, VOCAB, LAYERS, SEQ, BATCH = 512, 2048, 8, 1024, 2, 32, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(FF, name="up")(h)
        return x + nn.Dense(D, name="down")(nn.gelu(h)), None


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="wte")(ids)
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
        )
        x, _ = stack(name="ScanBlocks")(x, None)
        return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm()(x))


def _loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.fixture(scope="module")
def setup():
    """The model, parameters of init's shapes and ids, made once for both tests. The
    parameters are numpy's normal draws (compiling init took ~7 s a test); not zeros: the
    frozen base is a constant of the compiled step, and XLA would fold products with zeros
    away from the FLOP count."""
    model = TinyLM()
    ids = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
    shapes = jax.eval_shape(model.init, jax.random.key(1), ids)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes
    )
    return model, params, ids


def _full_step(model, tx):
    def step(params, opt_state, ids):
        grads = jax.grad(lambda p: _loss(model.apply({"params": p}, ids), ids))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def _lora_step(model, tx, frozen):
    apply = lorax.lora(model.apply, strict=True)

    def step(trainable, opt_state, ids):
        grads = jax.grad(lambda t: _loss(apply({"params": lorax.combine(t, frozen)}, ids), ids))(
            trainable
        )
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    return step


def _flops(fn, *args):
    # the optimised HLO, and so its cost analysis, is the same at every backend (LLVM)
    # optimisation level; level 0 halves the compile time
    options: dict[str, str | bool] = {"xla_backend_optimization_level": "0"}
    cost = jax.jit(fn).lower(*args).compile(compiler_options=options).cost_analysis()
    assert cost is not None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_lora_step_flops_at_most_072_of_full_finetune(setup):
    model, params, ids = setup
    tx = optax.adamw(1e-3)
    full = _flops(_full_step(model, tx), params, tx.init(params), ids)

    lp = lorax.wrap(params, rank=8, key=jax.random.key(2))
    trainable, frozen = lorax.split(lp)
    lora = _flops(_lora_step(model, tx, frozen), trainable, tx.init(trainable), ids)
    ratio = lora / full
    print(
        f"\nLoRA/full train-step FLOPs (XLA cost analysis): {lora:.4g} / {full:.4g} = {ratio:.3f}"
    )
    assert ratio <= 0.72, ratio


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_no_weight_shaped_array_is_formed(setup):
    model, params, ids = setup
    lp = lorax.wrap(params, rank=8, key=jax.random.key(2))
    trainable, frozen = lorax.split(lp)
    step = _lora_step(model, optax.sgd(1e-2), frozen)
    jaxpr = jax.make_jaxpr(step)(trainable, optax.sgd(1e-2).init(trainable), ids)
    # Per-layer kernel shapes and their transposes (the scan body sees one layer).
    weight_shapes = set()
    for leaf in jax.tree.leaves(lp, is_leaf=lorax.is_lorax_leaf):
        if isinstance(leaf, lorax.LoraWeight):
            shape = leaf.shape[leaf.stack_ndim :]
            weight_shapes |= {shape, shape[::-1], leaf.shape}
    formed = [
        (e.primitive.name, v.aval.shape)
        for e in _all_eqns(jaxpr.jaxpr)
        for v in e.outvars
        if getattr(v.aval, "shape", None) in weight_shapes
    ]
    # Only the frozen base itself passes through (stop_gradient / scan slicing).
    bad = [
        (name, shape)
        for name, shape in formed
        if name not in ("stop_gradient", "scan", "jit", "pjit", "copy", "copy_p")
    ]
    assert not bad, bad
    assert formed, "the check saw no base weights at all"


def test_low_rank_products_run_on_the_flattened_tokens():
    """The skinny products see x as (tokens, in), not (batch, seq, in): their gradients then
    contract one axis, where two made XLA's CPU backend copy activation-sized operands
    (benchmarks/NOTES.md, attempts 4 and 5). The base product keeps the model's shape."""
    lp = lorax.wrap({"w": jnp.ones((16, 32))}, rank=4, key=jax.random.key(0))
    x = jnp.ones((2, 5, 16))
    f = lorax.lora(lambda p, x: x @ p["w"])
    for jaxpr in (jax.make_jaxpr(f)(lp, x), jax.make_jaxpr(jax.grad(lambda p: f(p, x).sum()))(lp)):
        dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        shapes = {tuple(v.aval.shape) for e in dots for v in e.invars}
        assert (2, 5, 16) in shapes  # the base product, as the model wrote it
        assert any(s in shapes for s in ((10, 16), (10, 4))), shapes  # x @ A on 10 tokens
        assert (2, 5, 4) not in shapes  # no low-rank intermediate per (batch, seq)


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():  # inner jaxprs: jit, custom_vjp, remat bodies
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield from _eqns(inner)
            elif hasattr(p, "eqns"):
                yield from _eqns(p)
