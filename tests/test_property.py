"""Hypothesis: random einsum patterns, shapes, ranks and operand orders, float64 numpy ref."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.methods.lora import LoraWeight

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)


@st.composite
def einsum_cases(draw):
    w_nd = draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=w_nd, max_size=w_nd))
    w_labels = "abcd"[:w_nd]
    roles = draw(
        st.lists(st.sampled_from(["contract", "batch", "free"]), min_size=w_nd, max_size=w_nd)
    )
    x_free = "xyz"[: draw(st.integers(0, 2))]
    x_sizes = draw(st.lists(st.integers(1, 4), min_size=len(x_free), max_size=len(x_free)))
    x_axes = [l for l, r in zip(w_labels, roles) if r != "free"] + list(x_free)
    x_axes = draw(st.permutations(x_axes))
    batch = [l for l, r in zip(w_labels, roles) if r == "batch"]
    out = batch + [l for l in x_free] + [l for l, r in zip(w_labels, roles) if r == "free"]
    out = draw(st.permutations(out))
    stack = draw(st.integers(0, w_nd - 2))
    in_axes = draw(st.integers(1, w_nd - stack - 1))
    fan_in = int(np.prod(sizes[stack : stack + in_axes]))
    fan_out = int(np.prod(sizes[stack + in_axes :]))
    rank = draw(st.integers(1, max(1, min(fan_in, fan_out))))
    w_first = draw(st.booleans())
    dims = dict(zip(w_labels, sizes)) | dict(zip(x_free, x_sizes))
    return dict(
        w_spec=w_labels,
        x_spec="".join(x_axes),
        out="".join(out),
        dims=dims,
        stack=stack,
        in_axes=in_axes,
        rank=rank,
        w_first=w_first,
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None)
@given(einsum_cases())
def test_einsum_equals_merged_and_float64_reference(case):
    d = case["dims"]
    rng = np.random.default_rng(case["seed"])
    w_shape = tuple(d[l] for l in case["w_spec"])
    x_shape = tuple(d[l] for l in case["x_spec"])
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    leaf = lorax.wrap(
        {"w": jnp.asarray(w)},
        rank=case["rank"],
        alpha=2.0 * case["rank"],
        targets=lambda p, _: lorax.LoraSpec(in_axes=case["in_axes"], stack_axes=case["stack"]),
        key=jax.random.key(case["seed"]),
    )["w"]
    b = rng.standard_normal(leaf.b.shape).astype(np.float32)
    leaf = LoraWeight(leaf.base, leaf.a, jnp.asarray(b), leaf.scale)

    if case["w_first"]:
        spec = f"{case['w_spec']},{case['x_spec']}->{case['out']}"
        f = lambda w, x: jnp.einsum(spec, w, x)  # noqa: E731
    else:
        spec = f"{case['x_spec']},{case['w_spec']}->{case['out']}"
        f = lambda w, x: jnp.einsum(spec, x, w)  # noqa: E731
    got = jax.jit(lorax.lora(f, strict=True))(leaf, x)

    # Independent reference: dense W + scale * A B in float64 numpy.
    ns, ni = case["stack"], case["in_axes"]
    a64, b64 = np.asarray(leaf.a, np.float64), np.asarray(b, np.float64)
    wl = "abcd"[: len(w_shape)]
    delta = np.einsum(f"{wl[: ns + ni]}r,{wl[:ns]}r{wl[ns + ni :]}->{wl}", a64, b64)
    w64 = w.astype(np.float64) + leaf.scale * delta
    ops = (w64, x.astype(np.float64)) if case["w_first"] else (x.astype(np.float64), w64)
    want = np.einsum(spec, *ops)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4)
