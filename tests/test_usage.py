"""Targets chosen by how the function uses each weight (lorax.find_targets), and the
name-based defaults' spellings of biases and embedding tables in common libraries."""

import string
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

KEY = jax.random.key(0)


def _normal(key, shape):
    return jax.random.normal(jax.random.key(key), shape) * 0.1


def _gemma_style():
    """Biases named ``b`` (4-D, broadcast), a table named ``input_embedding`` used for the
    lookup and, transposed, for the logits."""
    params = {
        "embedder": {"input_embedding": _normal(0, (11, 32))},
        "ffw_up": {"w": _normal(1, (2, 32, 96)), "b": jnp.zeros((2, 1, 1, 96))},
        "ffw_down": {"w": _normal(2, (96, 32)), "b": jnp.zeros((1, 1, 32))},
        "norm": {"g": jnp.ones((1, 1, 32))},
    }

    def fn(p, ids):
        x = p["embedder"]["input_embedding"][ids]
        h = jnp.einsum("btd,gdf->gbtf", x, p["ffw_up"]["w"]) + p["ffw_up"]["b"]
        h = jax.nn.gelu(h[0]) * h[1]
        x = x + h @ p["ffw_down"]["w"] + p["ffw_down"]["b"]
        x = x * p["norm"]["g"]
        return x @ p["embedder"]["input_embedding"].T

    return params, fn, jnp.array([[1, 2, 3], [4, 5, 6]])


def test_issue_example_by_name_leaves_b_and_input_embedding_alone():
    params, _, _ = _gemma_style()
    lp = lorax.wrap(params, rank=4)  # the default by name: no "rank 4 exceeds min(2, 96)"
    assert {p for p in _paths(lp) if lorax.is_lorax_leaf(_get(lp, p))} == {
        "ffw_up/w",
        "ffw_down/w",
    }
    qp = lorax.quantize(params, "nf4", block_size=32)
    assert not lorax.is_lorax_leaf(qp["ffw_up"]["b"])
    assert not lorax.is_lorax_leaf(qp["embedder"]["input_embedding"])
    assert isinstance(qp["ffw_up"]["w"], lorax.NF4Weight)


def test_roles_of_the_gemma_style_model():
    params, fn, ids = _gemma_style()
    usage = lorax.find_targets(fn, params, ids)
    roles = {p: u.role for p, u in usage.items()}
    assert roles == {
        "embedder/input_embedding": "embedding",  # gathered, and tied to the logits
        "ffw_down/b": "elementwise",
        "ffw_down/w": "linear",
        "ffw_up/b": "elementwise",
        "ffw_up/w": "linear",
        "norm/g": "elementwise",
    }
    assert usage["ffw_down/w"].in_axes == 1 and usage["ffw_down/w"].stack_axes == 0
    # ffw_up contracts its middle axis: no leading or trailing group says the layout
    assert usage["ffw_up/w"].in_axes is None


def test_wrap_with_fn_adapts_the_linear_weights_and_equals_the_merged_model():
    params, fn, ids = _gemma_style()
    lp = lorax.wrap(params, rank=4, fn=fn, args=(ids,), key=KEY)
    same = lorax.wrap(params, rank=4, targets=lorax.find_targets(fn, params, ids), key=KEY)
    also = lorax.wrap(params, rank=4, targets="all-linear", fn=fn, args=(ids,), key=KEY)
    assert jax.tree.structure(lp) == jax.tree.structure(same) == jax.tree.structure(also)
    lp = _nonzero_b(lp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoraxDensifyWarning)
        got = lorax.lora(fn)(lp, ids)
    want = fn(lorax.merge(lp), ids)
    assert jnp.allclose(got, want, atol=1e-5)


def test_quantize_with_fn_leaves_tables_and_biases():
    params, fn, ids = _gemma_style()
    qp = lorax.quantize(params, "nf4", block_size=32, fn=fn, args=(ids,))
    kinds = {p: type(_get(qp, p)).__name__ for p in _paths(qp)}
    assert kinds["ffw_up/w"] == kinds["ffw_down/w"] == "NF4Weight"
    assert kinds["embedder/input_embedding"] == kinds["ffw_up/b"] == "ArrayImpl"


def test_flax_modules_conv_scan_and_transposed_use():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(8, name="mix")(x), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(13, 8, name="tok")(ids)
            x = nn.Conv(8, (3,), name="conv")(x)
            x, _ = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )(name="layers")(x, None)
            w = self.param("head", nn.initializers.normal(), (13, 8))  # (vocab, d): x @ w.T
            return nn.LayerNorm(name="ln")(x) @ w.T

    ids = jnp.zeros((2, 5), jnp.int32)
    variables = Net().init(KEY, ids)
    usage = lorax.find_targets(Net().apply, variables, ids)
    got = {p: (u.role, u.in_axes, u.stack_axes) for p, u in usage.items() if u.adaptable}
    assert got == {
        "params/conv/kernel": ("conv", 2, 0),
        "params/layers/mix/kernel": ("linear", 1, 1),  # the scanned layer axis
        "params/head": ("linear", 1, 0),  # contracted on its trailing axis
    }
    assert usage["params/tok/embedding"].role == "embedding"
    assert usage["params/ln/scale"].role == usage["params/layers/mix/bias"].role == "elementwise"
    lp = _nonzero_b(lorax.wrap(variables, rank=2, fn=Net().apply, args=(ids,), key=KEY))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoraxDensifyWarning)
        got_out = lorax.lora(Net().apply)(lp, ids)
    assert jnp.allclose(got_out, Net().apply(lorax.merge(lp), ids), atol=1e-5)


def test_layer_loop_indexing_a_stack_counts_as_a_stack_axis():
    params = {"w": _normal(0, (3, 8, 8)), "unused": jnp.ones((4, 4))}

    def fn(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["w"][i])
        return x

    usage = lorax.find_targets(fn, params, jnp.ones((2, 8)))
    assert usage["w"] == lorax.Usage(role="linear", uses=("dot_general",), in_axes=1, stack_axes=1)
    assert usage["unused"].role == "unused"


def test_ambiguous_weight_is_left_out_with_a_warning_naming_it():
    params = {"w": _normal(0, (8, 8)), "v": _normal(1, (8, 8))}

    def fn(p, x):
        return x @ p["w"] + jnp.sum(p["w"] ** 2) + x @ p["v"]

    x = jnp.ones((2, 8))
    usage = lorax.find_targets(fn, params, x)
    assert usage["w"].role == "mixed" and usage["v"].role == "linear"
    with pytest.warns(lorax.LoraxAmbiguousTargetWarning, match=r"'w' \(dot_general"):
        lp = lorax.wrap(params, rank=2, fn=fn, args=(x,))
    assert not lorax.is_lorax_leaf(lp["w"]) and lorax.is_lorax_leaf(lp["v"])


def test_bad_usage_targets_are_refused():
    params, fn, ids = _gemma_style()
    with pytest.raises(ValueError, match="all-linear.*fn="):
        lorax.wrap(params, rank=2, targets="all-linear")
    with pytest.raises(ValueError, match="fn= chooses the targets"):
        lorax.wrap(params, rank=2, targets=r".*w", fn=fn, args=(ids,))
    with pytest.raises(TypeError, match="args must be a tuple"):
        lorax.wrap(params, rank=2, fn=fn, args=ids)
    with pytest.raises(ValueError, match="args= is the example input of fn="):
        lorax.wrap(params, rank=2, args=(ids,))
    usage = lorax.find_targets(fn, params, ids)
    with pytest.raises(ValueError, match="paths that this tree does not have"):
        lorax.wrap({"other": params}, rank=2, targets=usage)
    with pytest.raises(TypeError, match="the entry for 'x' is a str"):
        lorax.wrap(params, rank=2, targets={"x": "linear"})
    no_linear = {p: u for p, u in usage.items() if not u.adaptable}
    with pytest.raises(ValueError, match="roles found"):
        lorax.wrap(params, rank=2, targets=no_linear)
    with pytest.raises(TypeError, match="fn must be callable"):
        lorax.find_targets("apply", params)


@settings(max_examples=8, deadline=None)
@given(
    n_in=st.integers(1, 2),
    n_out=st.integers(1, 2),
    transposed=st.booleans(),
    seed=st.integers(0, 9),
)
def test_property_einsum_layouts_give_the_contracted_group(n_in, n_out, transposed, seed):
    """For a weight (*in, *out) read by an einsum over its leading group (or its trailing
    group when transposed), the answer says so, and LoRA on it equals the merged weight."""
    letters = iter(string.ascii_lowercase[:8])
    ins = [next(letters) for _ in range(n_in)]
    outs = [next(letters) for _ in range(n_out)]
    sizes = dict(zip(ins + outs, [3, 2, 4, 3][: n_in + n_out], strict=True))
    w_spec = "".join(outs + ins) if transposed else "".join(ins + outs)
    shape = tuple(sizes[c] for c in w_spec)
    params = {"w": _normal(seed, shape)}
    x = _normal(seed + 1, (2, *(sizes[c] for c in ins)))
    fn = lambda p, x: jnp.einsum(f"z{''.join(ins)},{w_spec}->z{''.join(outs)}", x, p["w"])  # noqa: E731
    usage = lorax.find_targets(fn, params, x)["w"]
    assert usage.role == "linear"
    assert usage.in_axes == (n_out if transposed else n_in)
    lp = _nonzero_b(lorax.wrap(params, rank=1, fn=fn, args=(x,), key=KEY))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoraxDensifyWarning)
        got = lorax.lora(fn)(lp, x)
    assert jnp.allclose(got, fn(lorax.merge(lp), x), atol=1e-5)


# --------------------------------------------------------------------------------------


def _paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lorax.is_lorax_leaf)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _nonzero_b(tree):
    def fill(x):
        if isinstance(x, lorax.LoraWeight):
            return x.replace(b=_normal(7, x.b.shape).astype(x.b.dtype))
        return x

    return jax.tree.map(fill, tree, is_leaf=lorax.is_lorax_leaf)
