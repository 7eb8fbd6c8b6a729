"""Mixture-of-experts layers: ``jax.lax.ragged_dot`` (``ragged_dot_general``) through adapted
and quantized expert weights stays lazy, equals the merged weights (values and gradients)
and a float64 numpy reference; forms the factors cannot compute densify with a warning."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_lora_equals_merged
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.layout import infer_in_axes

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

# Data comes from numpy: each jax.random program of a new shape is an XLA compile (~1 s on
# a small CPU), and this file would spend most of its time compiling random number makers.
RNG = np.random.default_rng(0)
G, D, F, T = 4, 8, 16, 10  # experts, model width, expert width, tokens
# A top-1 assignment with expert 1 empty (a group of size 0) and uneven groups.
EXPERT = jnp.array([0, 3, 2, 0, 2, 3, 3, 0, 2, 3], jnp.int32)
X = jnp.asarray(RNG.standard_normal((T, D)), jnp.float32)
GS = jnp.array([3, 0, 4, 2], jnp.int32)  # for X alone: an empty group; row 9 is in none


class MoE(nn.Module):
    """Top-1 MoE with gated (SwiGLU) experts: route, sort the tokens by expert, grouped
    matmuls through the expert weights, gate, unsort."""

    experts: int = G
    hidden: int = F

    @nn.compact
    def __call__(self, x, expert=None):
        d = x.shape[-1]
        logits = nn.Dense(self.experts, use_bias=False, name="router")(x)
        if expert is None:
            expert = jnp.argmax(logits, axis=-1)
        probs = jax.nn.softmax(logits, axis=-1)
        gate = jnp.take_along_axis(probs, expert[:, None], axis=-1)[:, 0]
        order = jnp.argsort(expert, stable=True)
        group_sizes = jnp.bincount(expert, length=self.experts).astype(jnp.int32)
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        w_gate = self.param("w_gate", init, (self.experts, d, self.hidden))
        w_up = self.param("w_up", init, (self.experts, d, self.hidden))
        w_down = self.param("w_down", init, (self.experts, self.hidden, d))
        xs = x[order]
        h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes))
        h = h * jax.lax.ragged_dot(xs, w_up, group_sizes)
        y = jax.lax.ragged_dot(h, w_down, group_sizes) * gate[order][:, None]
        return jnp.zeros_like(x).at[order].set(y)


def _normal(shape, scale=1.0):
    return jnp.asarray(scale * RNG.standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def params():
    shapes = jax.eval_shape(MoE().init, jax.random.key(1), X, EXPERT)["params"]
    return jax.tree.map(lambda s: _normal(s.shape, s.shape[-2] ** -0.5), shapes)


@pytest.fixture(autouse=True)
def _densify_is_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoraxDensifyWarning)
        yield


PER_EXPERT = lorax.LoraSpec(stack_axes=1)  # the expert axis a stack axis: A, B per expert
EXPERT_AXIS_IN = lorax.LoraSpec(in_axes=1)  # the expert axis alone as the input axis


def _targets(**specs):
    """Targets: the named weights with their LoraSpec (True: wrap's default layout)."""
    return lambda path, leaf: next((v for k, v in specs.items() if k in path.split("/")), False)


def _wrap(tree, targets=None, **kwargs):
    """``lorax.wrap``'s leaves (layout, scale 2) with random numpy factors; B nonzero."""
    wrap = lambda t: lorax.wrap(t, rank=2, alpha=4.0, targets=targets, **kwargs)  # noqa: E731
    shapes = jax.eval_shape(wrap, tree)

    def fill(shape, base):
        if not isinstance(shape, lorax.LoraWeight):
            return base
        fan_in = np.prod(shape.a.shape[shape.stack_ndim : -1])  # A as wrap's kaiming init
        a = _normal(shape.a.shape, fan_in**-0.5)
        return shape.replace(base=base, a=a, b=_normal(shape.b.shape, 0.5))

    return jax.tree.map(fill, shapes, tree, is_leaf=lorax.is_lorax_leaf)


def test_wrap_default_layout_of_expert_weights(params):
    """lorax.wrap's default for a 3-D expert weight without a bias: the split closest to
    square, input axes (g, d), output (f): A per expert, B shared by the experts."""
    tree = jax.eval_shape(lambda p: lorax.wrap(p, rank=2), params)  # shapes: no compile
    shapes = {k: (v.a.shape, v.b.shape) for k, v in tree.items() if k.startswith("w_")}
    assert shapes == {
        "w_gate": ((G, D, 2), (2, F)),
        "w_up": ((G, D, 2), (2, F)),
        "w_down": ((G, F, 2), (2, D)),
    }
    tree = _wrap(params, _targets(w_up=PER_EXPERT, w_down=EXPERT_AXIS_IN))
    assert (tree["w_up"].a.shape, tree["w_up"].b.shape) == ((G, D, 2), (G, 2, F))
    assert (tree["w_down"].a.shape, tree["w_down"].b.shape) == ((G, 2), (2, F, D))
    # Targets by use (wrap's fn=): ragged_dot's expert axis is a stack axis, one adapter per
    # expert.
    by_use = jax.eval_shape(
        lambda p: lorax.wrap({"params": p}, rank=2, fn=MoE().apply, args=(X, EXPERT)), params
    )["params"]
    assert (by_use["w_up"].a.shape, by_use["w_up"].b.shape) == ((G, D, 2), (G, 2, F))


def test_moe_equals_merged(params):
    """Values and gradients (router included) with the default layout (w_gate, w_down) and
    one adapter per expert (w_up); an empty expert."""
    tree = _wrap(params, _targets(router=True, w_gate=True, w_up=PER_EXPERT, w_down=True))
    check_lora_equals_merged(MoE().apply, {"params": tree}, X, EXPERT)


def test_qlora_experts(params):
    """QLoRA experts: LoRA over NF4 (one adapter per expert) and int8 (the expert axis as the
    input axis) bases, and a bare NF4 expert weight; routed by the router."""

    @jax.jit  # one compile instead of one per eager op of the quantizers
    def quantize(params):
        q = lorax.quantize(params, "nf4", targets=["w_gate", "w_up"], compute_dtype=jnp.float32)
        return lorax.quantize(q, "int8", targets=["w_down"], compute_dtype=jnp.float32)

    q = quantize(params)
    tree = _wrap(q, _targets(w_gate=PER_EXPERT, w_down=EXPERT_AXIS_IN))
    assert isinstance(tree["w_gate"].base, lorax.NF4Weight)
    assert isinstance(tree["w_down"].base, lorax.Int8Weight)
    assert isinstance(tree["w_up"], lorax.NF4Weight)  # not adapted: dequantized at the use
    check_lora_equals_merged(MoE().apply, {"params": tree}, X)


def test_moe_stays_lazy(params):
    tree = _wrap(params, _targets(w_gate=True, w_up=PER_EXPERT, w_down=EXPERT_AXIS_IN))
    jaxpr = jax.make_jaxpr(lorax.lora(MoE().apply, strict=True))({"params": tree}, X, EXPERT)
    # No expert-weight-shaped array is computed: the bases are only read (stop_gradient).
    formed = [
        e.primitive.name
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name != "stop_gradient"
        and any(tuple(v.aval.shape) in {(G, D, F), (G, F, D)} for v in e.outvars)
    ]
    assert not formed, formed
    # three base products, then (ragged, dot), (ragged, ragged) and (dot, ragged)
    assert sum(e.primitive.name == "ragged_dot_general" for e in jaxpr.jaxpr.eqns) == 7


def _gather_routed(params, x, expert):
    """Each token's expert weight gathered (``w[ids]``) and applied by a batched einsum, the
    other common way to write a top-1 MoE (no sorting, no ragged_dot)."""
    w = params["w_gate"][expert]  # (tokens, D, F)
    h = jax.nn.silu(jnp.einsum("td,tdf->tf", x, w))
    return jnp.einsum("tf,tfd->td", h, jnp.take(params["w_down"], expert, axis=0))


def test_gather_routed_experts_equal_merged_and_stay_lazy(params):
    """LoRA (one adapter per expert) and QLoRA experts picked per token by a gather: the
    gather picks rows of the stacked factors, never the dense expert weights."""
    # the NF4 experts quantized per expert (stacked=1), so that whole experts can be picked
    nf4 = lorax.quantize(
        params, "nf4", targets=["w_gate", "w_down"], stacked=1, compute_dtype=jnp.float32
    )
    for base in (params, nf4):
        tree = _wrap(base, _targets(w_gate=PER_EXPERT, w_down=PER_EXPERT))
        check_lora_equals_merged(_gather_routed, tree, X, EXPERT)
    jaxpr = jax.make_jaxpr(lorax.lora(_gather_routed, strict=True))(tree, X, EXPERT)
    # no array of a whole expert stack's shape: neither W + s A B nor a dequantized stack
    # (the per-token layers the gather reads are what the dense program gathers too)
    formed = [
        e.primitive.name
        for e in jaxpr.jaxpr.eqns
        if e.primitive.name != "stop_gradient"
        and any(tuple(v.aval.shape) in {(G, D, F), (G, F, D)} for v in e.outvars)
    ]
    assert not formed, formed


def _dense64(leaf):
    """The dense weight in float64, from the factors, with numpy."""
    a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
    ns, ni, nd = leaf.stack_ndim, leaf.in_ndim, len(leaf.shape)
    stack, ins, outs = "abcdefgh"[:ns], "abcdefgh"[ns : ns + ni], "abcdefgh"[ns + ni : nd]
    delta = np.einsum(f"{stack}{ins}r,{stack}r{outs}->{stack}{ins}{outs}", a, b)
    return np.asarray(leaf.base, np.float64) + leaf.scale * delta


def _ragged64(x, w, group_sizes, transposed=False):
    """``ragged_dot`` in float64, one group at a time; rows after the last group are 0."""
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], w.shape[1 if transposed else 2]))
    start = 0
    for e, size in enumerate(np.asarray(group_sizes)):
        out[start : start + size] = x[start : start + size] @ (w[e].T if transposed else w[e])
        start += size
    return out


def _ragged_fn(contract=1, dnums=None, **kwargs):
    """``ragged_dot_general`` of (m, k) rows with a (g, ., .) weight contracted on axis
    ``contract`` (1: ``lax.ragged_dot``'s form; 2: weights stored (g, out, in)), or with
    the dimension numbers ``dnums``."""
    if dnums is None:
        dnums = jax.lax.RaggedDotDimensionNumbers((((1,), (contract,)), ((), ())), [0], [0])
    return lambda w, x, gs: jax.lax.ragged_dot_general(x, w, gs, dnums, **kwargs)


def test_float64_reference(params):
    """ragged_dot(x, W, gs) + s * ragged_dot(ragged_dot(x, A, gs), B, gs) and the other
    layouts, against numpy in float64 one group at a time."""
    tree = _wrap(params, _targets(w_gate=True, w_up=PER_EXPERT, w_down=EXPERT_AXIS_IN))
    for name in ("w_gate", "w_up", "w_down"):
        leaf = tree[name]
        x = jnp.tile(X, (1, 2)) if name == "w_down" else X
        got = jax.jit(lorax.lora(_ragged_fn(), strict=True))(leaf, x, GS)
        np.testing.assert_allclose(got, _ragged64(x, _dense64(leaf), GS), rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(got)[-1])  # the row in no group stays zero


def test_weights_stored_out_by_in(params):
    """``ragged_dot_general`` contracting the weight's last axis, (g, out, in) storage: B
    first, then A (wrap's default layout) or both per expert; also with bf16 inputs and a
    float32 result, as MoE kernels ask for."""
    w = jnp.swapaxes(params["w_gate"], 1, 2)  # (g, f, d)
    tree = _wrap({"default": w, "per_expert": w}, _targets(default=True, per_expert=PER_EXPERT))
    for leaf in tree.values():
        got = jax.jit(lorax.lora(_ragged_fn(2), strict=True))(leaf, X, GS)
        np.testing.assert_allclose(got, _ragged64(X, _dense64(leaf), GS, True), atol=1e-5)

    fn = _ragged_fn(2, preferred_element_type=jnp.float32)
    bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), tree["default"])
    got = jax.jit(lorax.lora(fn, strict=True))(bf16, X.astype(jnp.bfloat16), GS)
    want = jax.jit(fn)(lorax.merge(bf16), X.astype(jnp.bfloat16), GS)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0.03, atol=0.03)


def _batched64(x, w, group_sizes):
    """Per-head experts in float64: x (h, m, k), w (g, h, k, n)."""
    return np.stack([_ragged64(x[i], w[:, i], group_sizes) for i in range(x.shape[0])])


@pytest.mark.parametrize("spec", [True, lorax.LoraSpec(stack_axes=2)], ids=["default", "stack2"])
def test_experts_per_head(spec):
    """Batch axes: an expert weight per head (g, h, k, n) and rows (h, m, k). wrap's default
    splits (g, h) | (k, n), so B comes first and A is a batched ragged product; as stack
    axes both products are ragged and batched."""
    w = _normal((3, 2, D, 5))
    leaf = _wrap({"w": w}, _targets(w=spec))["w"]
    assert leaf.stack_ndim == (0 if spec is True else 2)
    dnums = jax.lax.RaggedDotDimensionNumbers((((2,), (2,)), ((0,), (1,))), [1], [0])
    x, gs = jnp.stack([X, -X]), jnp.array([3, 0, 5], jnp.int32)
    got = jax.jit(lorax.lora(_ragged_fn(dnums=dnums), strict=True))(leaf, x, gs)
    np.testing.assert_allclose(got, _batched64(x, _dense64(leaf), gs), rtol=1e-5, atol=1e-5)


def test_group_sizes_per_outer_row(params):
    """Group sizes (s, g) for rows (s, m, k): each outer row has its own groups."""
    leaf = _wrap({"w": params["w_gate"]}, _targets(w=PER_EXPERT))["w"]
    gs = jnp.array([[3, 0, 4, 2], [1, 5, 0, 4]], jnp.int32)
    x = jnp.stack([X, 2 * X])
    dnums = jax.lax.RaggedDotDimensionNumbers((((2,), (1,)), ((), ())), [1], [0])
    got = jax.jit(lorax.lora(_ragged_fn(dnums=dnums), strict=True))(leaf, x, gs)
    want = np.stack([_ragged64(x[i], _dense64(leaf), gs[i]) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unsupported_forms_densify_with_a_warning(params):
    """Forms with no factored product densify with the warning and give the dense result:
    JAX's ragged-contracting mode (the product of a weight's gradient), its ragged-batch
    mode, and a product contracting input and output axes of the leaf at once."""
    gs = jnp.array([3, 0, 5], jnp.int32)
    router = _wrap({"w": params["router"]["kernel"]})["w"]  # (d, g)
    contracting = jax.lax.RaggedDotDimensionNumbers((((1,), (0,)), ((), ())), [1], [])
    w3 = _wrap({"w": _normal((2, D, 5))})["w"]  # (h, k, n), h a batch axis made ragged
    ragged_batch = jax.lax.RaggedDotDimensionNumbers((((2,), (1,)), ((0,), (0,))), [0], [])
    w4 = _wrap({"w": _normal((3, 2, 4, 5))}, _targets(w=lorax.LoraSpec(in_axes=2)))["w"]
    split = jax.lax.RaggedDotDimensionNumbers((((1, 2), (1, 2)), ((), ())), [0], [0])
    cases = (
        (router, contracting, X, gs),
        (w3, ragged_batch, jnp.stack([X, -X]), jnp.array([1, 1], jnp.int32)),
        (w4, split, X.reshape(T, 2, 4), gs),  # (m, 2, 4) x (g, 2 | 4, 5)
    )
    for leaf, dnums, lhs, sizes in cases:
        fn = _ragged_fn(dnums=dnums)
        with pytest.warns(lorax.LoraxDensifyWarning, match="ragged_dot_general"):
            got = jax.jit(lorax.lora(fn))(leaf, lhs, sizes)
        want = jax.jit(fn)(lorax.merge(leaf), lhs, sizes)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_explicit_mesh_out_sharding(params):
    """On a mesh with explicit axes every product says its sharding (JAX requires it of
    ragged_dot_general): the intermediates take the result's."""
    mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    fn = _ragged_fn(out_sharding=jax.sharding.PartitionSpec(None, None))
    tree = _wrap(params, _targets(w_gate=True, w_up=PER_EXPERT, w_down=EXPERT_AXIS_IN))
    with jax.set_mesh(mesh):
        for name in ("w_gate", "w_up", "w_down"):
            x = jnp.tile(X, (1, 2)) if name == "w_down" else X
            got = jax.jit(lorax.lora(fn, strict=True))(tree[name], x, GS)
            want = jax.jit(fn)(lorax.merge(tree[name]), x, GS)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_on_the_low_rank_input(params):
    leaf = _wrap({"w": params["w_gate"]}, dropout=0.5)["w"]
    base = jax.lax.ragged_dot(X, params["w_gate"], GS)
    plain = jax.jit(lorax.lora(_ragged_fn(), strict=True))(leaf, X, GS)  # no key, no dropout
    low = plain - base
    np.testing.assert_allclose(plain, _ragged64(X, _dense64(leaf), GS), rtol=1e-5, atol=1e-5)

    @jax.jit
    def dropped(leaf, seeds):  # one output per key (lax.map: JAX cannot vmap ragged_dot
        # over the keys alone)
        def one(seed):
            key = jax.random.key(seed)
            return lorax.lora(_ragged_fn(), strict=True)(leaf, X, GS, dropout_rng=key)

        return jax.lax.map(one, seeds)

    seeds = jnp.concatenate([jnp.array([5, 5, 6]), jnp.arange(7, 2007)])
    outs = np.asarray(dropped(leaf, seeds))
    np.testing.assert_array_equal(outs[0], outs[1])  # a key gives one mask
    assert not np.allclose(outs[0], plain) and not np.allclose(outs[0], outs[2])
    # unbiased: the mean over keys is the undropped low-rank path
    np.testing.assert_allclose(outs.mean(0) - base, low, atol=0.1 * float(jnp.abs(low).max()))
    # B = 0: the low-rank path is zero and dropout leaves the base product alone
    zero_b = dropped(leaf.replace(b=jnp.zeros_like(leaf.b)), seeds[:3])
    np.testing.assert_allclose(zero_b, np.broadcast_to(base, zero_b.shape), atol=1e-5)


@st.composite
def ragged_cases(draw):
    g = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(0, 3), min_size=g, max_size=g))
    k, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return dict(
        sizes=sizes,
        m=max(1, sum(sizes) + draw(st.integers(0, 2))),  # rows after the last group: in none
        k=k,
        n=n,
        layout=draw(st.sampled_from(["per_expert", "in_g", "in_gk", "default"])),
        rank_frac=draw(st.floats(0, 1)),
        transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=15, deadline=None)
@given(ragged_cases())
def test_property_equals_float64_reference(case):
    rng = np.random.default_rng(case["seed"])
    g, m, k, n = len(case["sizes"]), case["m"], case["k"], case["n"]
    shape = (g, n, k) if case["transposed"] else (g, k, n)
    ns, ni = {"per_expert": (1, 1), "in_g": (0, 1), "in_gk": (0, 2)}.get(
        case["layout"],
        (0, infer_in_axes(shape, {}, 0)),  # lorax.wrap's default split
    )
    fan_in, fan_out = np.prod(shape[ns : ns + ni]), np.prod(shape[ns + ni :])
    rank = 1 + int(case["rank_frac"] * (min(fan_in, fan_out) - 1))
    # The leaf is made directly from numpy arrays: no compile besides the product's.
    leaf = lorax.LoraWeight(
        base=jnp.asarray(rng.standard_normal(shape), jnp.float32),
        a=jnp.asarray(rng.standard_normal(shape[: ns + ni] + (rank,)), jnp.float32),
        b=jnp.asarray(rng.standard_normal(shape[:ns] + (rank,) + shape[ns + ni :]), jnp.float32),
        scale=0.5,
    )
    assert leaf.misfit() is None and (leaf.stack_ndim, leaf.in_ndim) == (ns, ni)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    gs = jnp.asarray(case["sizes"], jnp.int32)
    fn = _ragged_fn(2 if case["transposed"] else 1)
    got = jax.jit(lorax.lora(fn, strict=True))(leaf, x, gs)
    want = _ragged64(x, _dense64(leaf), gs, case["transposed"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
