"""The public API under hostile input: hypothesis draws bad arguments for every public call,
and each must raise a lorax error (``lorax.LoraxError``) whose message names the argument
or the parameter path, never a bare JAX / orbax / numpy error from deep inside, never a
hang, never a silent result.

Each case is (call, argument, expected words): ``call(bad)`` runs the public function with
one argument replaced by ``bad``; the message must contain one of the expected words.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

FUZZ = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

PARAMS = {
    "enc": {
        "query": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
        "value": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
    },
    "norm": {"scale": jnp.ones(8)},
}


def _raises_lorax_error(fn, *words):
    """``fn()`` raises a LoraxError whose message names one of ``words``."""
    try:
        out = fn()
    except lorax.LoraxError as e:
        message = str(e)
        assert any(w in message for w in words), (
            f"{type(e).__name__} does not name any of {words}: {message}"
        )
        return e
    except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
        raise AssertionError(f"a bare {type(e).__name__} escaped: {e}") from e
    raise AssertionError(f"no error; returned {type(out).__name__}")


# ---------------------------------------------------------------------------- strategies

not_a_number = st.one_of(
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
bad_regexes = st.sampled_from(["(", "[a-", "*kernel", "a{2,1}", "(?P<x", "\\"])
absent_names = st.text(alphabet="xyzw", min_size=1, max_size=5)
bad_ranks = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=7, max_value=10**9),
    st.floats(allow_nan=True),
    st.booleans(),
    not_a_number,
)
bad_alphas = st.one_of(
    st.just(0),
    st.just(0.0),
    non_finite,  # None is the default
    not_a_number.filter(lambda x: x is not None),
    st.booleans(),
)
bad_keys = st.one_of(
    st.integers(),
    st.floats(),
    st.text(max_size=3),
    st.just(np.zeros(3, np.uint32)),
    st.just(jnp.ones((2,), jnp.float32)),
)
bad_params = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.just({}),
    st.just([]),
    st.just({"w": "weights"}),
    st.just({"w": jnp.ones((4, 4), jnp.int32)}),
    st.just({"w": jnp.ones(4)}),
)
bad_probabilities = st.one_of(
    st.floats(min_value=1.0), st.floats(max_value=-1e-9), non_finite, not_a_number
)


# ---------------------------------------------------------------------------- lorax.wrap


@FUZZ
@given(rank=bad_ranks)
def test_wrap_rank(rank):
    _raises_lorax_error(lambda: lorax.wrap(PARAMS, rank=rank), "rank", "enc/query/kernel")


@FUZZ
@given(alpha=bad_alphas)
def test_wrap_alpha(alpha):
    _raises_lorax_error(lambda: lorax.wrap(PARAMS, rank=2, alpha=alpha), "alpha")


@FUZZ
@given(
    targets=st.one_of(
        bad_regexes,
        st.lists(absent_names, min_size=1, max_size=3),
        absent_names.map(lambda n: f".*{n}/kernel"),
        st.integers(),
        st.just([3, "query"]),
    )
)
def test_wrap_targets(targets):
    _raises_lorax_error(
        lambda: lorax.wrap(PARAMS, rank=2, targets=targets),
        "targets",
        "target",
        "regex",
        "matched no",
    )


@FUZZ
@given(key=bad_keys)
def test_wrap_key(key):
    _raises_lorax_error(lambda: lorax.wrap(PARAMS, rank=2, key=key), "key")


@FUZZ
@given(name=absent_names, value=st.integers(1, 4), which=st.sampled_from(["rank", "alpha"]))
def test_wrap_pattern_key_that_matches_nothing(name, value, which):
    _raises_lorax_error(
        lambda: lorax.wrap(PARAMS, rank=2, **{f"{which}_pattern": {name: value}}),
        f"{which}_pattern",
        name,
    )


@FUZZ
@given(value=bad_ranks)
def test_wrap_rank_pattern_values(value):
    _raises_lorax_error(
        lambda: lorax.wrap(PARAMS, rank=2, rank_pattern={"query": value}),
        "rank",
        "enc/query/kernel",
    )


@FUZZ
@given(dropout=bad_probabilities)
def test_wrap_dropout(dropout):
    _raises_lorax_error(lambda: lorax.wrap(PARAMS, rank=2, dropout=dropout), "dropout")


@FUZZ
@given(
    value=st.text(max_size=6).filter(
        lambda s: s not in ("lora", "dora", "kaiming", "gaussian", "pissa", "olora", "loftq")
    ),
    argument=st.sampled_from(["init", "method"]),
)
def test_wrap_choices(value, argument):
    _raises_lorax_error(lambda: lorax.wrap(PARAMS, rank=2, **{argument: value}), argument)


@FUZZ
@given(params=bad_params)
def test_wrap_params(params):
    _raises_lorax_error(
        lambda: lorax.wrap(params, rank=2), "params", "matched no", "w", "adaptable"
    )


def test_wrap_accepts_numpy_integer_ranks():
    lp = lorax.wrap(PARAMS, rank=np.int64(2), rank_pattern={"value": np.int32(3)})
    assert lp["enc"]["query"]["kernel"].rank == 2 and lp["enc"]["value"]["kernel"].rank == 3


def test_wrap_init_on_non_finite_weight_returns_an_error():
    bad = {"w": jnp.ones((8, 8)).at[2, 3].set(jnp.inf)}
    for init in ("pissa", "olora", "loftq"):
        _raises_lorax_error(lambda: lorax.wrap(bad, rank=2, init=init), "'w'")


# --------------------------------------------------------------------- quantize and friends


@FUZZ
@given(
    argument=st.sampled_from(["method", "block_size", "compute_dtype", "targets"]), data=st.data()
)
def test_quantize_arguments(argument, data):
    bad = {
        "method": st.text(max_size=4).filter(lambda s: s not in ("nf4", "int8")),
        "block_size": st.one_of(st.integers(-8, 31), st.integers(33, 63), st.just(4097)),
        "compute_dtype": st.sampled_from([jnp.int8, jnp.uint8, "foo", jnp.bool_]),
        "targets": st.one_of(bad_regexes, st.lists(absent_names, min_size=1, max_size=2)),
    }
    value = data.draw(bad[argument])
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    method = "int8" if argument == "compute_dtype" and data.draw(st.booleans()) else "nf4"
    kwargs = {"method": method, argument: value}
    _raises_lorax_error(
        lambda: lorax.quantize(params, **kwargs), argument, "target", "regex", "matched no"
    )


@FUZZ
@given(
    where=st.tuples(st.integers(0, 63), st.integers(0, 31)),
    value=non_finite,
    method=st.sampled_from(["nf4", "int8"]),
)
def test_quantize_non_finite_weight(where, value, method):
    w = jax.random.normal(jax.random.key(0), (64, 32)).at[where].set(value)
    _raises_lorax_error(lambda: lorax.quantize({"layer": {"kernel": w}}, method), "'layer/kernel'")


# ------------------------------------------------------------------ tree surgery and lora


def test_merge_and_save_of_half_a_split(tmp_path):
    trainable, frozen = lorax.split(lorax.wrap(PARAMS, rank=2))
    for half in (trainable, frozen):
        _raises_lorax_error(lambda: lorax.merge(half), "enc/query/kernel")
        _raises_lorax_error(lambda: lorax.save(tmp_path / "x", half), "enc/query/kernel")


@FUZZ
@given(rank=st.integers(1, 5))
def test_combine_of_mismatched_trees(rank):
    """Trainable parts of an adapter of another rank or base do not fit: said at combine."""
    t_other, _ = lorax.split(lorax.wrap(PARAMS, rank=rank + 1))
    _, frozen = lorax.split(lorax.wrap(PARAMS, rank=rank))
    t_base, _ = lorax.split(
        lorax.wrap(
            {
                **PARAMS,
                "enc": {
                    "query": {"kernel": jnp.ones((8, 7)), "bias": jnp.zeros(7)},
                    "value": PARAMS["enc"]["value"],
                },
            },
            rank=rank,
        )
    )
    lp = lorax.combine(*lorax.split(lorax.wrap(PARAMS, rank=rank)))  # the right pair works
    assert lp["enc"]["query"]["kernel"].rank == rank
    _raises_lorax_error(lambda: lorax.combine(t_base, frozen), "enc/query/kernel")
    # a different rank fits the base: a legitimate swap of adapters, not an error
    assert lorax.combine(t_other, frozen)["enc"]["query"]["kernel"].rank == rank + 1


@FUZZ
@given(fn=st.one_of(st.integers(), st.text(max_size=3), st.none(), st.just([len])))
def test_lora_needs_a_callable(fn):
    _raises_lorax_error(lambda: lorax.lora(fn), "fn", "callable")


@FUZZ
@given(
    rule=st.one_of(st.integers(), st.text(max_size=3), st.none()),
    primitive=st.sampled_from(["dot_general", "not_a_primitive", 42, None]),
)
def test_register_rule_arguments(rule, primitive):
    _raises_lorax_error(lambda: lorax.register_rule(primitive, rule), "rule", "primitive")


@FUZZ
@given(rng=bad_keys)
def test_lora_dropout_rng(rng):
    lp = lorax.wrap(PARAMS, rank=2, dropout=0.1)
    apply = lorax.lora(lambda p, x: x @ p["enc"]["query"]["kernel"])
    _raises_lorax_error(lambda: apply(lp, jnp.ones((2, 8)), dropout_rng=rng), "dropout_rng")


@FUZZ
@given(select=st.one_of(bad_regexes, st.lists(absent_names, min_size=1, max_size=2)))
def test_unfreeze_select(select):
    _raises_lorax_error(lambda: lorax.unfreeze(PARAMS, targets=select), "targets", "unfreeze")


@FUZZ
@given(
    weights=st.one_of(
        st.lists(st.floats(-2, 2), min_size=0, max_size=1),
        st.lists(st.floats(-2, 2), min_size=3, max_size=4),
        st.tuples(non_finite, st.just(0.5)),
        st.text(max_size=3),
    ),
    method=st.sampled_from(["linear", "cat", "svd"]),
)
def test_add_weighted_weights(weights, method):
    trees = [lorax.wrap(PARAMS, rank=2, key=jax.random.key(i)) for i in range(2)]
    _raises_lorax_error(lambda: lorax.add_weighted(trees, weights, combination=method), "weight")


@FUZZ
@given(
    index=st.one_of(
        st.lists(st.integers(2, 9), min_size=1, max_size=3),
        st.lists(st.integers(-9, -1), min_size=1, max_size=3),
        st.just([]),
        st.just([[0, 1]]),
        st.just([0.5, 1.0]),
        st.text(max_size=2),
    )
)
def test_stack_index(index):
    trees = [lorax.wrap(PARAMS, rank=2, key=jax.random.key(i)) for i in range(2)]
    _raises_lorax_error(lambda: lorax.stack(trees, index), "index")


# ------------------------------------------------------------------ files we are handed


@FUZZ
@given(content=st.binary(max_size=64), name=st.sampled_from(["metadata", "_METADATA"]))
def test_load_of_garbage(tmp_path_factory, content, name):
    path = tmp_path_factory.mktemp("garbage")
    (path / "lorax").mkdir()
    (path / "lorax" / name).write_bytes(content)
    _raises_lorax_error(lambda: lorax.load(path, PARAMS), str(path))


@functools.cache
def _tiny_gpt2():
    from lorax.models import gpt2

    model = gpt2.GPT2(
        gpt2.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


@FUZZ
@given(
    edit=st.fixed_dictionaries(
        {},
        optional={
            "r": st.one_of(st.integers(-3, 0), st.integers(3, 50), not_a_number),
            "lora_alpha": st.one_of(non_finite, st.text(max_size=3), st.none()),
            "peft_type": st.text(max_size=4),
        },
    ).filter(bool)
)
def test_import_peft_config(tmp_path_factory, edit):
    """An exported adapter whose config was edited: r, lora_alpha, peft_type checked."""
    model, params = _tiny_gpt2()
    lp = lorax.wrap(params, rank=2, targets=["c_attn"])
    path = tmp_path_factory.mktemp("peft")
    lorax.export_peft(path, lp, model=model)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(edit)
    (path / "adapter_config.json").write_text(json.dumps(config))
    _raises_lorax_error(
        lambda: lorax.import_peft(path, params, model=model), "adapter_config.json", *edit
    )


@FUZZ
@given(content=st.binary(max_size=200))
def test_import_peft_corrupt_files(tmp_path_factory, content):
    model, params = _tiny_gpt2()
    path = tmp_path_factory.mktemp("peft")
    lorax.export_peft(path, lorax.wrap(params, rank=2, targets=["c_attn"]), model=model)
    (path / "adapter_model.safetensors").write_bytes(content)
    _raises_lorax_error(
        lambda: lorax.import_peft(path, params, model=model), "adapter_model.safetensors"
    )


def test_optimizer_of_a_non_tree():
    _raises_lorax_error(lambda: lorax.optimizer(optax.adam(1e-3), 3), "tree", "adapter")


def test_optional_fields_are_not_mistaken_for_half_a_split():
    """An NF4 base without double quantization has None scale fields by design: merge,
    combine and lora take it whole, bare or under a LoRA leaf."""
    q = lorax.quantize(
        {"w": jax.random.normal(jax.random.key(0), (64, 32))}, "nf4", double_quant=False
    )
    assert lorax.merge(q)["w"].shape == (64, 32)
    lq = lorax.wrap(q, rank=2)
    assert lorax.merge(lorax.combine(*lorax.split(lq)))["w"].shape == (64, 32)
    out = jax.jit(lorax.lora(lambda p, x: x @ p["w"]))(lq, jnp.ones((2, 64), jnp.bfloat16))
    assert out.shape == (2, 32)
