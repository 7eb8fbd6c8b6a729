"""Hostile input to the public API gets a lorax error naming the argument or the path
(issue 12): wrap, split / combine / merge, unfreeze, ia3, adapters, stack, add_weighted,
lora and register_rule."""

import dataclasses
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.errors import LoraxTiedWeightWarning

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

PARAMS = {
    "dense": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
    "proj": {"kernel": jnp.ones((6, 4))},
}
PATHS = ["dense/kernel", "proj/kernel"]
X = jnp.ones((2, 8))


def _f(p, x):
    return x @ p["dense"]["kernel"]


def _raises(match, cls=lorax.LoraxError):
    return pytest.raises(cls, match=match)


# ----- 1. alpha, rank and the patterns --------------------------------------------------


@pytest.mark.parametrize("alpha", [0, 0.0, math.nan, math.inf, -math.inf])
def test_alpha_must_be_finite_and_nonzero(alpha):
    with _raises(r"lorax\.wrap: alpha must be finite and non-zero", lorax.LoraxError):
        lorax.wrap(PARAMS, rank=2, alpha=alpha)


@pytest.mark.parametrize("alpha", ["8", [8], True, 1j, jnp.ones(3)])
def test_alpha_of_a_wrong_type(alpha):
    with _raises(r"lorax\.wrap: alpha must be a real number", TypeError):
        lorax.wrap(PARAMS, rank=2, alpha=alpha)


def test_alpha_of_numpy_and_0d_array_types_is_accepted():
    for alpha in (np.float32(4), np.int64(4), jnp.float32(4), 4):
        assert lorax.wrap(PARAMS, rank=2, alpha=alpha)["dense"]["kernel"].scale == 2.0


@pytest.mark.parametrize("rank", [np.int64(2), np.int32(2), np.uint8(2)])
def test_numpy_integer_ranks_are_accepted(rank):
    lp = lorax.wrap(PARAMS, rank=rank, rank_pattern={"proj": np.int16(3)})
    assert lp["dense"]["kernel"].rank == 2 and lp["proj"]["kernel"].rank == 3
    assert type(lp["dense"]["kernel"].scale) is float


@pytest.mark.parametrize("rank", [True, np.bool_(True), "2", None])
def test_bool_and_non_number_ranks_are_refused(rank):
    with _raises(r"rank for 'dense/kernel' must be a positive int", TypeError):
        lorax.wrap(PARAMS, rank=rank)


@pytest.mark.parametrize("which", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_nothing_is_refused(which):
    with pytest.raises(lorax.LoraxError) as err:
        lorax.wrap(PARAMS, rank=2, **{which: {"dense": 2, "dnese": 2}})
    msg = str(err.value)
    assert f"{which} key 'dnese' matches none" in msg and "'dense/kernel'" in msg
    assert isinstance(err.value, ValueError)


def test_pattern_key_on_an_untargeted_path_is_refused():
    with _raises(r"rank_pattern key 'proj' matches none.*'dense/kernel'"):
        lorax.wrap(PARAMS, rank=2, targets=["dense"], rank_pattern={"proj": 3})


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["rank_pattern", "alpha_pattern"]),
    st.text(alphabet="denkrlpoj/.*(", min_size=1, max_size=12),
)
def test_random_pattern_keys_match_or_are_refused(which, key):
    try:
        matches = any(key in p.split("/") or re.fullmatch(key, p) for p in PATHS)
    except re.error:
        with _raises(rf"lorax\.wrap: {which} key {re.escape(repr(key))} is not a valid regex"):
            lorax.wrap(PARAMS, rank=2, **{which: {key: 3}})
        return
    if matches:
        lorax.wrap(PARAMS, rank=2, **{which: {key: 3}})
    else:
        with _raises(rf"lorax\.wrap: {which} key {re.escape(repr(key))} matches none"):
            lorax.wrap(PARAMS, rank=2, **{which: {key: 3}})


@settings(max_examples=25, deadline=None)
@given(
    st.one_of(
        st.integers(max_value=0),
        st.floats(allow_nan=True),
        st.booleans(),
        st.text(max_size=3),
        st.none(),
    )
)
def test_random_invalid_pattern_ranks_name_the_key_and_path(rank):
    with _raises(
        r"lorax\.wrap: rank_pattern\['proj'\] for 'proj/kernel' must be a positive "
        "int"
    ):
        lorax.wrap(PARAMS, rank=2, rank_pattern={"proj": rank})


@settings(max_examples=25, deadline=None)
@given(
    st.one_of(
        st.sampled_from([0, 0.0, -0.0, math.nan, math.inf, -math.inf]),
        st.booleans(),
        st.text(max_size=3),
        st.complex_numbers(),
    )
)
def test_random_invalid_pattern_alphas_name_the_key_and_path(alpha):
    with _raises(r"lorax\.wrap: alpha_pattern\['dense'\] for 'dense/kernel' must be"):
        lorax.wrap(PARAMS, rank=2, alpha_pattern={"dense": alpha})


def test_spec_values_are_checked_too():
    spec = lambda p, leaf: lorax.LoraSpec(alpha=math.nan) if p == "proj/kernel" else False  # noqa
    with _raises(r"the LoraSpec alpha for 'proj/kernel' must be finite"):
        lorax.wrap(PARAMS, targets=spec, rank=2)


@pytest.mark.parametrize(
    "patterns, match",
    [
        ([("dense", 1)], r"rank_pattern must be a dict"),
        ({3: 1}, r"rank_pattern keys must be names or regexes \(str\); got 3"),
    ],
)
def test_pattern_of_a_wrong_type(patterns, match):
    with _raises(match, TypeError):
        lorax.wrap(PARAMS, rank=2, rank_pattern=patterns)


# ----- 2. tied weights -------------------------------------------------------------------


def test_tied_weights_warn_naming_both_paths():
    w = jnp.ones((8, 6))
    with pytest.warns(LoraxTiedWeightWarning, match=r"'a/kernel' and 'b/kernel' are the same"):
        lp = lorax.wrap({"a": {"kernel": w}, "b": {"kernel": w}}, rank=2)
    assert lp["a"]["kernel"].base is lp["b"]["kernel"].base  # shared base, own adapters
    assert issubclass(LoraxTiedWeightWarning, UserWarning)


def test_equal_but_distinct_arrays_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraxTiedWeightWarning)
        lorax.wrap({"a": {"kernel": jnp.ones((8, 6))}, "b": {"kernel": jnp.ones((8, 6))}}, rank=2)


# ----- 3. bad regexes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lorax.wrap(PARAMS, targets="(dense"), r"targets '\(dense' is not a valid regex"),
        (
            lambda: lorax.wrap(PARAMS, rank=2, rank_pattern={"(": 1}),
            r"rank_pattern key '\(' is not a valid regex",
        ),
        (
            lambda: lorax.wrap(PARAMS, rank=2, alpha_pattern={"[": 1.0}),
            r"alpha_pattern key '\[' is not a valid regex",
        ),
        (lambda: lorax.wrap(PARAMS, rank=2, stacked="(x"), r"stacked '\(x' is not a valid regex"),
        (
            lambda: lorax.unfreeze(PARAMS, targets="(x"),
            r"lorax\.unfreeze: targets '\(x' is not a valid",
        ),
        (lambda: lorax.ia3(PARAMS, targets="(x"), r"targets '\(x' is not a valid regex"),
        (
            lambda: lorax.ia3(PARAMS, targets=["dense"], feedforward="(x"),
            r"lorax\.ia3: feedforward '\(x' is not a valid regex",
        ),
        (lambda: lorax.adapters(PARAMS, targets="(x"), r"targets '\(x' is not a valid regex"),
    ],
)
def test_bad_regex_names_the_argument(call, match):
    with _raises(match, ValueError):
        call()


def test_numpy_int_stacked_is_accepted():
    p = {"layers": {"kernel": jnp.ones((3, 8, 6))}}
    assert lorax.wrap(p, rank=2, stacked=np.int64(1))["layers"]["kernel"].a.shape == (3, 8, 2)


# ----- 4. PRNG keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [42, "a", jnp.ones(2), jnp.ones(3, jnp.uint32), jax.random.split(jax.random.key(0))]
)
def test_wrap_and_adapters_refuse_non_keys(key):
    with _raises(r"lorax\.wrap: key must be one PRNG key, jax\.random\.key", TypeError):
        lorax.wrap(PARAMS, rank=2, key=key)
    with _raises(r"lorax\.adapters: key must be one PRNG key", TypeError):
        lorax.adapters(PARAMS, targets=["dense"], key=key)


def test_legacy_keys_are_accepted():
    lorax.wrap(PARAMS, rank=2, key=jax.random.PRNGKey(1))
    lorax.adapters(PARAMS, targets=["dense"], key=jax.random.PRNGKey(1))


@pytest.mark.parametrize("rng", [123, "k", jnp.ones(2)])
def test_dropout_rng_must_be_a_key(rng):
    lp = lorax.wrap(PARAMS, rank=2, dropout=0.1)
    with _raises(r"lorax\.lora: dropout_rng must be one PRNG key", TypeError):
        lorax.lora(_f)(lp, X, dropout_rng=rng)
    out = jax.jit(lorax.lora(_f))(lp, X, dropout_rng=jax.random.key(0))  # a traced key is fine
    assert out.shape == (2, 6)


# ----- 5. combine checks that the halves fit -------------------------------------------


def _halves(params, **kw):
    return lorax.split(lorax.wrap(params, **kw))


def test_combine_with_another_base_names_the_path():
    t, _ = _halves({"dense": {"kernel": jnp.ones((10, 6))}}, rank=2)
    _, f = _halves({"dense": {"kernel": jnp.ones((8, 6))}}, rank=2)
    with _raises(
        r"lorax\.combine: at 'dense/kernel' the trainable a \(10, 2\) and b \(2, 6\) "
        r"and the frozen base \(8, 6\) do not fit",
        ValueError,
    ):
        lorax.combine(t, f)


def test_combine_with_factors_of_mixed_ranks():
    t2, f = _halves(PARAMS, rank=2, targets=["dense"])
    t3, _ = _halves(PARAMS, rank=3, targets=["dense"])
    leaf = dataclasses.replace(t2["dense"]["kernel"], b=t3["dense"]["kernel"].b)
    mixed = {**t2, "dense": {**t2["dense"], "kernel": leaf}}
    with _raises(r"at 'dense/kernel' the trainable a \(8, 2\) and b \(3, 6\)"):
        lorax.combine(mixed, f)


def test_combine_checks_other_leaf_kinds():
    small = {"k": {"kernel": jnp.ones((8, 4))}}
    big = {"k": {"kernel": jnp.ones((8, 6))}}
    for build in (
        lambda p: lorax.ia3(p, targets=["k"]),
        lambda p: lorax.adapters(p, targets=["k"]),
        lambda p: lorax.wrap(p, rank=2, dora=True),
    ):
        t, _ = lorax.split(build(small))
        _, f = lorax.split(build(big))
        with _raises(r"lorax\.combine: at 'k/kernel' the trainable .* do not fit"):
            lorax.combine(t, f)


def test_combine_refuses_a_missing_half_and_int_factors():
    t, f = _halves(PARAMS, rank=2)
    with _raises(r"the LoraWeight at 'dense/kernel' has no 'a', 'b'"):
        lorax.combine(None, f)
    with _raises(r"at 'dense/kernel' the trainable a is int32"):
        lorax.combine(jax.tree.map(lambda x: x.astype(jnp.int32), t), f)


def test_combine_still_works_under_jit_and_grad():
    t, f = _halves(PARAMS, rank=2)
    loss = lambda t: lorax.lora(_f)(lorax.combine(t, f), X).sum()  # noqa: E731
    g = jax.jit(jax.grad(loss))(t)
    assert g["dense"]["kernel"].a.shape == (8, 2)


# ----- 6. merge (and lora) of half a split ----------------------------------------------


def test_merge_of_either_half_says_to_combine_first():
    t, f = _halves(PARAMS, rank=2)
    with _raises(
        r"lorax\.merge: the LoraWeight at 'dense/kernel' has no 'base'.*"
        r"lorax\.combine\(trainable, frozen\) first",
        ValueError,
    ):
        lorax.merge(t)
    with _raises(r"lorax\.merge: the LoraWeight at 'dense/kernel' has no 'a', 'b'.*combine"):
        lorax.merge(f)


def test_lora_on_the_trainable_half_names_the_path():
    t, _ = _halves(PARAMS, rank=2)
    with _raises(r"lorax\.lora: the LoraWeight at 'dense/kernel' has no 'base'"):
        lorax.lora(_f)(t, X)


# ----- 7. lora and register_rule -----------------------------------------------------------


@pytest.mark.parametrize("fn", [42, None, "apply"])
def test_lora_of_a_non_callable(fn):
    with _raises(r"lorax\.lora: fn must be callable", TypeError):
        lorax.lora(fn)


def test_lora_strict_must_be_a_bool():
    with _raises(r"lorax\.lora: strict must be a bool", TypeError):
        lorax.lora(_f, strict="yes")


def test_register_rule_refuses_bad_rules_and_primitives():
    before = dict(lorax.transform._RULES)
    with _raises(r"lorax\.register_rule: rule must be callable", TypeError):
        lorax.register_rule("dot_general", 42)
    with _raises(
        r"lorax\.register_rule: primitive 'dot_generall' is not the name of a JAX "
        r"primitive.*dot_general",
        ValueError,
    ):
        lorax.register_rule("dot_generall", lambda ctx, invals: None)
    for prim in (42, None, ["cumsum"]):
        with _raises(
            r"lorax\.register_rule: primitive must be a jax\.extend\.core\.Primitive", TypeError
        ):
            lorax.register_rule(prim, lambda ctx, invals: None)
    assert before == lorax.transform._RULES  # nothing registered on the way


def test_densify_error_is_a_lorax_error():
    assert issubclass(lorax.LoraxDensifyError, lorax.LoraxError)
    assert issubclass(lorax.LoraxDensifyError, RuntimeError)
    lp = {"k": lorax.wrap({"k": jnp.ones((4, 4))}, rank=2)["k"]}
    with _raises(r"cumsum.*'k'", RuntimeError):
        lorax.lora(lambda p: jnp.cumsum(p["k"], axis=0), strict=True)(lp)


# ----- 8. the rest, probed with wrong types and values -----------------------------------

WRAP_CASES = [
    (dict(dropout="0.1"), r"dropout must be a number in \[0, 1\)", TypeError),
    (dict(dropout=None), r"dropout must be a number", TypeError),
    (dict(dropout=math.nan), r"dropout must be in \[0, 1\)", ValueError),
    (dict(rslora="yes"), r"rslora must be a bool", TypeError),
    (dict(dtype=jnp.int32), r"dtype must be a floating dtype", TypeError),
    (dict(dtype="floaty"), r"dtype must be a floating dtype", TypeError),
    (
        dict(targets=lambda p, leaf: lorax.LoraSpec(in_axes=1.5)),
        r"in_axes=1\.5 for 'dense/kernel'",
        ValueError,
    ),
]


@pytest.mark.parametrize("kwargs, match, cls", WRAP_CASES)
def test_wrap_argument_types(kwargs, match, cls):
    with _raises(r"lorax\.wrap: .*" + match, cls):
        lorax.wrap(PARAMS, **{"rank": 2, **kwargs})


@pytest.mark.parametrize(
    "select, match, cls",
    [
        (None, r"lorax\.unfreeze: targets must be", TypeError),
        (3, r"lorax\.unfreeze: targets must be", TypeError),
        (["bias", 3], r"lorax\.unfreeze: targets must be", TypeError),
        (
            ["bias", "bais"],
            r"lorax\.unfreeze: the names \['bais'\] select no plain array",
            ValueError,
        ),
    ],
)
def test_unfreeze_select(select, match, cls):
    with _raises(match, cls):
        lorax.unfreeze(PARAMS, targets=select)


@pytest.mark.parametrize(
    "kwargs, match, cls",
    [
        (dict(feedforward=3), r"lorax\.ia3: feedforward must be", TypeError),
        (
            dict(feedforward=["dnese"]),
            r"lorax\.ia3: feedforward \['dnese'\] matches no targeted "
            r"path.*dense/kernel",
            ValueError,
        ),
        (
            dict(feedforward="proj/.*"),
            r"lorax\.ia3: feedforward \['proj/\.\*'\] matches no",
            ValueError,
        ),
        (dict(dtype=jnp.int32), r"lorax\.ia3: dtype must be a floating dtype", TypeError),
    ],
)
def test_ia3_arguments(kwargs, match, cls):
    with _raises(match, cls):
        lorax.ia3(PARAMS, targets=["dense"], **kwargs)


@pytest.mark.parametrize(
    "kwargs, match, cls",
    [
        (dict(bottleneck="4"), r"bottleneck must be a positive int; got str", TypeError),
        (dict(bottleneck=2.5), r"bottleneck must be a positive int; got 2\.5", ValueError),
        (dict(bottleneck=True), r"bottleneck must be a positive int; got bool", TypeError),
        (dict(activation=["relu"]), r"activation must be one of", ValueError),
        (dict(dtype="floaty"), r"dtype must be a floating dtype", TypeError),
    ],
)
def test_adapters_arguments(kwargs, match, cls):
    with _raises(r"lorax\.adapters: " + match, cls):
        lorax.adapters(PARAMS, targets=["dense"], **kwargs)


def test_adapters_numpy_bottleneck_is_accepted():
    tree = lorax.adapters(PARAMS, targets=["dense"], bottleneck=np.int64(3))
    assert tree["dense"]["kernel"].down.shape == (6, 3)


def _lp(rank=2, params=PARAMS):
    return lorax.wrap(params, rank=rank, targets=["dense"])


@pytest.mark.parametrize(
    "trees, index, match, cls",
    [
        (lambda: _lp(), [0], r"trees must be a list of wrapped trees; got dict", TypeError),
        (
            lambda: [_lp(), _lp(3)],
            jnp.array([0.5, 1.0]),
            r"index must be \[batch\] ints",
            TypeError,
        ),
        (lambda: [_lp(), _lp(3)], ["a"], r"index must be \[batch\] ints", TypeError),
        (lambda: [_lp(), _lp(3)], [], r"index must be \[batch\] with batch >= 1", ValueError),
        (
            lambda: [
                _lp(),
                _lp(
                    params={**PARAMS, "dense": {"kernel": jnp.ones((10, 6)), "bias": jnp.zeros(6)}}
                ),
            ],
            [0],
            r"'dense/kernel' has bases of shapes \[\(8, 6\), \(10, 6\)\]",
            ValueError,
        ),
        (lambda: [PARAMS, PARAMS], [0], r"the trees hold no LoRA leaves", ValueError),
    ],
)
def test_stack_arguments(trees, index, match, cls):
    with _raises(r"lorax\.stack: " + match, cls):
        lorax.stack(trees(), index)


@pytest.mark.parametrize(
    "args, kwargs, match, cls",
    [
        (lambda: (_lp(), [1.0]), {}, r"trees must be a list of wrapped trees", TypeError),
        (lambda: ([_lp()], None), {}, r"weights must be a list of numbers", TypeError),
        (
            lambda: ([_lp()], ["1"]),
            dict(combination="cat"),
            r"weights\[0\] must be a real number",
            TypeError,
        ),
        (
            lambda: ([_lp()], [math.nan]),
            dict(combination="cat"),
            r"weights\[0\] must be finite",
            ValueError,
        ),
        (
            lambda: ([_lp()], [1.0]),
            dict(combination="svd", rank=0),
            r"rank must be a positive int",
            ValueError,
        ),
        (
            lambda: ([_lp()], [1.0]),
            dict(combination="svd", rank=2.5),
            r"rank must be a positive int",
            ValueError,
        ),
        (
            lambda: ([_lp()], [1.0]),
            dict(combination="cat", rank=2),
            r"rank is only for combination='svd'",
            ValueError,
        ),
    ],
)
def test_add_weighted_arguments(args, kwargs, match, cls):
    with _raises(r"lorax\.add_weighted: " + match, cls):
        lorax.add_weighted(*args(), **kwargs)


def test_add_weighted_accepts_numpy_and_array_weights():
    out = lorax.add_weighted(
        [_lp(), _lp()], jnp.array([0.5, 0.5]), combination="svd", rank=np.int64(2)
    )
    assert out["dense"]["kernel"].rank == 2
