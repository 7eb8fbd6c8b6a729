"""Products over many tokens take the merged-weight path (lorax/methods/lora_merged.py):
its values and derivatives equal a float64 numpy reference, it is chosen exactly where the
cost model says, and it keeps the frozen base's gradient unformed."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import check_lora_equals_merged, randomize_b
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.methods import lora_merged
from lorax.methods.lora import LoraWeight

# compile-bound: XLA's backend at -O0 (the optimised HLO, so the FLOP counts, are the same)
pytestmark = pytest.mark.fast_compile


@st.composite
def product_cases(draw):
    """A weight of 2-3 axes, each contracted with x or kept; x with 1-2 token axes, sized
    on either side of the cost model's threshold; either operand order."""
    w_nd = draw(st.integers(2, 3))
    sizes = draw(st.lists(st.integers(1, 6), min_size=w_nd, max_size=w_nd))
    w_labels = "abc"[:w_nd]
    contract = draw(st.lists(st.booleans(), min_size=w_nd, max_size=w_nd))
    if not any(contract):
        contract[draw(st.integers(0, w_nd - 1))] = True
    x_free = "xy"[: draw(st.integers(1, 2))]
    x_sizes = draw(st.lists(st.integers(1, 12), min_size=len(x_free), max_size=len(x_free)))
    x_axes = draw(st.permutations([l for l, c in zip(w_labels, contract) if c] + list(x_free)))
    out = draw(st.permutations(list(x_free) + [l for l, c in zip(w_labels, contract) if not c]))
    stack = draw(st.integers(0, w_nd - 2))
    in_axes = draw(st.integers(1, w_nd - stack - 1))
    fan_in = int(np.prod(sizes[stack : stack + in_axes]))
    fan_out = int(np.prod(sizes[stack + in_axes :]))
    return dict(
        w_spec=w_labels,
        x_spec="".join(x_axes),
        out="".join(out),
        dims=dict(zip(w_labels, sizes)) | dict(zip(x_free, x_sizes)),
        stack=stack,
        in_axes=in_axes,
        rank=draw(st.integers(1, max(1, min(fan_in, fan_out)))),
        w_first=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _leaf(w, case):
    leaf = lorax.wrap(
        {"w": jnp.asarray(w)},
        rank=case["rank"],
        alpha=2.0 * case["rank"],
        targets=lambda p, _: lorax.LoraSpec(in_axes=case["in_axes"], stack_axes=case["stack"]),
        key=jax.random.key(case["seed"]),
    )["w"]
    b = np.random.default_rng(case["seed"] + 1).standard_normal(leaf.b.shape)
    return leaf.replace(b=jnp.asarray(b, jnp.float32))


@settings(max_examples=20, deadline=None)  # each example runs both paths
@given(product_cases())
def test_products_and_gradients_equal_a_float64_reference_on_both_paths(case):
    """Any einsum pattern without batch axes, either operand order, any split of the
    weight's axes between A and B: the output and the gradients of A, B and x."""
    d = case["dims"]
    rng = np.random.default_rng(case["seed"])
    w_shape = tuple(d[l] for l in case["w_spec"])
    x = rng.standard_normal(tuple(d[l] for l in case["x_spec"])).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    leaf = _leaf(w, case)
    x_spec, w_spec, out = case["x_spec"], case["w_spec"], case["out"]
    if case["w_first"]:
        f = lambda w, x: jnp.einsum(f"{w_spec},{x_spec}->{out}", w, x)  # noqa: E731
    else:
        f = lambda w, x: jnp.einsum(f"{x_spec},{w_spec}->{out}", x, w)  # noqa: E731
    cot = rng.standard_normal(tuple(d[l] for l in out)).astype(np.float32)

    def loss(a, b, x):
        y = lorax.lora(f, strict=True)(leaf.replace(a=a, b=b), x)
        return jnp.sum(y * cot), y

    # Both paths on every case: the cost model's choice is tested below, on its own.
    results = []
    for forced in (False, True):
        with mock.patch.object(lora_merged, "merge_pays", lambda *a, **k: forced):
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            (_, got), grads = step(leaf.a, leaf.b, x)
        results.append((got, grads))

    # float64: y = x . W', and the gradients through W' = W + s A B
    ns, ni = case["stack"], case["in_axes"]
    a_spec, b_spec = f"{w_spec[: ns + ni]}r", f"{w_spec[:ns]}r{w_spec[ns + ni :]}"
    a64, b64 = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
    w64 = w + leaf.scale * np.einsum(f"{a_spec},{b_spec}->{w_spec}", a64, b64)
    x64, c64 = x.astype(np.float64), cot.astype(np.float64)
    want = np.einsum(f"{x_spec},{w_spec}->{out}", x64, w64)
    dw = np.einsum(f"{x_spec},{out}->{w_spec}", x64, c64)
    want_grads = (
        leaf.scale * np.einsum(f"{w_spec},{b_spec}->{a_spec}", dw, b64),
        leaf.scale * np.einsum(f"{a_spec},{w_spec}->{b_spec}", a64, dw),
        np.einsum(f"{out},{w_spec}->{x_spec}", c64, w64),
    )
    tol = dict(rtol=1e-4, atol=1e-4)
    for got, grads in results:
        np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)
        for g, ref in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g, np.float64), ref, **tol)


def _dense_case(tokens: int, n_in: int = 48, n_out: int = 32, dtype=jnp.float32):
    w = jax.random.normal(jax.random.key(0), (n_in, n_out), dtype)
    leaf = lorax.wrap({"w": w}, rank=4, key=jax.random.key(1))["w"]
    leaf = leaf.replace(b=0.1 * jax.random.normal(jax.random.key(2), leaf.b.shape, dtype))
    x = jax.random.normal(jax.random.key(3), (2, tokens // 2, n_in), dtype)
    return leaf, x


DNUMS = (((2,), (0,)), ((), ()))


def test_the_path_follows_tokens_dtype_and_dropout():
    # GPT-2 small's attention projection (768 x 768): a training batch merges, decoding not.
    w = jax.ShapeDtypeStruct((768, 768), jnp.float32)
    leaf = LoraWeight(w, jax.ShapeDtypeStruct((768, 8), jnp.float32), w, 2.0)
    leaf = leaf.replace(b=jax.ShapeDtypeStruct((8, 768), jnp.float32))

    def pays(tokens, dtype=jnp.float32, dropout=False, dnums=DNUMS):
        x = jax.ShapeDtypeStruct((1, tokens, 768), dtype)
        return lora_merged.merge_pays(leaf, x, dnums, False, dropout=dropout)

    assert pays(8 * 1024) and pays(768)
    assert not pays(767) and not pays(4)
    assert not pays(8 * 1024, dtype=jnp.bfloat16)  # an update would round away in W'
    assert not pays(8 * 1024, dropout=True)
    assert not pays(8 * 1024, dnums=(((2,), (0,)), ((0,), (0,))))  # a batched product
    bf16 = leaf.replace(base=jax.ShapeDtypeStruct((768, 768), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((1, 8192, 768), jnp.float32)
    assert not lora_merged.merge_pays(bf16, x, DNUMS, False, dropout=False)


def test_forward_mode_vmap_and_second_order_through_the_merged_path():
    leaf, x = _dense_case(tokens=64)
    assert lora_merged.merge_pays(leaf, x, DNUMS, False, dropout=False)
    apply = lorax.lora(lambda w, x: jnp.tanh(x @ w).sum(), strict=True)
    merged = lambda a, x: jnp.tanh(x @ lorax.merge(leaf.replace(a=a))).sum()  # noqa: E731
    got = apply(leaf, x)
    np.testing.assert_allclose(got, merged(leaf.a, x), rtol=1e-5)
    # forward mode (jvp) and forward-over-reverse (Hessian-vector products)
    t = jax.random.normal(jax.random.key(5), leaf.a.shape)
    jvp = jax.jvp(lambda a: apply(leaf.replace(a=a), x), (leaf.a,), (t,))[1]
    np.testing.assert_allclose(jvp, jax.jvp(lambda a: merged(a, x), (leaf.a,), (t,))[1], rtol=1e-4)
    hvp = jax.jvp(jax.grad(lambda a: apply(leaf.replace(a=a), x)), (leaf.a,), (t,))[1]
    want = jax.jvp(jax.grad(lambda a: merged(a, x)), (leaf.a,), (t,))[1]
    np.testing.assert_allclose(hvp, want, rtol=1e-4, atol=1e-5)
    # vmap over the tokens' batch and over stacked factors
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(
        jax.vmap(lambda x: apply(leaf, x))(xs), [got, merged(leaf.a, 2 * x)], rtol=1e-5
    )
    grads = jax.vmap(jax.grad(lambda a, x: apply(leaf.replace(a=a), x)))(
        jnp.stack([leaf.a, -leaf.a]), xs
    )
    want = jax.vmap(jax.grad(merged))(jnp.stack([leaf.a, -leaf.a]), xs)
    np.testing.assert_allclose(grads, want, rtol=1e-4, atol=1e-5)


def test_nf4_base_merges_and_equals_the_dequantized_model():
    _, x = _dense_case(tokens=128, n_in=128, n_out=64)
    w = jax.random.normal(jax.random.key(0), (128, 64))
    qw = lorax.quantize({"w": w}, "nf4", compute_dtype=jnp.float32)
    q = lorax.wrap(qw, rank=4, key=jax.random.key(1))["w"]
    q = q.replace(b=0.1 * jax.random.normal(jax.random.key(2), q.b.shape))
    assert lora_merged.merge_pays(q, x, DNUMS, False, dropout=False)
    dense = q.replace(base=q.base.materialize())
    f = lambda w, x: jnp.sum(jnp.sin(x @ w))  # noqa: E731
    got = jax.jit(jax.value_and_grad(lambda a, b: lorax.lora(f)(q.replace(a=a, b=b), x), (0, 1)))(
        q.a, q.b
    )
    want = jax.value_and_grad(lambda a, b: f(lorax.merge(dense.replace(a=a, b=b)), x), (0, 1))(
        dense.a, dense.b
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(128, name="down")(nn.gelu(nn.Dense(512, name="up")(x)))


def test_a_merged_train_step_computes_no_base_gradient():
    """XLA's FLOP count of a LoRA step in the merged regime: at most the low-rank path's,
    and near the frozen-base cost (2 forward GEMMs + down's dx: 3 units, against full
    fine-tuning's 5 with the two dW), so the base's gradient is not formed."""
    model, x = _MLP(), jax.random.normal(jax.random.key(0), (4, 256, 128))
    params = model.init(jax.random.key(1), x)["params"]
    lp = lorax.wrap(params, rank=4, key=jax.random.key(2))
    t, f = lorax.split(lp)
    apply = lorax.lora(model.apply, strict=True)
    tx = optax.adam(1e-3)

    def flops(loss, p, *args):
        # everything an argument: XLA would fold products of constants out of the count
        def step(p, s, *args):
            g = jax.grad(loss)(p, *args)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        compiled = jax.jit(step).lower(p, tx.init(p), *args).compile()
        return compiled.cost_analysis()["flops"]

    def lora_loss(t, f, x):
        return jnp.mean(apply({"params": lorax.combine(t, f)}, x) ** 2)

    merged = flops(lora_loss, t, f, x)
    with mock.patch.object(lora_merged, "merge_pays", lambda *a, **k: False):
        lowrank = flops(lora_loss, t, f, x)
    full = flops(lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2), params, x)
    assert merged <= lowrank, (merged, lowrank)
    assert merged / full < 0.65, (merged, full)  # the ideal: 3 / 5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reference_models_on_the_merged_path_equal_the_merged_model(family):
    """Whole models whose every adapted product merges (128 tokens against widths of 64
    and 128; a scanned layer stack; Llama's SwiGLU and grouped KV heads): logits and the
    factors' gradients equal those of the dense model ``lorax.merge`` builds."""
    from lorax.models import gpt2, llama

    if family == "gpt2":
        config = gpt2.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4)
        model, targets = gpt2.GPT2(config, scan_layers=True), ["c_attn", "c_proj", "c_fc"]
    else:
        config = llama.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        model = llama.Llama(config, scan_layers=True)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = jax.random.randint(jax.random.key(0), (4, 32), 0, 96)
    params = jax.jit(model.init)(jax.random.key(1), ids)["params"]
    lp = randomize_b(
        lorax.wrap(params, rank=4, targets=targets, key=jax.random.key(2)), jax.random.key(3)
    )
    calls = []
    real = lora_merged.merge_pays

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    with mock.patch.object(lora_merged, "merge_pays", spy):
        check_lora_equals_merged(model.apply, {"params": lp}, ids, rtol=1e-4, atol=1e-4)
    assert calls and all(calls), calls  # every adapted product took the merged path
