"""Models we did not write (issue 15's acceptance): small Flax models in the styles of
third-party code (biases named ``b``, tables named ``input_embedding`` under ``embedder``,
per-head einsum kernels, a hand-written temporal convolution indexing its kernel ``w[k]``, a
depthwise convolution used elementwise, a layer loop over a stacked tree ``params[i]``,
``ragged_dot`` experts, a tied embedding under NF4). Each runs LoRA and QLoRA with the
targets chosen by use (``fn=``) through ``lorax.lora(strict=True)``, so any densified leaf
fails, and is checked, forward and gradients, against the same model on merged weights."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import assert_tree_close, randomize_b

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

V, D, F, H, K, T = 13, 16, 24, 2, 8, 6  # vocab, width, hidden, heads, head dim, tokens
IDS = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])


def _init(shape):
    return lambda key, *_: jax.random.normal(key, shape) * 0.2


class GemmaStyle(nn.Module):
    """gemma's spellings: ``embedder/input_embedding`` (tied to the logits), per-head
    attention einsum kernels, a gated feed-forward kernel (2, D, F) with a bias ``b``."""

    @nn.compact
    def __call__(self, ids):
        table = self.param("input_embedding", _init((V, D)))
        x = table[ids]
        q = jnp.einsum("btd,hdk->bthk", x, self.param("q_einsum", _init((H, D, K))))
        k = jnp.einsum("btd,hdk->bthk", x, self.param("k_einsum", _init((H, D, K))))
        att = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k), axis=-1)
        v = jnp.einsum("btd,hdk->bthk", x, self.param("v_einsum", _init((H, D, K))))
        o = jnp.einsum("bhqs,bshk->bqhk", att, v)
        x = x + jnp.einsum("bthk,hkd->btd", o, self.param("attn_vec", _init((H, K, D))))
        gate = jnp.einsum("btd,gdf->gbtf", x, self.param("w", _init((2, D, F))))
        gate = gate + self.param("b", nn.initializers.zeros, (2, 1, 1, F))
        x = x + (jax.nn.gelu(gate[0]) * gate[1]) @ self.param("w_down", _init((F, D)))
        x = x * (1 + self.param("scale", nn.initializers.zeros, (1, 1, D)))
        return x @ table.T


class Embedder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return GemmaStyle(name="block")(ids)


class GriffinStyle(nn.Module):
    """A recurrent block: a depthwise temporal convolution used elementwise (``x * w[k]``,
    left alone), a hand-written full temporal convolution ``shift(x) @ w[k]``, per-head
    block-diagonal gates ``einsum("...hi,hij->...hj")`` with biases ``b``, a scan."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embedder")(ids)
        depthwise = self.param("conv_w", _init((4, D)))
        y = sum(jnp.roll(x, k, axis=1) * depthwise[k][None, None] for k in range(4))
        full = self.param("temporal_w", _init((3, D, D)))
        y = y + sum(jnp.roll(x, k, axis=1) @ full[k] for k in range(3))
        heads = y.reshape(*y.shape[:-1], H, D // H)
        gate_w = self.param("gate_w", _init((H, D // H, D // H)))
        gate_b = self.param("gate_b", nn.initializers.zeros, (1, 1, H, D // H))
        a = jax.nn.sigmoid(jnp.einsum("bthi,hij->bthj", heads, gate_w) + gate_b)
        a = a.reshape(y.shape)

        def step(h, inputs):
            a_t, y_t = inputs
            h = a_t * h + (1 - a_t) * y_t
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros_like(y[:, 0]), (a.swapaxes(0, 1), y.swapaxes(0, 1)))
        return nn.Dense(V, name="out")(hs.swapaxes(0, 1))


class LayerLoop(nn.Module):
    """Layers stacked in one tree and run by a Python loop over ``params[i]``."""

    n_layers: int = 3

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed_tokens")(ids)
        w_in = self.param("w_in", _init((self.n_layers, D, F)))
        b_in = self.param("b_in", nn.initializers.zeros, (self.n_layers, 1, 1, F))
        w_out = self.param("w_out", _init((self.n_layers, F, D)))
        for i in range(self.n_layers):
            x = x + jax.nn.gelu(x @ w_in[i] + b_in[i]) @ w_out[i]
        return x


class MoE(nn.Module):
    """Top-1 routed experts through ``jax.lax.ragged_dot`` (tokens sorted by expert)."""

    n_experts: int = 4

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embedding")(ids).reshape(-1, D)
        expert = jnp.argmax(nn.Dense(self.n_experts, name="router")(x), axis=-1)
        order = jnp.argsort(expert)
        sizes = jnp.bincount(expert, length=self.n_experts).astype(jnp.int32)
        w_in = self.param("experts_in", _init((self.n_experts, D, F)))
        w_out = self.param("experts_out", _init((self.n_experts, F, D)))
        h = jax.nn.gelu(jax.lax.ragged_dot(x[order], w_in, sizes))
        y = jax.lax.ragged_dot(h, w_out, sizes)
        return (x + jnp.zeros_like(y).at[order].set(y)).reshape(*ids.shape, D)


MODELS = {
    "gemma": Embedder,
    "griffin": GriffinStyle,
    "layer_loop": LayerLoop,
    "moe": MoE,
}
ADAPTED = {
    "gemma": {"q_einsum", "k_einsum", "v_einsum", "attn_vec", "w", "w_down"},
    "griffin": {"temporal_w", "gate_w", "kernel"},
    "layer_loop": {"w_in", "w_out"},
    "moe": {"experts_in", "experts_out", "kernel"},
}


@functools.cache
def _variables(name):
    model = MODELS[name]()
    return model, jax.jit(model.init)(jax.random.key(0), IDS)  # one compile, not one per op


def _adapted(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorax.is_lorax_leaf)[0]
    return {str(path[-1].key) for path, leaf in flat if isinstance(leaf, lorax.LoraWeight)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lora_with_targets_by_use_equals_the_merged_model(name):
    model, variables = _variables(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ambiguous target, no densify
        lp = lorax.wrap(variables, rank=2, fn=model.apply, args=(IDS,), key=jax.random.key(1))
    assert _adapted(lp) == ADAPTED[name]
    lp = randomize_b(lp, jax.random.key(2))
    _check(model.apply, lp)


@pytest.mark.parametrize("name", ["gemma", "layer_loop", "moe"])
def test_qlora_with_targets_by_use_equals_the_merged_model(name):
    model, variables = _variables(name)
    qp = lorax.quantize(
        variables, "nf4", block_size=32, compute_dtype=jnp.float32, fn=model.apply, args=(IDS,)
    )
    lp = lorax.wrap(qp, rank=2, fn=model.apply, args=(IDS,), key=jax.random.key(1))
    assert _adapted(lp) == ADAPTED[name]
    assert all(
        isinstance(leaf.base, lorax.NF4Weight)
        for leaf in jax.tree.leaves(lp, is_leaf=lorax.is_lorax_leaf)
        if isinstance(leaf, lorax.LoraWeight)
    )
    lp = randomize_b(lp, jax.random.key(2))
    _check(model.apply, lp)


def test_tied_embedding_under_nf4_neither_densifies():
    """The table quantized too (its lookup gathers rows, the logits read it transposed),
    with LoRA on it and on the linear weights."""
    model, variables = _variables("gemma")
    qp = lorax.quantize(variables, "nf4", block_size=32, compute_dtype=jnp.float32)
    qp = lorax.quantize(
        qp, "nf4", block_size=32, compute_dtype=jnp.float32, targets=".*input_embedding"
    )
    table = qp["params"]["block"]["input_embedding"]
    assert isinstance(table, lorax.NF4Weight)
    lp = lorax.wrap(qp, rank=2, targets=lambda path, leaf: lorax.is_lorax_leaf(leaf))
    assert "input_embedding" in _adapted(lp)
    lp = randomize_b(lp, jax.random.key(2))
    _check(model.apply, lp)


def test_by_name_defaults_skip_b_and_input_embedding_in_these_models():
    _, variables = _variables("gemma")
    lp = lorax.wrap(variables, rank=2)
    assert _adapted(lp) == ADAPTED["gemma"]
    qp = lorax.quantize(variables, "nf4", block_size=32)
    assert not lorax.is_lorax_leaf(qp["params"]["block"]["b"])
    assert not lorax.is_lorax_leaf(qp["params"]["block"]["input_embedding"])


def _check(apply, wrapped):
    """lora(apply)(wrapped) == apply(merge(wrapped)), values and gradients w.r.t. the
    trainable factors, in one compiled program (strict: a densified leaf raises)."""
    trainable, frozen = lorax.split(wrapped)
    lora_apply = lorax.lora(apply, strict=True)

    def both(t):
        tree = lorax.combine(t, frozen)
        loss = lambda out: jnp.sum(jnp.sin(out))  # noqa: E731 - every output matters
        got, g_got = jax.value_and_grad(lambda t: loss(lora_apply(lorax.combine(t, frozen), IDS)))(
            t
        )
        want, g_want = jax.value_and_grad(
            lambda t: loss(apply(lorax.merge(lorax.combine(t, frozen)), IDS))
        )(t)
        return lora_apply(tree, IDS), apply(lorax.merge(tree), IDS), g_got, g_want

    with jax.numpy_dtype_promotion("strict"):
        out, ref, g_got, g_want = jax.jit(both)(trainable)
    assert_tree_close(out, ref, rtol=2e-5, atol=2e-5)
    assert_tree_close(g_got, g_want, rtol=1e-4, atol=1e-4)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_got))
