"""Structural primitives on LoRA leaves: indexing a kernel (``w[k]``), a layer loop over a
stacked tree (``params[i]``, static or traced), ``jnp.split`` of a fused projection and
``jnp.concatenate`` / ``jnp.stack`` of separate ones keep the leaves lazy, over dense, NF4
and int8 bases, and give the merged model's values and gradients. What has no low-rank form
still densifies, with the warning."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import lorax
from tests.helpers import _loss, assert_tree_close

KEY = jax.random.key(0)

# name: (shape, stack axes, input axes, rank, scale)
LAYOUT = {
    "s_w": ((3, 32, 32), 1, 1, 2, 1.0),  # a stack of 3 square layers
    "s_v": ((2, 32, 16), 1, 1, 2, 1.0),  # another stack
    "kernel": ((3, 32, 16), 0, 2, 2, 1.0),  # one 3-D kernel: taps x in x out
    "qkv": ((32, 48), 0, 1, 3, 1.0),  # a fused projection
    "q": ((32, 16), 0, 1, 2, 1.0),  # separate projections of ranks 2, 3, 2, scales 1, 1, 3
    "k": ((32, 16), 0, 1, 3, 1.0),
    "v": ((32, 16), 0, 1, 2, 3.0),
    "l0": ((32, 32), 0, 1, 2, 1.0),  # separate layers of ranks 2 and 3
    "l1": ((32, 32), 0, 1, 3, 1.0),
}


def _lora(base, a, b, **kwargs):
    return lorax.LoraWeight(base=jnp.asarray(base), a=jnp.asarray(a), b=jnp.asarray(b), **kwargs)


@functools.cache
def _trees(base):
    """Every weight of LAYOUT as a LoRA leaf over a dense, NF4 or int8 base (weights of
    scale 1 / sqrt(in)), with random A and B. Made from numpy arrays, the bases quantized
    in one jitted call: this machine compiles slowly, and eagerly one op at a time."""
    rng = np.random.default_rng(0)
    params = {
        name: np.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]), np.float32)
        for name, (shape, *_) in LAYOUT.items()
    }
    if base != "dense":
        quantize = lambda p: lorax.quantize(
            p, base, compute_dtype=jnp.float32, stacked="s_.*", double_quant=False
        )
        params = jax.jit(quantize)(params)
    tree = {}
    for name, (shape, ns, ni, rank, scale) in LAYOUT.items():
        a = rng.normal(size=(*shape[: ns + ni], rank)) / np.sqrt(np.prod(shape[ns : ns + ni]))
        b = 0.2 * rng.normal(size=(*shape[:ns], rank, *shape[ns + ni :]))
        a, b = np.float32(a), np.float32(b)
        tree[name] = lorax.LoraWeight(
            base=params[name], a=jnp.asarray(a), b=jnp.asarray(b), scale=scale
        )
    return tree


def _tree(base, *names):
    return {name: _trees(base)[name] for name in names}


def _check(apply, tree, *args, rtol=1e-5, atol=1e-5):
    """``lora(apply)`` equals ``apply`` on the merged tree, values and gradients with
    respect to the factors; the extra ``args`` stay traced (jit arguments); nothing
    densifies. One jitted program computes both sides (compiles are what cost here)."""
    trainable, frozen = lorax.split(tree)

    def value_and_grad(f, t, *a):
        loss = lambda t: _loss(f(lorax.combine(t, frozen), *a))
        return f(lorax.combine(t, frozen), *a), jax.grad(loss)(t)

    lora_apply = lorax.lora(apply, strict=True)
    merged_apply = lambda t, *a: apply(lorax.merge(t), *a)
    both = lambda t, *a: (value_and_grad(lora_apply, t, *a), value_and_grad(merged_apply, t, *a))
    with warnings.catch_warnings(), jax.numpy_dtype_promotion("strict"):
        warnings.simplefilter("error", lorax.LoraxDensifyWarning)
        (got, g_got), (want, g_want) = jax.jit(both)(trainable, *args)
    assert_tree_close(got, want, rtol, atol)
    # gradients sum more float32 terms, in another order: 1e-4 as in tests/helpers.py
    assert_tree_close(g_got, g_want, max(rtol, 1e-4), max(atol, 1e-4))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_got))


BASES = ["dense", "nf4"]


# ----- indexing: w[k], params[i] -----------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
def test_static_index_of_a_kernel(base):
    """A 1-D convolution written as taps, ``sum_k x[:, k:k+T] @ w[k]`` (a slice and a
    squeeze of the tap axis, an input axis of the 3-D kernel; over NF4 the tap is viewed
    transposed, a 3-D layer being stored row-major)."""
    x = jax.random.normal(KEY, (2, 7, 32))

    def conv(p, x):
        return sum(x[:, k : k + 5] @ p["kernel"][k] for k in range(3))

    _check(conv, _tree(base, "kernel"), x)


@pytest.mark.parametrize("base", [*BASES, "int8"])
def test_layer_loop_over_a_stack(base):
    """``params[i]`` in a Python loop (static ``i``: slice + squeeze) and in
    ``lax.fori_loop`` (traced ``i``: dynamic_slice + squeeze)."""
    x = jax.random.normal(KEY, (4, 32))

    def python_loop(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["s_w"][i])
        return x

    def fori_loop(p, x):
        return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["s_w"][i]), x)

    _check(lambda p, x: (python_loop(p, x), fori_loop(p, x)), _tree(base, "s_w"), x)


@pytest.mark.parametrize("base", BASES)
def test_traced_index_and_dynamic_slice(base):
    """A traced layer index (a jit argument) and traced windows of input rows (A) and of
    output columns (B)."""
    x = jax.random.normal(KEY, (4, 32))

    def windows(p, x, i):
        w = p["s_w"][i]
        rows = lax.dynamic_slice_in_dim(w, 4 * i, 8, axis=0)
        cols = lax.dynamic_slice_in_dim(w, 8 * i, 8, axis=1)
        return x[:, :8] @ rows, x @ cols

    _check(windows, _tree(base, "s_w"), x, jnp.int32(1))


@pytest.mark.parametrize("base", BASES)
def test_take_and_fancy_index_of_layers(base):
    """Layers picked by a gather: ``params[ids]``; and ``jnp.take``, which fills
    out-of-range layers with NaN, which a quantized base cannot hold: dense base only."""
    x = jax.random.normal(KEY, (4, 32))

    def pick(p, x, ids):
        fancy = jnp.einsum("bi,lio->lbo", x, p["s_v"][ids])
        return (fancy, x @ jnp.take(p["s_v"], ids[0], axis=0)) if base == "dense" else fancy

    _check(pick, _tree(base, "s_v"), x, jnp.array([1, 0, 1]))


# ----- split and concatenate ----------------------------------------------------------------


def _attention(q, k, v):
    return jax.nn.softmax(q @ k.T) @ v


@pytest.mark.parametrize("base", [*BASES, "int8"])
def test_split_of_a_fused_projection(base):
    """``jnp.split(w_qkv, 3, axis=-1)``: B sliced; NF4 codes cut on block boundaries."""
    x = jax.random.normal(KEY, (5, 32))
    apply = lambda p, x: _attention(*(x @ w for w in jnp.split(p["qkv"], 3, axis=-1)))
    _check(apply, _tree(base, "qkv"), x)


@pytest.mark.parametrize("base", [*BASES, "int8"])
def test_concatenate_along_the_output_axis(base):
    """``jnp.concatenate([wq, wk, wv], -1)`` of leaves of ranks 2, 3, 2 and different
    scales: one leaf of rank 7, A's side by side, B block-diagonal, scales folded in."""
    x = jax.random.normal(KEY, (5, 32))

    def fused(p, x):
        h = x @ jnp.concatenate([p["q"], p["k"], p["v"]], axis=-1)
        return _attention(*jnp.split(h, 3, axis=-1))

    _check(fused, _tree(base, "q", "k", "v"), x)


def test_concatenate_along_the_input_axis_and_with_arrays():
    """Along the input axis: A block-diagonal, B's stacked over the rank; a plain array
    joins as rank 0 (its rows come from the base alone)."""
    tree = {**_tree("dense", "q", "v"), "plain": jax.random.normal(KEY, (4, 16))}
    x = jax.random.normal(KEY, (3, 68))
    _check(lambda p, x: x @ jnp.concatenate([p["q"], p["plain"], p["v"]], axis=0), tree, x)


@pytest.mark.parametrize("base", BASES)
def test_stack_and_concatenate_along_the_stack_axis(base):
    """``jnp.stack`` of separate layers (ranks 2 and 3: zero-padded to 3) in a layer loop,
    ``jnp.concatenate`` of stacks and new size-1 axes (``w[None]``: a stack axis,
    ``w[:, None]``: an input axis) in batched products."""
    x = jax.random.normal(KEY, (4, 32))

    def stacked(p, x):
        w = jnp.stack([p["l0"], p["l1"]])
        return lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ w[i]), x)

    def concatenated(p, x):
        w = jnp.concatenate([p["s_v"], p["s_v"][:1]], axis=0)
        return jnp.einsum("bi,lio->lbo", x, w)

    def expanded(p, x):
        return jnp.einsum("bi,lio->lbo", x, p["l0"][None]), jnp.einsum(
            "bi,ijo->bjo", x, p["l1"][:, None]
        )

    apply = lambda p, x: (stacked(p, x), concatenated(p, x), expanded(p, x))
    _check(apply, _tree(base, "l0", "l1", "s_v"), x)


# ----- the parts stay quantized --------------------------------------------------------------


def test_quantized_parts_stay_quantized():
    """A layer of an NF4 stack, a block-aligned piece of a fused NF4 projection, a tap of a
    3-D NF4 kernel and the concatenation of NF4 projections keep their codes."""

    @jax.jit
    def parts(tree):
        layer = tree["s_w"].dynamic_slice([jnp.int32(1), 0, 0], (1, 32, 32)).squeeze((0,))
        pieces = tree["qkv"].split([16, 16, 16], 1)
        tap = tree["kernel"].slice((1, 0, 0), (2, 32, 16), None).squeeze((0,))
        both = tree["q"].concatenate([tree["q"], tree["k"]], 1)
        dense = lorax.merge(tree)
        got = [p.materialize() for p in (layer, pieces[2], tap, both)]
        want = [
            dense["s_w"][1],
            dense["qkv"][:, 32:],
            dense["kernel"][1],
            jnp.concatenate([dense["q"], dense["k"]], 1),
        ]
        return (layer, pieces, tap, both), got, want

    (layer, pieces, tap, both), got, want = parts(_trees("nf4"))
    assert isinstance(layer.base, lorax.NF4Weight) and layer.base.shape == (32, 32)
    assert all(isinstance(p.base, lorax.NF4Weight) for p in pieces)
    assert isinstance(tap.base.inner, lorax.NF4Weight)  # a 3-D layer is row-major: transposed
    assert isinstance(both.base, lorax.NF4Weight) and both.rank == 5
    assert_tree_close(got, want, 1e-6, 1e-6)

    # the layer loop never forms the dense stack
    loop = lorax.lora(lambda w, x: sum(x @ w[i] for i in range(3)), strict=True)
    hlo = jax.jit(loop).lower(_trees("nf4")["s_w"], jnp.ones((4, 32))).as_text()
    assert "3x32x32" not in hlo


def test_double_quantized_parts():
    """With double quantization a run keeps the second-level codes when it starts on one of
    their blocks, and decodes its block scales exactly otherwise; stacks are cut as is."""
    w = np.asarray(np.random.default_rng(1).normal(size=(2, 32, 48)), np.float32)

    @jax.jit
    def parts(w):
        q = lorax.quant.quantize_nf4(w, compute_dtype=jnp.float32, stack=1)
        pieces = [
            q.slice((0, 0, 0), (2, 32, 16), None),  # starts on a second-level block
            q.slice((1, 0, 16), (2, 32, 48), None),  # starts inside one
            q.dynamic_slice([jnp.int32(1), 0, 0], (1, 32, 48)).squeeze((0,)),
            q.concatenate([q, q], 0),
            q.concatenate([q, q], 2),
        ]
        dense = q.materialize()
        want = [
            dense[:, :, :16],
            dense[1:, :, 16:],
            dense[1],
            jnp.concatenate([dense, dense], 0),
            jnp.concatenate([dense, dense], 2),
        ]
        return pieces, [p.materialize() for p in pieces], want

    pieces, got, want = parts(w)
    assert all(isinstance(p, lorax.NF4Weight) for p in pieces)
    assert [p.double_quant for p in pieces] == [True, False, True, True, False]
    assert_tree_close(got, want, 1e-6, 1e-6)


# ----- what still densifies -------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "only input axis squeezed",
        "dropout rates differ",
        "nf4 along the input axis",
    ],
)
def test_no_low_rank_form_densifies_with_the_warning(case):
    """No LoRA leaf stands for these: they densify, warn, and compute the right values."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
    if case == "only input axis squeezed":  # w[0] of an (in=1, out) leaf is a vector
        tree = {
            "w": _lora(rng.normal(size=(1, 32)), rng.normal(size=(1, 1)), rng.normal(size=(1, 32)))
        }
        apply = lambda p, x: x @ p["w"][0]
    elif case == "dropout rates differ":
        a, b = rng.normal(size=(32, 2)), rng.normal(size=(2, 8))
        tree = {"a": _lora(np.ones((32, 8)), a, b), "b": _lora(np.ones((32, 8)), a, b, dropout=0.1)}
        apply = lambda p, x: x @ jnp.concatenate([p["a"], p["b"]], axis=1)
    elif case == "nf4 along the input axis":  # a 2-D layer's codes run along its outputs
        tree = _tree("nf4", "q", "k")
        x = jnp.concatenate([x, x], axis=1)
        apply = lambda p, x: x @ jnp.concatenate([p["q"], p["k"]], axis=0)
    with pytest.warns(lorax.LoraxDensifyWarning):
        got = jax.jit(lorax.lora(apply))(tree, x)
    np.testing.assert_allclose(got, apply(lorax.merge(tree), x), rtol=1e-5, atol=1e-5)


# ----- property: any slice ---------------------------------------------------------------------


@st.composite
def slicing_cases(draw):
    """A weight of 0-1 stack, 1-2 input and 1-2 output axes and an index of it: per axis a
    slice (with a step), an int or a traced int; never every input (output) axis an int
    (which leaves no low-rank form)."""
    ns, ni, no = draw(st.integers(0, 1)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    shape = draw(st.lists(st.integers(1, 4), min_size=ns + ni + no, max_size=ns + ni + no))
    kinds = [draw(st.sampled_from(["slice", "int", "traced"])) for _ in shape]
    for group in (range(ns, ns + ni), range(ns + ni, ns + ni + no)):
        if all(kinds[ax] != "slice" for ax in group):
            kinds[draw(st.sampled_from(list(group)))] = "slice"
    # with a traced int, jnp lowers a strided slice to a general gather (no lazy form)
    steps = st.integers(1, 1 if "traced" in kinds else 2)
    index = []
    for kind, n in zip(kinds, shape):
        if kind == "slice":
            start = draw(st.integers(0, n - 1))
            index.append(slice(start, draw(st.integers(start + 1, n)), draw(steps)))
        else:
            index.append(draw(st.integers(-n, n - 1)))
    fan_in, fan_out = np.prod(shape[ns : ns + ni]), np.prod(shape[ns + ni :])
    rank = draw(st.integers(1, int(min(fan_in, fan_out, 3))))
    traced = tuple(ax for ax, kind in enumerate(kinds) if kind == "traced")
    return tuple(shape), ns, ni, tuple(index), traced, rank


@settings(max_examples=15, deadline=None)
@given(slicing_cases())
def test_any_index_stays_lazy(case):
    """``w[index]`` (slice, squeeze, dynamic_slice) used in a product that contracts all of
    its axes equals the merged weight's, values and gradients."""
    shape, ns, ni, index, traced, rank = case
    rng = np.random.default_rng(0)
    a_shape = (*shape[: ns + ni], rank)
    b_shape = (*shape[:ns], rank, *shape[ns + ni :])
    tree = {"w": _lora(*(rng.normal(size=s) for s in (shape, a_shape, b_shape)), scale=0.5)}
    ints = jnp.array([index[ax] for ax in traced], jnp.int32)

    def apply(p, x, ints):
        position = {ax: j for j, ax in enumerate(traced)}
        idx = tuple(ints[position[ax]] if ax in position else i for ax, i in enumerate(index))
        part = p["w"][idx]
        return jnp.tensordot(x, part, axes=part.ndim)  # contracts every axis of the part

    x = jax.random.normal(jax.random.key(2), np.zeros(shape)[index].shape)
    _check(apply, tree, x, ints)


def test_take_of_an_nf4_stack_dequantizes_only_the_picked_layers():
    """jnp.take fills out-of-range layers with NaN, which NF4 codes cannot hold: the picked
    layers are dequantized (what the dense take returns), never the whole stack."""
    tree = _tree("nf4", "s_v")
    n_in = tree["s_v"].shape[1]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, n_in)), jnp.float32)
    # one picked layer per row of x, applied to it
    apply = lambda p, ids, x: jnp.einsum("ni,nio->no", x, jnp.take(p["s_v"], ids, axis=0))
    ids = jnp.array([1, 0, 7])  # 7: past the stack, read as NaN as in the dense take
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoraxDensifyWarning)
        got = jax.jit(lorax.lora(apply))(tree, ids, x)
        jaxpr = jax.make_jaxpr(lorax.lora(apply, strict=True))(tree, ids, x)
    want = apply(lorax.merge(tree), ids, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert bool(jnp.isnan(got[2]).all()) and not bool(jnp.isnan(got[:2]).any())
    stack = tuple(tree["s_v"].shape)
    assert not [e for e in jaxpr.jaxpr.eqns if any(tuple(v.aval.shape) == stack for v in e.outvars)]
