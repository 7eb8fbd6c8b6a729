"""Bad and extreme inputs to quantization (issue 12): non-finite weights, huge finite
weights, bad arguments, malformed bitsandbytes tensors, and SVD inits on inf."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.quant import nf4_from_bnb, nf4_to_bnb, quantize_int8, quantize_nf4

STATE = "fc.weight.quant_state.bitsandbytes__nf4"
DROP = object()


def _w(seed=0, shape=(64, 32)):
    """randn with absmax exactly 1 (so w * 2**k stays below float32's max for k <= 127)."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return w / np.abs(w).max()


def _with(w, index, value):
    w = np.array(w)
    w[index] = value
    return w


def _rel_err(deq, w):
    """Largest dequantization error relative to the weight's absmax (inf if not finite)."""
    deq, w = np.asarray(deq, np.float64), np.asarray(w, np.float64)
    if not np.all(np.isfinite(deq)):
        return np.inf
    return float(np.abs(deq - w).max() / np.abs(w).max())


# ---- 1. non-finite weights raise, naming the path ------------------------------------------


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("method, dq", [("nf4", True), ("nf4", False), ("int8", True)])
def test_quantize_non_finite_weight_names_path(bad, method, dq):
    params = {
        "dense": {"kernel": jnp.asarray(_with(_w(), (3, 5), bad)), "bias": jnp.zeros(32)},
        "out": {"kernel": jnp.asarray(_w(1, (32, 8)))},
    }
    with pytest.raises(lorax.NonFiniteError, match=r"'dense/kernel'.*1 inf/NaN.*finite") as err:
        lorax.quantize(params, method, double_quant=dq)
    assert isinstance(err.value, lorax.LoraxError) and isinstance(err.value, ValueError)


def test_quantize_non_finite_bf16_weight_in_stack():
    w = jnp.asarray(_with(_w(0, (3, 64, 32)), (2, 0, 0), np.inf), jnp.bfloat16)
    with pytest.raises(lorax.NonFiniteError, match=r"'layers/kernel'"):
        lorax.quantize({"layers": {"kernel": w}}, "nf4", stacked=1)


@pytest.mark.parametrize("fn", [quantize_nf4, quantize_int8])
def test_quantizers_refuse_concrete_non_finite(fn):
    with pytest.raises(lorax.NonFiniteError, match=rf"{fn.__name__}: w.*inf/NaN"):
        fn(jnp.asarray(_with(_w(), (0, 0), np.nan)))


def test_quantize_nf4_under_tracing_is_not_checked():
    """Under jit / lax.map (benchmarks/qlora_65b.py) the values are unknown: no error."""
    w = jnp.asarray(_w())
    leaf = jax.jit(quantize_nf4)(w)
    np.testing.assert_array_equal(leaf.codes, quantize_nf4(w).codes)
    keys = jax.random.split(jax.random.key(0), 2)
    stacked = jax.lax.map(lambda k: quantize_nf4(jax.random.normal(k, (64, 32))), keys)
    assert stacked.codes.shape == (2, 1024)
    jax.jit(quantize_nf4)(jnp.asarray(_with(_w(), (0, 0), np.inf)))  # no Python-level check


# ---- 1b. huge finite weights dequantize to finite values ----------------------------------


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(100, 127),
    dq=st.booleans(),
    compute=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_nf4_is_scale_equivariant_up_to_float32_max(seed, k, dq, compute):
    """Scaling by 2**k is exact, so the codes must not change and the dequantized weight
    must scale exactly; before the fix, 1/absmax >= 2**126 flushed to zero (codes all 0.0)
    and the double-quant mean overflowed to inf (every value NaN)."""
    w = _w(seed)
    small = quantize_nf4(jnp.asarray(w), double_quant=dq, compute_dtype=compute)
    big = quantize_nf4(jnp.asarray(w * np.float32(2.0**k)), double_quant=dq, compute_dtype=compute)
    np.testing.assert_array_equal(big.codes, small.codes)
    scales = np.asarray(big.absmax, np.float64)
    np.testing.assert_array_equal(scales if dq else scales / 2.0**k, small.absmax)
    np.testing.assert_array_equal(
        np.asarray(big.materialize(), np.float64),
        np.asarray(small.materialize(), np.float64) * 2.0**k,
    )


@pytest.mark.parametrize("top", [1e38, 3e38, 3.38e38, float(np.finfo(np.float32).max)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("compute", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("method, dq", [("nf4", True), ("nf4", False), ("int8", True)])
def test_huge_finite_weights_dequantize_finite_and_close(top, dtype, compute, method, dq):
    w = jnp.asarray(_w(3) * np.float32(top), dtype)
    if not np.all(np.isfinite(np.asarray(w, np.float32))):
        pytest.skip("not finite in this dtype")
    ref = jnp.asarray(_w(3), dtype)
    leaf = lorax.quantize({"k": w}, method, double_quant=dq, compute_dtype=compute)["k"]
    small = lorax.quantize({"k": ref}, method, double_quant=dq, compute_dtype=compute)["k"]
    deq = leaf.materialize()
    assert deq.dtype == compute and np.all(np.isfinite(np.asarray(deq, np.float32)))
    # As accurate, relative to absmax, as the same weight at unit scale (+ bf16 rounding).
    assert _rel_err(deq, w) <= _rel_err(small.materialize(), ref) + 0.01


def test_weight_above_bfloat16_max_saturates_in_bfloat16():
    """A float32 weight beyond bfloat16's range dequantizes to bf16's largest finite value,
    not to inf."""
    w = jnp.asarray(_w(4) * np.float32(np.finfo(np.float32).max))
    for method in ("nf4", "int8"):
        deq = np.asarray(lorax.quantize({"k": w}, method)["k"].materialize(), np.float32)
        assert np.all(np.isfinite(deq))
        assert np.abs(deq).max() == float(jnp.finfo(jnp.bfloat16).max)


# ---- 2. bad arguments ----------------------------------------------------------------------

BAD_DTYPES = [jnp.int8, "int32", np.uint8, "foo", None, bool, 3]


@pytest.mark.parametrize("value", BAD_DTYPES, ids=repr)
@pytest.mark.parametrize(
    "call", ["quantize_nf4", "quantize_int8", "quantize_nf4_tree", "quantize_int8_tree"]
)
def test_compute_dtype_must_be_floating(value, call):
    w = jnp.asarray(_w())
    fns = {
        "quantize_nf4": lambda: quantize_nf4(w, compute_dtype=value),
        "quantize_int8": lambda: quantize_int8(w, compute_dtype=value),
        "quantize_nf4_tree": lambda: lorax.quantize({"k": w}, "nf4", compute_dtype=value),
        "quantize_int8_tree": lambda: lorax.quantize({"k": w}, "int8", compute_dtype=value),
    }
    with pytest.raises(
        lorax.LoraxError, match=r"compute_dtype must be a floating dtype.*" + re.escape(repr(value))
    ):
        fns[call]()


@pytest.mark.parametrize("value", ["float32", jnp.float16, np.dtype("float32"), "bfloat16"])
def test_floating_compute_dtypes_still_work(value):
    w = jnp.asarray(_w())
    for method in ("nf4", "int8"):
        leaf = lorax.quantize({"k": w}, method, compute_dtype=value)["k"]
        assert leaf.materialize().dtype == jnp.dtype(value)


@pytest.mark.parametrize(
    "kwargs, cls, pattern",
    [
        (dict(method=3), lorax.LoraxError, "method must be 'nf4' or 'int8'; got 3"),
        (dict(method=["nf4"]), lorax.LoraxError, r"method must be .*\['nf4'\]"),
        (dict(double_quant="yes"), TypeError, "double_quant must be a bool; got str 'yes'"),
        (dict(double_quant=None), TypeError, "double_quant must be a bool"),
        (dict(block_size=64.0), TypeError, "block_size must be an int.*64.0"),
        (dict(block_size=True), TypeError, "block_size must be an int"),
        (dict(block_size=48), ValueError, "block_size must be a power of two.*48"),
        (dict(block_size=8192), ValueError, "block_size must be a power of two.*8192"),
    ],
)
def test_quantize_argument_errors(kwargs, cls, pattern):
    with pytest.raises(lorax.LoraxError, match=pattern) as err:
        lorax.quantize({"k": jnp.asarray(_w())}, **kwargs)
    assert isinstance(err.value, cls)


def test_quantize_nf4_argument_errors():
    w = jnp.asarray(_w())
    with pytest.raises(lorax.LoraxError, match="quantize_nf4: double_quant must be a bool"):
        quantize_nf4(w, double_quant=1)
    with pytest.raises(lorax.LoraxError, match="quantize_nf4: block_size must be an int"):
        quantize_nf4(w, block_size="64")
    with pytest.raises(lorax.LoraxError, match=r"quantize_nf4: stack must be in \[0, 1\]"):
        quantize_nf4(w, stack=2)
    with pytest.raises(lorax.LoraxError, match=r"quantize_int8: in_axes must be in \[1, 1\]"):
        quantize_int8(w, in_axes=2)


# ---- 3. bitsandbytes tensors validated at load ----------------------------------------------


def _bnb(dq=True, replace=None, **state_changes):
    """nf4_to_bnb tensors of a 64x32 kernel ([out, in] = [32, 64]: 2048 values, 32 blocks,
    1 nested block), with tensors replaced and quant-state fields changed (DROP removes)."""
    leaf = quantize_nf4(jnp.asarray(_w()), double_quant=dq)
    tensors = dict(nf4_to_bnb(leaf, "fc"))
    state = json.loads(bytes(tensors[STATE]).decode())
    for key, value in state_changes.items():
        if value is DROP:
            state.pop(key)
        else:
            state[key] = value
    tensors[STATE] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    tensors.update({f"fc.{k}": v for k, v in (replace or {}).items()})
    return leaf, tensors


@pytest.mark.parametrize("dq", [True, False])
def test_bnb_expected_shape_accepts_the_right_shape(dq):
    leaf, tensors = _bnb(dq)
    back = nf4_from_bnb(tensors, "fc", expected_shape=(64, 32))
    assert back.layer_shape == (64, 32)
    np.testing.assert_array_equal(
        np.asarray(back.materialize(), np.float32), np.asarray(leaf.materialize(), np.float32)
    )


@pytest.mark.parametrize("dq", [True, False])
def test_bnb_swapped_shape_is_refused_against_expected_shape(dq):
    """A swapped [in, out] state has the same code and scale counts: only the caller's
    shape can tell, and a permuted matrix must never load silently."""
    _, tensors = _bnb(dq, shape=[64, 32])
    with pytest.raises(
        lorax.LoraxError,
        match=re.escape(f"'{STATE}': shape [out, in] = [64, 32]")
        + r".*expected_shape is \(64, 32\) \(swapped",
    ):
        nf4_from_bnb(tensors, "fc", expected_shape=(64, 32))
    _, tensors = _bnb(dq)
    with pytest.raises(lorax.LoraxError, match=r"expected_shape is \(64, 16\)$"):
        nf4_from_bnb(tensors, "fc", expected_shape=(64, 16))
    with pytest.raises(lorax.LoraxError, match="expected_shape must be the Flax kernel shape"):
        nf4_from_bnb(tensors, "fc", expected_shape=(2048,))


NESTED_CASES = {
    "empty_nested_absmax": (
        dict(replace={"weight.nested_absmax": np.zeros(0, np.float32)}),
        r"'fc.weight.nested_absmax' must hold ceil\(32 blocks / 256\) = 1 "
        r"float scales; got 0",
    ),
    "long_nested_absmax": (
        dict(replace={"weight.nested_absmax": np.ones(2, np.float32)}),
        r"'fc.weight.nested_absmax'.*= 1 float scales; got 2",
    ),
    "int_nested_absmax": (
        dict(replace={"weight.nested_absmax": np.ones(1, np.int32)}),
        r"'fc.weight.nested_absmax'.*dtype int32",
    ),
    "inf_nested_absmax": (
        dict(replace={"weight.nested_absmax": np.full(1, np.inf, np.float32)}),
        r"'fc.weight.nested_absmax' holds inf/NaN",
    ),
    "missing_offset": (
        dict(nested_offset=DROP),
        rf"'{STATE}': nested_offset must be a finite "
        "number; got None",
    ),
    "nan_offset": (dict(nested_offset=float("nan")), r"nested_offset .*got nan"),
    "inf_offset": (dict(nested_offset=float("inf")), r"nested_offset .*got inf"),
    "str_offset": (dict(nested_offset="0.5"), r"nested_offset .*got '0.5'"),
    "float_absmax": (
        dict(replace={"weight.absmax": np.ones(32, np.float32)}),
        r"'fc.weight.absmax' must hold uint8 codes.*dtype float32",
    ),
    "nested_blocksize": (
        dict(nested_blocksize=128),
        rf"'{STATE}': nested_blocksize must be 256; "
        "got 128",
    ),
}


@pytest.mark.parametrize("case", list(NESTED_CASES))
def test_bnb_double_quant_tensors_are_validated(case):
    kwargs, pattern = NESTED_CASES[case]
    _, tensors = _bnb(True, **kwargs)
    with pytest.raises(lorax.LoraxError, match=pattern) as err:
        nf4_from_bnb(tensors, "fc")
    assert isinstance(err.value, ValueError)


def test_bnb_missing_nested_absmax_is_a_key_error():
    _, tensors = _bnb(True)
    del tensors["fc.weight.nested_absmax"]
    with pytest.raises(lorax.LoraxError, match="'fc.weight.nested_absmax' is missing") as err:
        nf4_from_bnb(tensors, "fc")
    assert isinstance(err.value, KeyError)


PLAIN_CASES = {
    "uint8_absmax": (
        dict(replace={"weight.absmax": np.ones(32, np.uint8)}),
        r"'fc.weight.absmax' must hold float scales.*no nested_blocksize.*uint8",
    ),
    "nan_absmax": (
        dict(replace={"weight.absmax": np.full(32, np.nan, np.float32)}),
        r"'fc.weight.absmax' holds inf/NaN",
    ),
    "short_absmax": (
        dict(replace={"weight.absmax": np.ones(31, np.float32)}),
        r"'fc.weight.absmax' 31 scales; they do not fit shape \[32, 64\]",
    ),
    "weight_layout": (
        dict(replace={"weight": np.zeros((512, 2), np.uint8)}),
        r"'fc.weight' must have shape \[\(n \+ 1\) // 2, 1\] = \[1024, 1\].*"
        r"got \[512, 2\]",
    ),
    "weight_dtype": (
        dict(replace={"weight": np.zeros((1024, 1), np.float32)}),
        r"'fc.weight' must hold uint8 packed codes; got dtype float32",
    ),
    "shape_3d": (
        dict(shape=[32, 64, 1]),
        rf"'{STATE}': shape must be \[out, in\].*"
        r"\[32, 64, 1\]",
    ),
    "shape_str": (dict(shape=["32", "64"]), r"shape must be \[out, in\], two positive ints"),
    "shape_missing": (dict(shape=DROP), r"shape must be \[out, in\].*got None"),
    "blocksize_missing": (dict(blocksize=DROP), rf"'{STATE}': blocksize must be a positive int"),
    "blocksize_zero": (dict(blocksize=0), r"blocksize must be a positive int; got 0"),
    "bad_dtype": (dict(dtype="foo"), rf"'{STATE}': dtype must name a floating dtype; got 'foo'"),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_bnb_tensors_and_state_are_validated(case):
    kwargs, pattern = PLAIN_CASES[case]
    _, tensors = _bnb(False, **kwargs)
    with pytest.raises(lorax.LoraxError, match=pattern):
        nf4_from_bnb(tensors, "fc")


def test_bnb_state_must_be_an_object_and_compute_dtype_floating():
    _, tensors = _bnb(False)
    with pytest.raises(lorax.LoraxError, match="compute_dtype must be a floating dtype.*int8"):
        nf4_from_bnb(tensors, "fc", compute_dtype="int8")
    tensors[STATE] = np.frombuffer(b"[1, 2]", np.uint8)
    with pytest.raises(lorax.LoraxError, match=rf"'{STATE}' is not a JSON quant state.*list"):
        nf4_from_bnb(tensors, "fc")


def test_bnb_flat_or_int8_weight_still_loads():
    leaf, tensors = _bnb(True)
    flat = dict(tensors, **{"fc.weight": tensors["fc.weight"].reshape(-1).view(np.int8)})
    back = nf4_from_bnb(flat, "fc", expected_shape=(64, 32))
    np.testing.assert_array_equal(back.codes, leaf.codes)


# ---- 4. SVD / QR inits refuse non-finite weights -------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_wrap_weight_init_refuses_non_finite(init, bad):
    params = {"dense": {"kernel": jnp.asarray(_with(_w(), (7, 1), bad))}}
    with pytest.raises(
        lorax.NonFiniteError,
        match=rf"init='{init}' for 'dense/kernel'.*"
        r"\(64, 32\) holds 1 inf/NaN",
    ):
        lorax.wrap(params, rank=2, init=init)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq", "kaiming"])
def test_wrap_weight_init_on_finite_weight_still_works(init):
    w = jnp.asarray(_w())
    leaf = lorax.wrap({"dense": {"kernel": w}}, rank=2, init=init)["dense"]["kernel"]
    merged = np.asarray(leaf.materialize(), np.float32)
    assert np.all(np.isfinite(merged))
    tol = 0.11 if init == "loftq" else 1e-5  # loftq: an NF4 base plus factors
    assert _rel_err(merged, w) <= tol
