"""LoHa and LoKr: the leaves against the merged dense model and a float64 numpy formula of
peft's delta, peft's own LoKr layout rules (factorization, decompose_both, the rank rule),
split / save / load, training-time dropouts, peft interop both ways on a tiny Llama
(logit by logit against PyTorch peft), and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_lora_equals_merged
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
import lorax.io.peft
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.methods.hadamard_kron import factorization, lokr_layout

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402


def _randomized(tree, seed, scale=0.3):
    """Every LoHa / LoKr factor drawn from N(0, scale^2) (numpy), so the delta matters."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if not isinstance(x, (lorax.LohaWeight, lorax.LokrWeight)):
            return x
        new = {}
        for n in x.trainable_fields:
            v = getattr(x, n)
            if v is not None:
                new[n] = jnp.asarray((scale * rng.normal(size=v.shape)).astype(np.float32))
        return x.replace(**new)

    return jax.tree.map(fill, tree, is_leaf=lorax.is_lorax_leaf)


def _numpy_delta(leaf):
    """peft's formula in float64 on the factors in torch's [out, in] layout, per layer,
    transposed back to [in, out] and reshaped to the weight."""
    ns = leaf.stack_ndim
    stack = leaf.shape[:ns]
    out = np.zeros((int(np.prod(stack, dtype=int)), leaf.fan_in, leaf.fan_out))
    for layer in range(out.shape[0]):

        def at(x, layer=layer):
            x = np.asarray(x, np.float64)
            return x.reshape((-1,) + x.shape[ns:])[layer]

        if isinstance(leaf, lorax.LohaWeight):
            w1a, w1b = at(leaf.b1).T, at(leaf.a1).T  # hada_w1_a [out, r], hada_w1_b
            w2a, w2b = at(leaf.b2).T, at(leaf.a2).T
            torch_delta = (w1a @ w1b) * (w2a @ w2b)
        else:
            parts = []
            for w, b in ((leaf.w1, leaf.w1_b), (leaf.w2, leaf.w2_b)):
                w = at(w)  # lokr_w, or lokr_w_a @ lokr_w_b
                parts.append(w.T if b is None else at(b).T @ w.T)
            torch_delta = np.kron(*parts)
        out[layer] = leaf.scale * torch_delta.T
    return out.reshape(leaf.shape)


# ------------------------------------------------------------------- the leaves themselves
def _model(params, x):
    """A 2-D kernel, a per-head 3-D kernel (DenseGeneral) and a scanned layer stack."""
    h = jnp.tanh(x @ params["proj"]["kernel"])  # (n, 6) @ (6, 8)
    heads = jnp.einsum("nd,dhk->nhk", h, params["heads"]["kernel"])  # (8, 2, 4)
    h = h + 0.5 * heads.reshape(h.shape)

    def layer(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, h, params["stack"]["kernel"])  # (2, 8, 8)
    return h


def _params():
    rng = np.random.default_rng(0)
    draw = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) / 3)  # noqa: E731
    return {
        "proj": {"kernel": draw(6, 8)},
        "heads": {"kernel": draw(8, 2, 4)},
        "stack": {"kernel": draw(2, 8, 8)},
    }


def _targets(path, leaf):
    if "stack" in path:
        return lorax.LoraSpec(stack_axes=1)
    return lorax.LoraSpec(in_axes=1) if "heads" in path else True


def _mixed(p):
    """LoKr with both factors decomposed on ``proj`` (6 = 3 * 2 and 8 = 2 * 4 under factor
    3; the factored product, never the
    delta), LoHa on the 3-D ``heads`` kernel (the delta product), LoKr with both factors
    full on the scanned ``stack`` (sliced per layer by lax.scan)."""
    t = lorax.lokr(p, rank=1, alpha=3, factor=3, decompose_both=True, targets=["proj"])
    t = lorax.loha(
        t, rank=2, alpha=3, targets=lambda path, x: "heads" in path and _targets(path, x)
    )
    return lorax.lokr(
        t, rank=4, alpha=3, factor=2, targets=lambda path, x: "stack" in path and _targets(path, x)
    )


MAKERS = {"loha": lambda p: lorax.loha(p, rank=2, alpha=3, targets=_targets), "mixed": _mixed}


def test_unmerged_equals_merged_and_the_numpy_formula():
    tree = _mixed(_params())
    leaves = [tree[k]["kernel"] for k in ("proj", "heads", "stack")]
    assert [type(x).__name__ for x in leaves] == ["LokrWeight", "LohaWeight", "LokrWeight"]
    assert leaves[0].w1_b is not None and leaves[0].w2_b is not None  # decomposed
    assert leaves[2].w1_b is None and leaves[2].w2_b is None  # full
    zero = jax.jit(lorax.merge)(tree)  # peft's init: the update starts at zero
    for path in ("proj", "heads", "stack"):
        np.testing.assert_array_equal(zero[path]["kernel"], _params()[path]["kernel"])
    tree = _randomized(tree, 1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32))
    with jax.default_matmul_precision("highest"):
        check_lora_equals_merged(_model, tree, x, rtol=1e-5, atol=1e-5)
    merged = jax.jit(lorax.merge)(tree)
    for path in ("proj", "heads", "stack"):
        leaf = tree[path]["kernel"]
        want = np.asarray(_params()[path]["kernel"], np.float64) + _numpy_delta(leaf)
        np.testing.assert_allclose(merged[path]["kernel"], want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    fan_in=st.integers(2, 40),
    fan_out=st.integers(2, 40),
    rank=st.integers(1, 9),
    factor=st.sampled_from([-1, 1, 2, 3, 4, 8]),
    both=st.booleans(),
)
def test_lokr_layout_is_peft_s(fan_in, fan_out, rank, factor, both):
    """The factor shapes peft's own LoKr layer builds, from lorax's rules."""
    assert factorization(fan_in, factor) == peft_factorization(fan_in, factor)
    config = peft.LoKrConfig(r=rank, alpha=2, decompose_both=both, decompose_factor=factor)
    layer = peft.tuners.lokr.layer.Linear(
        torch.nn.Linear(fan_in, fan_out), "default", config, r=rank, alpha=2
    )
    theirs = {
        n: tuple(getattr(layer, n)["default"].shape)
        for n in layer.adapter_layer_names
        if "default" in getattr(layer, n)
    }
    (i1, i2), (o1, o2), w1_full, w2_full = lokr_layout(
        fan_in, fan_out, rank=rank, factor=factor, decompose_both=both
    )
    ours = {}
    for i, ii, oo, full in (("1", i1, o1, w1_full), ("2", i2, o2, w2_full)):
        if full:
            ours[f"lokr_w{i}"] = (oo, ii)
        else:
            ours[f"lokr_w{i}_a"], ours[f"lokr_w{i}_b"] = (oo, rank), (rank, ii)
    assert ours == theirs


@settings(max_examples=12, deadline=None)
@given(
    shape=st.sampled_from([(4, 6), (6, 4), (8, 9), (12, 10), (2, 3, 4)]),
    rank=st.integers(1, 5),
    factor=st.sampled_from([-1, 2, 3]),
    both=st.booleans(),
    seed=st.integers(0, 3),
)
def test_lokr_merge_is_the_kronecker_formula(shape, rank, factor, both, seed):
    """A leaf of each layout (full or decomposed factors, stacked or not), built from
    lokr_layout without the jitted init, merged against numpy's kron in float64."""
    rng = np.random.default_rng(seed)
    stack, (i, o) = shape[:-2], shape[-2:]
    (i1, i2), (o1, o2), w1_full, w2_full = lokr_layout(
        i, o, rank=rank, factor=factor, decompose_both=both
    )
    draw = lambda *s: jnp.asarray(rng.normal(size=stack + s).astype(np.float32))  # noqa: E731
    w1, w1_b = (draw(i1, o1), None) if w1_full else (draw(i1, rank), draw(rank, o1))
    w2, w2_b = (draw(i2, o2), None) if w2_full else (draw(i2, rank), draw(rank, o2))
    leaf = lorax.LokrWeight(jnp.zeros(shape), w1, w1_b, w2, w2_b, scale=1.5, rank=rank)
    assert leaf.misfit() is None
    np.testing.assert_allclose(leaf.materialize(), _numpy_delta(leaf), rtol=1e-5, atol=1e-5)


def test_only_the_factors_are_trainable_and_checkpoints_round_trip(tmp_path):
    for name in ("loha", "mixed"):
        tree = _randomized(MAKERS[name](_params()), 3)
        trainable, frozen = lorax.split(tree)
        leaf = tree["proj"]["kernel"]
        want = [
            getattr(leaf, n).shape for n in leaf.trainable_fields if getattr(leaf, n) is not None
        ]
        assert [x.shape for x in jax.tree.leaves(trainable["proj"])] == want
        assert all(x is None for x in jax.tree.leaves(frozen["proj"]["kernel"].replace(base=None)))
        assert jax.tree.structure(lorax.combine(trainable, frozen)) == jax.tree.structure(tree)
        lorax.save(tmp_path / name, tree)
        back = lorax.load(tmp_path / name, _params())
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(LoraxValueError, match="combined tree"):
            lorax.save(tmp_path / f"{name}-half", frozen)


def test_training_dropouts_follow_peft():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32))
    f = lambda p, x: x @ p["w"]  # noqa: E731
    for make, rescaled in (
        (lambda p: lorax.loha(p, rank=2, rank_dropout=0.5), True),
        (lambda p: lorax.lokr(p, rank=2, rank_dropout=0.5), False),
        (lambda p: lorax.lokr(p, rank=2, rank_dropout=0.5, rank_dropout_scale=True), True),
    ):
        tree = _randomized(make({"w": w}), 4)
        delta = np.asarray(x, np.float64) @ _numpy_delta(tree["w"])
        with jax.default_matmul_precision("highest"):
            assert np.allclose(lorax.lora(f)(tree, x), np.asarray(x @ w) + delta, atol=1e-4)
            got = lorax.lora(f)(tree, x, dropout_rng=jax.random.key(7))
        d = np.asarray(got - x @ w, np.float64)
        kept = ~np.all(np.abs(d) < 1e-6, axis=0)
        assert 0 < kept.sum() < 8  # some output features dropped, some kept
        factor = 8 / kept.sum() if rescaled else 1.0
        np.testing.assert_allclose(d[:, kept], factor * delta[:, kept], rtol=1e-4, atol=1e-4)
    tree = _randomized(lorax.lokr({"w": w}, rank=2, module_dropout=0.5), 4)
    run = jax.jit(jax.vmap(lambda k: lorax.lora(f)(tree, x, dropout_rng=k)))
    skipped = np.all(np.isclose(run(jax.random.split(jax.random.key(0), 8)), x @ w), (1, 2))
    assert 0 < skipped.sum() < 8  # the whole delta skipped in some steps only


# --------------------------------------------------------------- peft interop on Llama
def _logits(apply, tree, ids):
    with jax.default_matmul_precision("highest"):
        return np.asarray(apply({"params": tree}, ids))


@pytest.mark.parametrize("kind", ["LOHA", "LOKR"])
def test_adapters_to_and_from_peft_llama(tmp_path, kind):
    import transformers
    from test_models import _hf_llama, _tokens

    from lorax.models import llama

    base_dir = tmp_path / "base"
    _hf_llama().save_pretrained(base_dir)
    base = lambda: transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()  # noqa: E731
    targets = ["q_proj", "k_proj", "down_proj"]
    if kind == "LOHA":
        config = peft.LoHaConfig(
            r=2, alpha=3, target_modules=targets, rank_pattern={"k_proj": 3}, init_weights=False
        )
    else:  # q_proj: both factors full; k_proj (r=1): both decomposed
        config = peft.LoKrConfig(
            r=4,
            alpha=3,
            target_modules=targets,
            decompose_both=True,
            rank_pattern={"k_proj": 1},
            alpha_pattern={"down_proj": 5},
            init_weights=False,
        )
    torch.manual_seed(0)
    torch_model = peft.get_peft_model(base(), config).eval()
    torch_model.save_pretrained(tmp_path / "theirs")
    ids = _tokens(2, 7, seed=3)
    with torch.no_grad():
        theirs = torch_model(torch.tensor(ids)).logits.numpy()
        plain = base()(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - plain).max() > 1e-2  # the adapter matters

    scan = kind == "LOKR"
    model, params = llama.from_pretrained(base_dir, scan_layers=scan)
    apply = jax.jit(lorax.lora(model.apply, strict=True))  # one compilation: both trees
    tree = lorax.import_peft(tmp_path / "theirs", params, model="llama")
    cls = lorax.LohaWeight if kind == "LOHA" else lorax.LokrWeight
    leaves = [x for x in jax.tree.leaves(tree, is_leaf=lorax.is_lorax_leaf) if isinstance(x, cls)]
    assert len(leaves) == (3 if scan else 6)
    np.testing.assert_allclose(_logits(apply, tree, ids), theirs, rtol=1e-4, atol=1e-4)

    # back out: the same tensors and config peft wrote
    lorax.export_peft(tmp_path / "again", tree, model="llama")
    from safetensors.numpy import load_file

    again, original = (
        load_file(tmp_path / d / "adapter_model.safetensors") for d in ("again", "theirs")
    )
    assert sorted(again) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(again[k], original[k])
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == kind and cfg["rank_pattern"] == {
        n: v for n, v in cfg["rank_pattern"].items() if "k_proj" in n
    }

    # an adapter trained here (other values) loads in peft with the same logits
    ours_tree = _randomized(tree, 9)
    lorax.export_peft(tmp_path / "ours", ours_tree, model="llama")
    loaded = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = loaded(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(apply, ours_tree, ids), theirs, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_the_path(tmp_path):
    p = _params()
    for make in (lorax.loha, lorax.lokr):
        with pytest.raises(LoraxValueError, match="rank must be a positive int; got 0"):
            make(p, rank=0)
        with pytest.raises(LoraxTypeError, match="rank must be a positive int"):
            make(p, rank=True)
        with pytest.raises(LoraxValueError, match="proj/kernel"):  # names what exists
            make(p, targets=["nothing"])
        with pytest.raises(LoraxValueError, match="rank_dropout must be in"):
            make(p, rank_dropout=1.0)
    with pytest.raises(LoraxValueError, match="factor must be -1 or a positive int; got 0"):
        lorax.lokr(p, factor=0)
    with pytest.raises(LoraxTypeError, match="decompose_both must be True or False"):
        lorax.lokr(p, decompose_both="yes")  # pyright: ignore[reportArgumentType]
    with pytest.raises(LoraxValueError, match="'heads/kernel' of shape"):
        lorax.loha(
            p, targets=lambda path, x: lorax.LoraSpec(stack_axes=2) if "heads" in path else False
        )

    # a mismatched factor is refused by path
    tree = MAKERS["mixed"](p)
    trainable, frozen = lorax.split(tree)
    trainable["proj"]["kernel"] = trainable["proj"]["kernel"].replace(w2=jnp.zeros((5, 1)))
    with pytest.raises(LoraxValueError, match="at 'proj/kernel'.*do not fit"):
        lorax.combine(trainable, frozen)

    # peft: no LoHa / LoKr on GPT-2's Conv1D, no 3-D kernels, no mixed kinds
    one = {"proj": {"kernel": p["proj"]["kernel"]}}
    leafy = lorax.loha(one, rank=2)
    gpt2_like = lorax.io.peft.PeftModuleMap(modules={"proj/kernel": "proj"}, fan_in_fan_out=True)
    with pytest.raises(LoraxValueError, match="fan_in_fan_out.*Conv1D"):
        lorax.export_peft(tmp_path / "a", leafy, model=gpt2_like)
    heads = lorax.lokr({"heads": {"kernel": p["heads"]["kernel"]}}, rank=2, targets=_targets)
    with pytest.raises(LoraxValueError, match="2-D Linear weights"):
        lorax.export_peft(tmp_path / "b", heads, model={"heads/kernel": "heads"})
    mixed = {**leafy, "other": lorax.lokr({"k": p["proj"]["kernel"]}, rank=2)}
    with pytest.raises(LoraxValueError, match="holds no other kind"):
        lorax.export_peft(tmp_path / "c", mixed, model={"proj/kernel": "p", "other/k": "o"})

    # a file whose shapes peft's rules would not build, and conv factors
    lorax.export_peft(tmp_path / "d", lorax.lokr(one, rank=2), model={"proj/kernel": "proj"})
    cfg_file = tmp_path / "d" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "decompose_factor": 3}))
    with pytest.raises(LoraxValueError, match="proj.lokr_w1' .* has shape"):
        lorax.import_peft(tmp_path / "d", one, model={"proj/kernel": "proj"})
    cfg_file.write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(LoraxValueError, match="r must be a positive int"):
        lorax.import_peft(tmp_path / "d", one, model={"proj/kernel": "proj"})
