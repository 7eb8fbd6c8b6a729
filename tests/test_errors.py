"""Bad input gets a clear error naming the parameter path and what was expected."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

PARAMS = {
    "encoder": {
        "query": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
        "value": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)},
    },
    "step": jnp.zeros((4, 4), jnp.int32),
    "name": "not-an-array",
}


@pytest.mark.parametrize("rank", [0, -3, 2.5])
def test_rank_must_be_positive_int(rank):
    with pytest.raises(ValueError, match="encoder/query/kernel.*positive int"):
        lorax.wrap(PARAMS, rank=rank, targets=["query"])


def test_rank_above_min_in_out():
    with pytest.raises(
        ValueError,
        match=r"rank 9 for 'encoder/query/kernel' exceeds min\(in, "
        r"out\) = min\(16, 8\)",
    ):
        lorax.wrap(PARAMS, rank=9, targets=["query"])


def test_rank_pattern_overrides_are_validated_per_path():
    lp = lorax.wrap(
        PARAMS,
        rank=4,
        targets=["query", "value"],
        rank_pattern={"value": 2},
        alpha_pattern={r".*query.*": 8.0},
    )
    assert lp["encoder"]["value"]["kernel"].rank == 2
    assert lp["encoder"]["query"]["kernel"].scale == 2.0
    with pytest.raises(ValueError, match="encoder/value/kernel"):
        lorax.wrap(PARAMS, rank=4, targets=["query", "value"], rank_pattern={"value": 0})


def test_regex_matching_nothing_lists_candidates():
    with pytest.raises(ValueError) as err:
        lorax.wrap(PARAMS, rank=2, targets=r".*key/kernel")
    msg = str(err.value)
    assert "'.*key/kernel'" in msg and "matched no adaptable weight" in msg
    assert "encoder/query/kernel  float32[16, 8]" in msg
    assert "step  int32[4, 4]" in msg


def test_unknown_name_in_list_is_reported():
    with pytest.raises(ValueError, match=r"\['qurey'\] matched no adaptable weight"):
        lorax.wrap(PARAMS, rank=2, targets=["query", "qurey"])


def test_integer_target():
    with pytest.raises(TypeError, match="selects 'step', a int32\\[4, 4\\] array"):
        lorax.wrap(PARAMS, rank=2, targets=r"(step|encoder/query/kernel)")


def test_non_array_target():
    with pytest.raises(TypeError, match="selects 'name', which is a str"):
        lorax.wrap(
            PARAMS,
            rank=2,
            targets=lambda path, leaf: (
                path in ("name", "step") or path.endswith("query/kernel") and False
            ),
        )


def test_bad_targets_type():
    with pytest.raises(TypeError, match="targets must be"):
        lorax.wrap(PARAMS, rank=2, targets=42)


def test_wrapping_twice_is_an_error():
    lp = lorax.wrap(PARAMS, rank=2, targets=["query"])
    with pytest.raises(ValueError, match="encoder/query/kernel' is already a LoRA leaf"):
        lorax.wrap(lp, rank=2, targets=["query"])


def test_biases_and_1d_leaves_are_left_alone():
    lp = lorax.wrap(PARAMS, rank=2, targets=["query"])
    assert not lorax.is_lorax_leaf(lp["encoder"]["query"]["bias"])
    assert lorax.is_lorax_leaf(lp["encoder"]["query"]["kernel"])
    assert not lorax.is_lorax_leaf(lp["encoder"]["value"]["kernel"])


def test_combine_of_mismatched_trees_names_the_path():
    lp = lorax.wrap(PARAMS, rank=2, targets=["query"])
    other = lorax.wrap(PARAMS, rank=2, targets=["value"])
    t, _ = lorax.split(lp)
    _, f = lorax.split(other)
    with pytest.raises(ValueError, match="do not line up.*encoder/(query|value)"):
        lorax.combine(t, f)
    t2, f2 = lorax.split(lp)
    with pytest.raises(ValueError, match="set in both trees"):
        lorax.combine(f2, f2)


def test_bf16_base_with_float32_adapters():
    model = nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (4, 16)).astype(jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    lp = lorax.wrap(params, rank=4, key=jax.random.key(2))
    leaf = lp["kernel"]
    assert leaf.a.dtype == jnp.float32 and leaf.base.dtype == jnp.bfloat16
    leaf = lorax.LoraWeight(
        leaf.base, leaf.a, jnp.full(leaf.b.shape, 0.05, jnp.float32), leaf.scale
    )
    lp = {**lp, "kernel": leaf}
    with jax.numpy_dtype_promotion("strict"):
        out = jax.jit(lorax.lora(model.apply, strict=True))({"params": lp}, x)
    assert out.dtype == jnp.bfloat16
    ref = model.apply({"params": lorax.merge(lp)}, x)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2
    )
    grads = jax.grad(
        lambda t: jnp.sum(
            lorax.lora(model.apply)({"params": lorax.combine(t, lorax.split(lp)[1])}, x).astype(
                jnp.float32
            )
        )
    )(lorax.split(lp)[0])
    assert grads["kernel"].a.dtype == jnp.float32
