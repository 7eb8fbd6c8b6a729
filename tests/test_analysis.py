"""lorax.analysis against numpy float64: SVDs of the merged dense update, the direct formulas
of energy / effective rank / subspace similarity / amplification, and reports built from
them. Shapes are tiny; hypothesis draws shapes, ranks, stack axes and factor dtypes."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.analysis import (
    amplification,
    delta_spectrum,
    dense_spectrum,
    effective_rank,
    energy,
    randomized_svd,
    similarity_grid,
    subspace_similarity,
    update_report,
)
from lorax.errors import LoraxTypeError, LoraxValueError

# Each new shape compiles (about 0.2 s): few examples, tiny shapes.
FEW = settings(max_examples=7, deadline=None)


# ------------------------------------------------------------------------ references


def np_matrices(x, ns, ni):
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[:ns] + (math.prod(x.shape[ns : ns + ni]), -1))


def np_svdvals(x, ns, ni):
    return np.linalg.svd(np_matrices(x, ns, ni), compute_uv=False)


def np_lora_delta(a, b, scale, ns):
    """scale * A @ B in float64, as matrices (*stack, m, n)."""
    a = np.asarray(a).astype(np.float64)  # on the host, bfloat16 included
    b = np.asarray(b).astype(np.float64)
    stack, r = a.shape[:ns], a.shape[-1]
    a2 = a.reshape(stack + (-1, r))
    b2 = b.reshape(stack + (r, -1))
    return scale * a2 @ b2


def np_phi(a1, a2, i, j):
    u1 = np.linalg.svd(np.asarray(a1, np.float64), full_matrices=False)[0]
    u2 = np.linalg.svd(np.asarray(a2, np.float64), full_matrices=False)[0]
    return np.sum((u1[:, :i].T @ u2[:, :j]) ** 2) / min(i, j)


def np_amplification(delta, w, r):
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64))
    proj = u[:, :r].T @ np.asarray(w, np.float64) @ vt[:r].T
    return np.linalg.norm(s) / np.linalg.norm(proj)


def with_spectrum(rng, m, n, s):
    """An m x n float32 matrix with singular values s (len <= min(m, n))."""
    u = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return ((u * s) @ v.T).astype(np.float32)


# ------------------------------------------------------------------------ delta_spectrum


@st.composite
def lora_cases(draw):
    ns = draw(st.integers(0, 2))
    stack = tuple(draw(st.lists(st.integers(1, 3), min_size=ns, max_size=ns)))
    ins = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    outs = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    return dict(
        ns=ns,
        stack=stack,
        ins=ins,
        outs=outs,
        rank=draw(st.integers(1, 6)),
        scale=draw(st.sampled_from([0.5, 2.0, -1.5])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_leaf(case, rng=None):
    rng = rng or np.random.default_rng(case["seed"])
    stack, ins, outs, r = case["stack"], case["ins"], case["outs"], case["rank"]
    dtype = case["dtype"]  # converted on the host: no device program per shape
    a = jnp.asarray(rng.standard_normal(stack + ins + (r,)).astype(dtype))
    b = jnp.asarray(rng.standard_normal(stack + (r,) + outs).astype(dtype))
    base = jnp.asarray(rng.standard_normal(stack + ins + outs).astype(np.float32))
    return lorax.LoraWeight(base, a, b, scale=case["scale"])


@FEW
@given(lora_cases())
def test_delta_spectrum_is_the_svd_of_the_merged_update(case):
    leaf = make_leaf(case)
    got = np.asarray(delta_spectrum(leaf))
    assert got.shape == case["stack"] + (case["rank"],)
    assert got.dtype == np.float32
    ref = np.linalg.svd(np_lora_delta(leaf.a, leaf.b, case["scale"], case["ns"]), compute_uv=False)
    r, t = case["rank"], ref.shape[-1]
    ref = ref[..., :r] if t >= r else np.pad(ref, [(0, 0)] * case["ns"] + [(0, r - t)])
    tol = 1e-5 * max(1.0, float(ref.max(initial=0.0)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=tol)


def test_delta_spectrum_never_forms_the_dense_update():
    m, n, r = 384, 320, 4
    leaf = lorax.LoraWeight(
        jax.ShapeDtypeStruct((2, m, n), jnp.float32),
        jax.ShapeDtypeStruct((2, m, r), jnp.float32),
        jax.ShapeDtypeStruct((2, r, n), jnp.float32),
        scale=2.0,
    )
    jaxpr = jax.make_jaxpr(delta_spectrum)(leaf)

    def sizes(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                yield math.prod(getattr(v.aval, "shape", ()))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) <= 2 * max(m, n) * r  # (m, r) and (r, n) only


def test_delta_spectrum_of_a_zero_update_and_a_bad_leaf():
    leaf = lorax.LoraWeight(jnp.ones((6, 5)), jnp.ones((6, 3)), jnp.zeros((3, 5)))  # as at init
    np.testing.assert_array_equal(delta_spectrum(leaf), np.zeros(3, np.float32))
    with pytest.raises(LoraxTypeError, match="leaf must be a lorax.LoraWeight"):
        delta_spectrum(jnp.ones((6, 5)))
    bad = lorax.LoraWeight(jnp.ones((6, 5)), jnp.ones((6, 3)), jnp.ones((2, 5)))
    with pytest.raises(LoraxValueError, match="delta_spectrum"):
        delta_spectrum(bad)


# ------------------------------------------------------------------------ dense spectra


@st.composite
def dense_cases(draw):
    ns = draw(st.integers(0, 2))
    ni = draw(st.integers(1, 2))
    no = draw(st.integers(1, 2))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ns + ni + no, max_size=ns + ni + no)))
    return ns, ni, shape, draw(st.integers(0, 2**16))


@FEW
@given(dense_cases())
def test_dense_spectrum_is_numpys_svd(case):
    ns, ni, shape, seed = case
    delta = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    got = np.asarray(dense_spectrum(jnp.asarray(delta), stack_ndim=ns, in_ndim=ni))
    ref = np_svdvals(delta, ns, ni)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.max(initial=0.0)))


def test_randomized_svd_recovers_the_top_of_a_decaying_spectrum():
    rng = np.random.default_rng(0)
    m = np.stack([with_spectrum(rng, 40, 30, d ** np.arange(24)) for d in (0.8, 0.7)])
    k = 5
    key = jax.random.key(1, impl="rbg")  # any PRNG key; this one compiles fastest on CPU
    u, s, vt = map(np.asarray, randomized_svd(jnp.asarray(m), k, key=key))
    assert u.shape == (2, 40, k) and s.shape == (2, k) and vt.shape == (2, k, 30)
    u_ref, s_ref, vt_ref = np.linalg.svd(m.astype(np.float64))
    np.testing.assert_allclose(s, s_ref[:, :k], rtol=1e-4)
    # the same singular vectors, up to sign
    np.testing.assert_allclose(np.abs(np.sum(u * u_ref[..., :k], 1)), 1, atol=1e-3)
    np.testing.assert_allclose(np.abs(np.sum(vt * vt_ref[:, :k], 2)), 1, atol=1e-3)
    # the best rank-k error, as the exact truncated SVD has it: s_{k+1}
    for i in range(2):
        err = np.linalg.norm(m[i] - (u[i] * s[i]) @ vt[i], 2)
        assert err <= 1.01 * s_ref[i, k]
    # without power iteration: cruder, and the Ritz values never exceed the true ones
    crude = np.asarray(randomized_svd(jnp.asarray(m), k, key=key, power_iters=0)[1])
    assert np.all(crude <= s_ref[:, :k] * (1 + 1e-5))
    assert np.abs(crude - s_ref[:, :k]).max() > 10 * np.abs(s - s_ref[:, :k]).max()
    # dense_spectrum(k=...) is this, per layer of a stack
    top = dense_spectrum(jnp.asarray(m), stack_ndim=1, k=k, key=key)
    np.testing.assert_array_equal(np.asarray(top), s)


def test_dense_spectrum_refuses_what_it_cannot_do():
    layers = jnp.ones((3, 4, 2))
    with pytest.raises(LoraxValueError, match="needs key"):
        dense_spectrum(layers, stack_ndim=1, k=2)
    with pytest.raises(LoraxValueError, match="k must be at most"):
        dense_spectrum(layers, stack_ndim=1, k=3, key=jax.random.key(0))
    with pytest.raises(LoraxValueError, match="stack_ndim"):
        dense_spectrum(layers, stack_ndim=1, in_ndim=2)
    with pytest.raises(LoraxTypeError, match="key"):
        randomized_svd(layers, 2, key=3)  # pyright: ignore[reportArgumentType]
    with pytest.raises(LoraxTypeError, match="delta must be a real"):
        dense_spectrum(jnp.ones((3, 4), bool))


# ------------------------------------------------------------------ energy, effective rank


spectra = st.tuples(
    st.lists(st.integers(1, 3), min_size=0, max_size=2),  # batch shape
    st.integers(1, 6),  # values per row
    st.integers(0, 2**16),
)


@FEW
@given(spectra, st.integers(0, 8))
def test_energy_is_the_top_k_share_of_the_squared_values(case, k):
    batch, n, seed = case
    s = np.abs(np.random.default_rng(seed).standard_normal(tuple(batch) + (n,)))
    got = np.asarray(energy(jnp.asarray(s, jnp.float32), k))
    top = -np.sort(-s, axis=-1)[..., :k]  # energy sorts: the input order does not matter
    ref = np.sum(top**2, -1) / np.sum(s**2, -1)
    assert got.shape == tuple(batch)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@FEW
@given(spectra)
def test_effective_rank_is_exp_of_the_entropy(case):
    batch, n, seed = case
    rng = np.random.default_rng(seed)
    s = np.abs(rng.standard_normal(tuple(batch) + (n,))) * (rng.random(n) < 0.7)  # some zeros
    s[..., 0] += 0.1
    p = s / s.sum(-1, keepdims=True)
    ref = np.exp(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1))
    got = np.asarray(effective_rank(jnp.asarray(s, jnp.float32)))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert np.all(got >= 1 - 1e-5) and np.all(got <= np.count_nonzero(s, -1) + 1e-4)


def test_spectrum_summaries_at_the_edges():
    flat = jnp.array([[2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(effective_rank(flat)), [3.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(energy(flat, 2)), [2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(energy(flat, 0)), [0.0, 1.0])
    with pytest.raises(LoraxValueError, match="k must be an int >= 0"):
        energy(flat, -1)
    with pytest.raises(LoraxValueError, match="s must have at least one axis"):
        effective_rank(jnp.float32(1.0))


# ------------------------------------------------------------------- subspace similarity


def separated(rng, d, r):
    """A (d, r) factor with well separated singular values (stable top-i subspaces)."""
    return with_spectrum(rng, d, r, 2.0 ** -np.arange(r))


@FEW
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16), st.data())
def test_subspace_similarity_is_the_papers_phi(r1, r2, seed, data):
    rng = np.random.default_rng(seed)
    d = 8
    a1 = separated(rng, d, r1)
    # a2 shares part of a1's span, so phi takes values inside (0, 1)
    a2 = separated(rng, d, r2) + np.pad(a1, [(0, 0), (0, max(0, r2 - r1))])[:, :r2]
    i = data.draw(st.integers(1, r1))
    j = data.draw(st.integers(1, r2))
    got = float(subspace_similarity(jnp.asarray(a1), jnp.asarray(a2), i, j))
    gaps = np.diff(-np.linalg.svd(a2.astype(np.float64), compute_uv=False))
    if r2 > 1 and np.min(gaps) < 1e-2:
        return  # a2's top-j subspace is ill defined: nothing to compare against
    np.testing.assert_allclose(got, np_phi(a1, a2, i, j), atol=2e-4)
    assert -1e-6 <= got <= 1 + 1e-5


def test_subspace_similarity_identity_span_and_orthogonality():
    rng = np.random.default_rng(3)
    a = separated(rng, 10, 4)
    mix = rng.standard_normal((4, 4)).astype(np.float32)
    same_span = a @ mix  # other singular vectors, the same 4-dim span
    np.testing.assert_allclose(float(subspace_similarity(a, a, 2, 2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(subspace_similarity(a, same_span, 4, 4)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diagonal(np.asarray(similarity_grid(a, a))), 1.0, atol=1e-5)
    # symmetric in the pair; the grid holds every (i, j)
    b = separated(rng, 10, 4) + np.pad(a[:, :2], [(0, 0), (0, 2)])
    grid = np.asarray(similarity_grid(a, b))
    assert grid.shape == (4, 4)
    for i in range(1, 5):
        for j in range(1, 5):
            phi = float(subspace_similarity(a, b, i, j))
            np.testing.assert_allclose(grid[i - 1, j - 1], phi, atol=1e-5)
            np.testing.assert_allclose(float(subspace_similarity(b, a, j, i)), phi, atol=1e-5)
            np.testing.assert_allclose(phi, np_phi(a, b, i, j), atol=2e-4)
    low = np.zeros((10, 4), np.float32)  # spans coordinates 0-3, high spans 4-7
    low[:4] = rng.standard_normal((4, 4))
    high = np.zeros((10, 4), np.float32)
    high[4:8] = rng.standard_normal((4, 4))
    np.testing.assert_allclose(np.asarray(similarity_grid(low, high)), 0.0, atol=1e-6)
    with pytest.raises(LoraxValueError, match="i must be at most 4"):
        subspace_similarity(a, a, 5, 1)
    with pytest.raises(LoraxValueError, match="same input space"):
        subspace_similarity(a, a[:6], 1, 1)


def test_subspace_similarity_of_stacked_leaves_is_per_layer():
    rng = np.random.default_rng(6)  # singular gaps >= 15% of the largest: stable subspaces
    case = dict(stack=(3,), ins=(4, 2), outs=(5,), rank=3, scale=1.0, dtype=jnp.float32)
    l1, l2 = make_leaf(case, rng), make_leaf(case | dict(rank=2), rng)
    got = subspace_similarity(l1, l2, 2, 2)
    grid = similarity_grid(l1, l2)
    assert got.shape == (3,) and grid.shape == (3, 3, 2)
    for layer in range(3):
        a1, a2 = np.asarray(l1.a[layer]).reshape(8, 3), np.asarray(l2.a[layer]).reshape(8, 2)
        ref = [[np_phi(a1, a2, i, j) for j in (1, 2)] for i in (1, 2, 3)]
        np.testing.assert_allclose(np.asarray(grid[layer]), ref, atol=1e-4)
        np.testing.assert_allclose(float(got[layer]), ref[1][1], atol=1e-4)


# ------------------------------------------------------------------------- amplification


def test_amplification_is_the_papers_factor():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((9, 7)).astype(np.float32)
    delta = with_spectrum(rng, 9, 7, np.array([3.0, 1.0, 0.3, 0.05]))
    for r in (1, 2, 4):
        got = float(amplification(jnp.asarray(delta), jnp.asarray(w), r=r))
        np.testing.assert_allclose(got, np_amplification(delta, w, r), rtol=1e-4)
    # r=None: the numerical rank of the update (4 here)
    np.testing.assert_allclose(
        float(amplification(delta, w)), np_amplification(delta, w, 4), rtol=1e-4
    )
    assert float(amplification(np.zeros_like(w), w)) == 0.0
    with pytest.raises(LoraxValueError, match="w must have the update's shape"):
        amplification(delta, w[:, :3])


def test_amplification_of_a_lora_leaf_equals_that_of_its_dense_update():
    rng = np.random.default_rng(6)
    case = dict(stack=(2,), ins=(6,), outs=(3, 2), rank=3, scale=0.5, dtype=jnp.float32)
    leaf = make_leaf(case, rng)
    got = np.asarray(amplification(leaf, leaf.base))
    delta = np_lora_delta(leaf.a, leaf.b, 0.5, 1)
    w = np_matrices(leaf.base, 1, 1)
    ref = [np_amplification(delta[i], w[i], 3) for i in range(2)]
    assert got.shape == (2,)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(amplification(leaf, leaf.base, r=1)),
        [np_amplification(delta[i], w[i], 1) for i in range(2)],
        rtol=1e-4,
    )
    with pytest.raises(LoraxValueError, match="in_ndim=2 does not match"):
        amplification(leaf, leaf.base, in_ndim=2)


# ------------------------------------------------------------------------- update_report


def plain(x):
    """Only Python floats, ints, strs and lists of them (JSON-ready)."""
    if isinstance(x, list):
        return all(plain(v) for v in x)
    return type(x) in (float, int, str)


def test_update_report_on_a_wrapped_tree():
    rng = np.random.default_rng(7)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    quantize = jax.jit(lambda w: lorax.quantize({"w": w}, "nf4")["w"])
    tree = {
        "attn": {
            "query": {
                "kernel": lorax.LoraWeight(
                    quantize(normal(8, 64)), normal(8, 4), normal(4, 64), scale=2.0
                )
            }
        },
        "ScanBlock": {
            "dense": {
                "kernel": lorax.LoraWeight(
                    normal(2, 5, 4), normal(2, 5, 3), normal(2, 3, 4), scale=0.5
                ),
                "bias": normal(2, 4),
            },
        },
    }
    report = update_report(tree, k=(1, 2, 8))
    assert sorted(report) == ["ScanBlock/dense/kernel", "attn/query/kernel"]
    for path, entry in report.items():
        assert all(plain(v) for v in entry.values()), path
        assert set(entry) == {
            "spectrum",
            "energy@1",
            "energy@2",
            "energy@8",
            "effective_rank",
            "amplification",
            "norm",
        }

    q = tree["attn"]["query"]["kernel"]  # QLoRA: the NF4 base is dequantized
    delta = np_lora_delta(q.a, q.b, q.scale, 0)
    s = np.linalg.svd(delta, compute_uv=False)[:4]
    entry = report["attn/query/kernel"]
    np.testing.assert_allclose(entry["spectrum"], s, rtol=1e-4)
    np.testing.assert_allclose(entry["energy@1"], s[0] ** 2 / np.sum(s**2), rtol=1e-4)
    np.testing.assert_allclose(entry["energy@8"], 1.0)
    np.testing.assert_allclose(entry["norm"], np.linalg.norm(delta), rtol=1e-4)
    w = np.asarray(jax.jit(lambda x: x.materialize())(q.base), np.float64)
    np.testing.assert_allclose(entry["amplification"], np_amplification(delta, w, 4), rtol=1e-4)

    stacked = tree["ScanBlock"]["dense"]["kernel"]  # nn.scan layers: one value per layer
    entry = report["ScanBlock/dense/kernel"]
    assert np.shape(entry["spectrum"]) == (2, 3) and len(entry["effective_rank"]) == 2
    delta = np_lora_delta(stacked.a, stacked.b, stacked.scale, 1)
    s = np.linalg.svd(delta, compute_uv=False)[:, :3]
    np.testing.assert_allclose(entry["spectrum"], s, rtol=1e-4)
    w = np_matrices(stacked.base, 1, 1)
    ref = [np_amplification(delta[i], w[i], 3) for i in range(2)]
    np.testing.assert_allclose(entry["amplification"], ref, rtol=1e-4)


def test_update_report_on_a_dense_pair():
    rng = np.random.default_rng(8)
    base = {
        "a": {
            "kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
            "bias": jnp.zeros(5),
        },
        "b": {
            "kernel": jnp.asarray(rng.standard_normal((3, 4, 2)), jnp.float32),
            "bias": jnp.zeros((4, 2)),
        },
        "same": {"kernel": jnp.ones((4, 4))},
        "step": jnp.zeros((), jnp.int32),
    }
    d_a = with_spectrum(rng, 6, 5, np.array([2.0, 0.5]))
    d_b = rng.standard_normal((3, 4, 2)).astype(np.float32)
    tuned = jax.tree.map(lambda x: x, base)
    tuned["a"] = {"kernel": base["a"]["kernel"] + d_a, "bias": jnp.ones(5)}
    tuned["b"] = {"kernel": base["b"]["kernel"] + d_b, "bias": base["b"]["bias"]}
    report = update_report(tuned, base, k=(1,))
    assert sorted(report) == ["a/kernel", "b/kernel"]  # no bias, no unchanged weight
    entry = report["a/kernel"]
    assert all(plain(v) for v in entry.values())
    delta = np.asarray(tuned["a"]["kernel"], np.float64) - np.asarray(base["a"]["kernel"])
    s = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(entry["spectrum"], s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(entry["energy@1"], s[0] ** 2 / np.sum(s**2), rtol=1e-4)
    ref = np_amplification(delta, base["a"]["kernel"], 2)
    np.testing.assert_allclose(entry["amplification"], ref, rtol=1e-3)
    # (3, 4, 2) with a (4, 2) bias: one input axis of 3, as lorax.wrap splits it
    b_delta = np.asarray(tuned["b"]["kernel"], np.float64) - np.asarray(base["b"]["kernel"])
    np.testing.assert_allclose(
        report["b/kernel"]["spectrum"], np_svdvals(b_delta, 0, 1), rtol=1e-4, atol=1e-5
    )
    # amplification at a fixed r
    fixed = update_report(tuned, base, k=(1,), r=1)["a/kernel"]["amplification"]
    np.testing.assert_allclose(fixed, np_amplification(delta, base["a"]["kernel"], 1), rtol=1e-3)


def test_update_report_names_the_path_it_cannot_pair():
    base = {"a": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(LoraxValueError, match="'b/kernel'"):
        update_report({**base, "b": {"kernel": jnp.ones((4, 3))}}, base)
    with pytest.raises(LoraxValueError, match="'a/kernel' is \\(4, 2\\) in tuned"):
        update_report({"a": {"kernel": jnp.ones((4, 2))}}, base)
    with pytest.raises(LoraxTypeError, match="k must be a sequence"):
        update_report(base, base, k=4)  # pyright: ignore[reportArgumentType]
    assert update_report(base, base) == {}
