"""VeRA: the leaf against the merged dense model and a numpy float64 formula of peft's update
(``diag(lambda_b) B diag(lambda_d) A`` in torch layout); one shared projection pair sliced
per weight; only the vectors trainable; checkpoints; adapters to and from peft on a tiny
GPT-2, logit by logit; bad input."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_lora_equals_merged
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.methods.vera import VeraWeight

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _randomized(tree, seed, scale=1.0):
    """Every VeRA leaf with random lambda_d and lambda_b (numpy float32)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if not isinstance(x, VeraWeight):
            return x
        draw = lambda s: jnp.asarray((scale * rng.normal(size=s)).astype(np.float32))  # noqa: E731
        return x.replace(lambda_d=draw(x.lambda_d.shape), lambda_b=draw(x.lambda_b.shape))

    return jax.tree.map(fill, tree, is_leaf=lorax.is_lorax_leaf)


# ------------------------------------------------------------------- the leaf itself
def _model(params, x):
    """A 2-D kernel, a per-head 3-D kernel (DenseGeneral) and a scanned layer stack."""
    h = jnp.tanh(x @ params["proj"]["kernel"])  # (n, 6) @ (6, 8)
    heads = jnp.einsum("nd,dhk->nhk", h, params["heads"]["kernel"])  # (8, 2, 4)
    h = h + 0.5 * heads.reshape(h.shape)

    def layer(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, h, params["stack"]["kernel"])  # (2, 8, 8)
    return h @ params["up"]["kernel"]  # (8, 12): the largest output


def _params():
    rng = np.random.default_rng(0)
    draw = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) / 3)  # noqa: E731
    return {
        "proj": {"kernel": draw(6, 8)},
        "heads": {"kernel": draw(8, 2, 4)},
        "stack": {"kernel": draw(2, 8, 8)},
        "up": {"kernel": draw(8, 12)},
    }


def _targets(path, leaf):
    if "stack" in path:
        return lorax.LoraSpec(stack_axes=1)
    return lorax.LoraSpec(in_axes=1) if "heads" in path else True


@functools.cache
def _tree():
    """The VeRA tree of ``_params`` (rank 5, a rank above some weights' sizes is allowed)."""
    return lorax.vera(_params(), rank=5, targets=_targets, key=jax.random.key(3))


def test_forward_and_gradients_equal_the_merged_model():
    tree = _tree()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32))
    # at init lambda_b = 0: the weights are the base's, and so is the output
    for got, want in zip(jax.tree.leaves(jax.jit(lorax.merge)(tree)), jax.tree.leaves(_params())):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        jax.jit(lorax.lora(_model))(tree, x), _model(_params(), x), rtol=1e-6, atol=1e-6
    )
    tree = _randomized(tree, 0)
    assert tree["stack"]["kernel"].stack_ndim == 1 and tree["heads"]["kernel"].in_ndim == 1
    check_lora_equals_merged(_model, tree, x, rtol=1e-5, atol=1e-5)


def _peft_update(vera_a, vera_b, lambda_d, lambda_b, n_in, n_out):
    """peft's ``get_delta_weight`` in float64: ``(lambda_b * B[:out]) @ (lambda_d * A[:, :in])``
    ``[out, in]``, from the shared ``vera_A [r, max_in]`` and ``vera_B [max_out, r]``."""
    a = np.asarray(vera_a, np.float64)[:, :n_in]
    b = np.asarray(vera_b, np.float64)[:n_out, :]
    ld, lb = (np.asarray(v, np.float64)[:, None] for v in (lambda_d, lambda_b))
    return (lb * b) @ (ld * a)


def test_merge_equals_numpy_float64_formula_of_one_shared_pair():
    tree = _randomized(_tree(), 1)
    dense = jax.jit(lorax.merge)(tree)
    # the shared pair, in peft's layout: A from the widest input, B from the widest output
    vera_a = np.asarray(tree["up"]["kernel"].a).T  # (5, 8): every input is 6 or 8 wide
    vera_b = np.asarray(tree["up"]["kernel"].b).T  # (12, 5): up has the most outputs
    for name in ("proj", "heads", "up"):
        leaf, base = tree[name]["kernel"], np.asarray(_params()[name]["kernel"], np.float64)
        n_in, n_out = base.shape[0], base[0].size
        delta = _peft_update(vera_a, vera_b, leaf.lambda_d, leaf.lambda_b.reshape(-1), n_in, n_out)
        want = base + delta.T.reshape(base.shape)  # a Flax kernel is [in, out]
        np.testing.assert_allclose(dense[name]["kernel"], want, rtol=1e-5, atol=1e-5)
    stack = tree["stack"]["kernel"]
    for layer in range(2):
        delta = _peft_update(
            vera_a, vera_b, stack.lambda_d[layer], stack.lambda_b[layer], n_in=8, n_out=8
        )
        want = np.asarray(_params()["stack"]["kernel"][layer], np.float64) + delta.T
        np.testing.assert_allclose(dense["stack"]["kernel"][layer], want, rtol=1e-5, atol=1e-5)


@settings(max_examples=4, deadline=None)
@given(
    n_in=st.integers(2, 7),
    n_out=st.integers(2, 7),
    other=st.tuples(st.integers(2, 9), st.integers(2, 9)),
    rank=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_products_equal_numpy_float64_on_random_shapes(n_in, n_out, other, rank, seed):
    """x @ W through lora() against float64 numpy, for two weights of any sizes sharing a
    pair (each a slice of it) and any rank up to the largest in * out."""
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(n_in, n_out)).astype(np.float32)),
        "v": jnp.asarray(rng.normal(size=other).astype(np.float32)),
    }
    rank = min(rank, max(n_in * n_out, other[0] * other[1]))
    key = jax.random.key(seed, impl="rbg")  # compiles faster than threefry on CPU
    tree = lorax.vera(params, rank=rank, targets=["w", "v"], key=key)
    tree = _randomized(tree, seed)
    w, v = tree["w"], tree["v"]
    wide_a = w.a if n_in >= other[0] else v.a
    wide_b = w.b if n_out >= other[1] else v.b
    np.testing.assert_array_equal(w.a, wide_a[:n_in])
    np.testing.assert_array_equal(v.b, wide_b[:, : other[1]])
    x = rng.normal(size=(3, n_in)).astype(np.float32)
    got = lorax.lora(lambda t, x: x @ t["w"])(tree, jnp.asarray(x))
    delta = _peft_update(np.asarray(wide_a).T, np.asarray(wide_b).T, w.lambda_d, w.lambda_b,
                         n_in, n_out)  # fmt: skip
    want = x.astype(np.float64) @ (np.asarray(params["w"], np.float64) + delta.T)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_one_shared_pair_drawn_kaiming_uniform():
    params = {"p": jnp.zeros((24, 40)), "q": jnp.zeros((64, 16)), "s": jnp.zeros((3, 24, 40))}
    spec = lambda path, x: lorax.LoraSpec(stack_axes=int(path == "s"))  # noqa: E731
    tree = lorax.vera(params, rank=32, targets=spec, key=jax.random.key(7))
    a, b, s = tree["p"], tree["q"], tree["s"]
    assert s.stack_ndim == 1
    np.testing.assert_array_equal(a.a, b.a[:24])  # A: the widest input's, sliced
    np.testing.assert_array_equal(b.b, a.b[:, :16])  # B: the widest output's, sliced
    for layer in range(3):  # every stacked layer holds the same slices
        np.testing.assert_array_equal(s.a[layer], a.a)
        np.testing.assert_array_equal(s.b[layer], a.b)
    # kaiming-uniform: vera_A [r, 64] within sqrt(6 / 64), vera_B [40, r] within sqrt(6 / r)
    full_a, full_b = np.asarray(b.a), np.asarray(a.b)
    assert np.abs(full_a).max() <= np.sqrt(6 / 64) and np.abs(full_b).max() <= np.sqrt(6 / 32)
    assert np.abs(full_a).max() > 0.9 * np.sqrt(6 / 64)  # spread over the whole range
    assert abs(full_a.std() - np.sqrt(2 / 64)) < 0.1 * np.sqrt(2 / 64)  # uniform's std
    again = lorax.vera(params, rank=32, targets=spec, key=jax.random.key(7))
    other = lorax.vera(params, rank=32, targets=spec, key=jax.random.key(8))
    np.testing.assert_array_equal(again["p"].a, a.a)
    assert not np.array_equal(other["p"].a, a.a)
    # init: lambda_d = d_initial, lambda_b = 0
    init = lorax.vera(params, rank=32, targets=spec, d_initial=0.25)["s"]
    assert init.lambda_d.shape == (3, 32) and init.lambda_b.shape == (3, 40)
    assert np.all(np.asarray(init.lambda_d) == 0.25) and not np.asarray(init.lambda_b).any()


def test_only_the_vectors_are_trainable_and_checkpoints_rebuild_the_leaf(tmp_path):
    tree = _randomized(_tree(), 2)
    trainable, frozen = lorax.split(tree)
    fields = {
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]
        if x is not None
    }
    assert fields == {
        f"['{n}']['kernel'].{f}"
        for n in ("proj", "heads", "stack", "up")
        for f in ("lambda_d", "lambda_b")
    }
    # r + out per layer: 5 + 8, 5 + 8, 2 * (5 + 8), 5 + 12
    assert sum(x.size for x in jax.tree.leaves(trainable)) == 13 + 13 + 26 + 17
    mask = lorax.mask(tree)
    assert {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]
            if m} == fields  # fmt: skip
    lorax.save(tmp_path / "ckpt", tree)
    back = lorax.load(tmp_path / "ckpt", _params())
    for got, want in zip(
        jax.tree.leaves(back, is_leaf=lorax.is_lorax_leaf),
        jax.tree.leaves(tree, is_leaf=lorax.is_lorax_leaf),
        strict=True,
    ):
        assert type(got) is type(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(g, w)


def test_errors_name_what_is_wrong():
    p = _params()
    with pytest.raises(LoraxValueError, match="rank must be a positive int; got 0"):
        lorax.vera(p, rank=0)
    with pytest.raises(LoraxValueError, match="rank must be a positive int; got -2"):
        lorax.vera(p, rank=-2)
    with pytest.raises(LoraxTypeError, match="rank must be a positive int; got str"):
        lorax.vera(p, rank="4")  # pyright: ignore[reportArgumentType]
    with pytest.raises(LoraxValueError, match=r"rank 97 exceeds in \* out = 96"):
        lorax.vera(p, rank=97, targets=["up"])
    rbg = jax.random.key(0, impl="rbg")
    assert lorax.vera(p, rank=96, targets=["up"], key=rbg)["up"]["kernel"].rank == 96
    with pytest.raises(LoraxValueError, match=r"\[.missing.\] matched no adaptable weight"):
        lorax.vera(p, rank=2, targets=["missing"])
    with pytest.raises(LoraxValueError, match="'heads/kernel' gives rank=3"):
        lorax.vera(p, rank=2, targets=lambda path, x: lorax.LoraSpec(rank=3))
    with pytest.raises(LoraxTypeError, match="d_initial"):
        lorax.vera(p, rank=2, d_initial="0.1")  # pyright: ignore[reportArgumentType]
    with pytest.raises(LoraxTypeError, match="key"):
        lorax.vera(p, rank=2, key=3)  # pyright: ignore[reportArgumentType]
    leaf = _tree()["proj"]["kernel"]
    assert "lambda_b" in leaf.replace(lambda_b=jnp.zeros(7)).misfit()


# --------------------------------------------------------------- peft interop on GPT-2
def _hf(base_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _torch_lambdas(torch_model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_adapters_to_and_from_peft_gpt2(tmp_path):
    from safetensors.numpy import load_file
    from test_models import _hf_gpt2, _tokens

    from lorax.models import gpt2

    base_dir = tmp_path / "base"
    _hf_gpt2().save_pretrained(base_dir)
    # c_attn [32 -> 96] and c_proj (attn [32 -> 32], mlp [128 -> 32]): the widest input
    # and the widest output are different modules'
    targets = ["c_attn", "c_proj"]
    check = _tokens(2, 9, seed=6)
    model, params = gpt2.from_pretrained(base_dir, scan_layers=True)
    apply = jax.jit(lorax.lora(model.apply))

    def ours(tree):
        with jax.default_matmul_precision("highest"):
            return np.asarray(apply({"params": tree}, check))

    def theirs(torch_model):
        with torch.no_grad():
            return torch_model(torch.tensor(check)).logits.numpy()

    # theirs -> ours, projections saved (peft's default) and redrawn from the key
    for save_projection in (True, False):
        config = peft.VeraConfig(
            r=8,
            target_modules=targets,
            fan_in_fan_out=True,
            projection_prng_key=5,
            save_projection=save_projection,
        )
        torch_model = peft.get_peft_model(_hf(base_dir), config)
        _torch_lambdas(torch_model, 1)
        directory = tmp_path / f"theirs_{save_projection}"
        torch_model.save_pretrained(directory)
        tree = lorax.import_peft(directory, params, model="gpt2")
        leaf = tree["ScanLayers"]["mlp"]["c_proj"]["kernel"]
        assert isinstance(leaf, lorax.VeraWeight) and leaf.a.shape == (2, 128, 8)
        assert leaf.lambda_b.shape == (2, 32)
        logits, want = ours(tree), theirs(torch_model.eval())
        assert np.abs(want - theirs(_hf(base_dir))).max() > 1e-2  # the adapter does something
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)

    # and back (projections saved): the same tensors
    lorax.export_peft(tmp_path / "again", tree, model="gpt2")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    original = load_file(tmp_path / "theirs_True" / "adapter_model.safetensors")
    assert sorted(again) == sorted(original)
    assert again["base_model.vera_A"].shape == (8, 128) and again["base_model.vera_B"].shape == (
        96,
        8,
    )
    for k in original:
        if "vera_lambda" in k:  # the saved run's projections are another draw (key 5 too)
            np.testing.assert_array_equal(again[k], original[k])

    # ours -> theirs: an adapter made here loads in peft with the same logits
    made = _randomized(lorax.vera(params, rank=8, targets=targets, key=jax.random.key(1)), 4)
    assert jax.tree.structure(made) == jax.tree.structure(tree)  # (one compiled apply)
    lorax.export_peft(tmp_path / "ours", made, model=model)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 8 and config["save_projection"]
    loaded = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "ours").eval()
    np.testing.assert_allclose(ours(made), theirs(loaded), rtol=1e-4, atol=1e-4)

    # leaves that do not share one pair have no peft form
    mixed = jax.tree.map(
        lambda x: x.replace(a=x.a * 2) if x is made["ScanLayers"]["attn"]["c_attn"]["kernel"]
        else x,
        made,
        is_leaf=lorax.is_lorax_leaf,
    )  # fmt: skip
    with pytest.raises(LoraxValueError, match="not slices of the pair"):
        lorax.export_peft(tmp_path / "mixed", mixed, model="gpt2")
    # a file whose projections are too narrow for the model is refused by name
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :64]
    from safetensors.numpy import save_file

    save_file(tensors, tmp_path / "ours" / "adapter_model.safetensors")
    with pytest.raises(LoraxValueError, match="too small"):
        lorax.import_peft(tmp_path / "ours", params, model="gpt2")
