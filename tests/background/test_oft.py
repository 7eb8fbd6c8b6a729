"""OFT: the rotations against numpy float64 (the Cayley transform and peft's Neumann series),
orthogonality, the unmerged product against the merged weight (forward and gradients), the
zero init, what lorax.split trains, a checkpoint round trip, and adapters to and from
PyTorch peft on a tiny Llama, logit by logit; bad input.

Every check compiles once per case, at XLA's lowest optimization level (``FAST``): the
programs are tiny, so compiling is nearly all of their cost."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.methods.oft import OftWeight

HI = jax.lax.Precision.HIGHEST
FAST = {"xla_backend_optimization_level": 0}


# ------------------------------------------------------------------ numpy float64 reference
def _skew64(vec, b):
    q = np.zeros(vec.shape[:-1] + (b, b))
    rows, cols = np.triu_indices(b, 1)
    q[..., rows, cols] = vec
    return q - np.swapaxes(q, -1, -2)


def _rotations64(vec, b, *, neumann, terms=5, coft=False, eps=6e-5):
    vec = np.asarray(vec, np.float64)
    if coft:  # each block's Q into the Frobenius ball of radius eps / sqrt(n)
        radius = eps / np.sqrt(vec.shape[-2])
        norm = np.sqrt(2 * (vec**2).sum(-1, keepdims=True))
        vec = np.where(norm <= radius, vec, vec * radius / np.where(norm > 0, norm, 1))
    q = _skew64(vec, b)
    eye = np.eye(b)
    if not neumann:
        return (eye - q) @ np.linalg.inv(eye + q)
    # peft's series: I + 2Q + 2Q^2 [+ 2Q^3 ... + 2Q^(k-2)] + Q^(k-1); k = 3 stops at Q^3 too
    mp = lambda k: np.stack([np.linalg.matrix_power(m, k) for m in q])  # noqa: E731
    if terms == 1:
        return np.broadcast_to(eye, q.shape).copy()
    if terms == 2:
        return eye + 2 * q
    last = max(terms - 1, 3)
    return eye + sum(2 * mp(k) for k in range(1, last)) + mp(last)


def _merged64(w, vec, b, *, share=False, **kw):
    r = _rotations64(vec, b, **kw)
    n = w.shape[0] // b
    if share:
        r = np.repeat(r, n, axis=0)
    full = np.zeros((w.shape[0], w.shape[0]))
    for i in range(n):
        full[i * b : (i + 1) * b, i * b : (i + 1) * b] = r[i]
    return full @ np.asarray(w, np.float64)


@settings(max_examples=4, deadline=None)
@given(
    b=st.integers(2, 6),
    n=st.integers(1, 3),
    out=st.integers(1, 5),
    neumann=st.booleans(),
    terms=st.integers(1, 7),
    share=st.booleans(),
    coft=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_product_equals_numpy_float64_and_the_merged_weight(
    b, n, out, neumann, terms, share, coft, seed
):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n * b, out)).astype(np.float32)
    vec = rng.normal(0, 0.2, (1 if share else n, b * (b - 1) // 2)).astype(np.float32)
    x = rng.normal(size=(2, 3, n * b)).astype(np.float32)
    opts = dict(use_cayley_neumann=neumann, num_cayley_neumann_terms=terms, coft=coft, eps=0.1)
    leaf = OftWeight(jnp.asarray(w), jnp.asarray(vec), block_size=b, block_share=share, **opts)
    expected = x.astype(np.float64) @ _merged64(
        w, vec, b, share=share, neumann=neumann, terms=terms, coft=coft, eps=0.1
    )
    f = lambda wt, x: jnp.einsum("bsi,io->bso", x, wt, precision=HI)  # noqa: E731
    dn = (((0,), (1,)), ((), ()))  # the leaf as the lhs, contracted over its input axis
    g = lambda wt, y: jax.lax.dot_general(wt, y, dn, precision=HI)  # noqa: E731
    y = jnp.asarray(rng.normal(size=(2, n * b)), jnp.float32)

    def loss(v, merged):
        lf = leaf.replace(weight=v)
        out = f(lf.materialize(), x) if merged else lorax.lora(f)(lf, jnp.asarray(x))
        return jnp.sum(jnp.sin(out))

    @jax.jit(compiler_options=FAST)
    def run(v):
        lf = leaf.replace(weight=v)
        return (
            lorax.lora(f)(lf, x),
            f(lf.materialize(), x),
            lorax.lora(g)(lf, y),
            g(lf.materialize(), y),
            jax.grad(loss)(v, False),
            jax.grad(loss)(v, True),
        )

    ours, merged, ours_t, merged_t, g_unmerged, g_merged = run(jnp.asarray(vec))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_t, merged_t, rtol=1e-4, atol=1e-4)
    # gradients through the rotation: unmerged == merged (COFT: straight-through, both)
    np.testing.assert_allclose(g_unmerged, g_merged, rtol=1e-4, atol=1e-4)
    if not (neumann and terms == 1):  # one term: R = I whatever the parameters
        assert float(jnp.abs(g_merged).max()) > 0


@settings(max_examples=2, deadline=None)
@given(b=st.integers(2, 8), n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_exact_cayley_rotation_is_orthogonal(b, n, seed):
    vec = np.random.default_rng(seed).normal(0, 1.0, (n, b * (b - 1) // 2))
    w = np.random.default_rng(seed + 1).normal(size=(n * b, 3))
    leaf = OftWeight(jnp.asarray(w, jnp.float32), jnp.asarray(vec, jnp.float32), block_size=b,
                     use_cayley_neumann=False)  # fmt: skip
    rotations, merged = jax.jit(lambda lf: (lf.rotations(), lf.materialize()),
                                compiler_options=FAST)(leaf)  # fmt: skip
    ours = np.asarray(rotations, np.float64)
    eye = np.eye(b)
    np.testing.assert_allclose(ours @ np.swapaxes(ours, -1, -2), np.broadcast_to(eye, ours.shape),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(ours, _rotations64(vec, b, neumann=False), atol=1e-5)
    # the merged weight keeps the column norms of W (an orthogonal map of the input space)
    merged = np.asarray(merged, np.float64)
    np.testing.assert_allclose(np.linalg.norm(merged, axis=0), np.linalg.norm(w, axis=0),
                               rtol=1e-5)  # fmt: skip


# --------------------------------------------------------------------- constructor, tree
def _params():
    rng = np.random.default_rng(0)
    return {
        "q": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
        "v": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)},
        "norm": {"scale": jnp.ones(8)},
    }


def _apply(p, x):
    return jnp.tanh(x @ p["q"]["kernel"]).sum(-1, keepdims=True) * (x @ p["v"]["kernel"])


@jax.jit(compiler_options=FAST)
def _unmerged_merged_base(tree, params, x):
    """``_apply`` on the OFT tree (through lorax.lora), on its merged weights, on the base."""
    return lorax.lora(_apply)(tree, x), _apply(lorax.merge(tree), x), _apply(params, x)


def test_starts_as_the_base_and_trains_only_the_rotations(tmp_path):
    params = _params()
    tree = lorax.oft(params, targets=["q", "v"], block_size=4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8)), jnp.float32)
    unmerged, merged, base = _unmerged_merged_base(tree, params, x)
    np.testing.assert_array_equal(unmerged, base)
    np.testing.assert_array_equal(merged, base)
    trainable, frozen = lorax.split(tree)
    shapes = {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(trainable)}
    assert sorted(shapes.values()) == [(2, 6), (2, 6)]  # 2 blocks of 4: 4*3/2 entries each
    assert all(jax.tree_util.keystr(k).endswith(".weight") for k in shapes), shapes
    assert lorax.summary(tree).trainable == 24

    # a trained tree: save, load against the base, same values and outputs
    filled = jax.tree.map(lambda a: a + 0.1, trainable)
    trained = lorax.combine(filled, frozen)
    lorax.save(tmp_path / "ckpt", trained)
    back = lorax.load(tmp_path / "ckpt", params)
    assert isinstance(back["q"]["kernel"], lorax.OftWeight)
    assert back["q"]["kernel"].block_size == 4
    np.testing.assert_array_equal(back["q"]["kernel"].weight, trained["q"]["kernel"].weight)
    unmerged, merged, base = _unmerged_merged_base(back, params, x)  # the same compiled call
    np.testing.assert_allclose(unmerged, merged, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(merged - base)).max() > 1e-3


def test_r_gives_the_block_count_and_module_dropout_drops_whole_blocks():
    tree = lorax.oft(_params(), targets=["q"], r=4, module_dropout=0.5)
    leaf = tree["q"]["kernel"]
    assert leaf.block_size == 2 and leaf.weight.shape == (4, 1)
    leaf = leaf.replace(weight=jnp.full((4, 1), 0.3))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 8)), jnp.float32)
    rotate = jax.jit(lambda lf, x, key: (lf.rotate(x, 1, key), lf.rotate(x, 1)),
                     compiler_options=FAST)  # fmt: skip
    dropped, kept = rotate(leaf, x, jax.random.key(3))
    same = np.all(np.isclose(np.asarray(dropped).reshape(5, 4, 2), np.asarray(x).reshape(5, 4, 2)),
                  axis=(0, 2))  # fmt: skip
    assert same.sum() == 2  # int(0.5 * 4) blocks are the identity, the others rotate
    assert not np.allclose(kept, x)  # no key: no dropout


def test_bad_input_names_the_path_and_what_was_expected():
    p = _params()
    with pytest.raises(LoraxValueError, match=r"block_size=3 does not divide .*8.*'q/kernel'"):
        lorax.oft(p, targets=["q"], block_size=3)
    with pytest.raises(LoraxValueError, match="not both"):
        lorax.oft(p, targets=["q"], block_size=4, r=2)
    with pytest.raises(LoraxValueError, match="at least 2"):
        lorax.oft(p, targets=["q"], block_size=1)
    with pytest.raises(LoraxValueError, match="r=3 .*'q/kernel'"):
        lorax.oft(p, targets=["q"], r=3)
    with pytest.raises(LoraxTypeError, match="coft must be True or False"):
        lorax.oft(p, targets=["q"], block_size=4, coft=1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(LoraxValueError, match="eps must be a positive"):
        lorax.oft(p, targets=["q"], block_size=4, eps=0.0)
    with pytest.raises(LoraxValueError, match="module_dropout"):
        lorax.oft(p, targets=["q"], block_size=4, module_dropout=1.0)
    with pytest.raises(LoraxValueError, match="2-D kernel"):
        lorax.oft({"c": {"kernel": jnp.ones((3, 4, 4, 2))}}, targets=["c"], block_size=2)
    with pytest.raises(LoraxValueError):
        lorax.oft(p, targets=["nothing"], block_size=4)
    with pytest.raises(TypeError, match="positional"):
        lorax.oft(p, ["q"])  # type: ignore[misc]
    leaf = lorax.oft(p, targets=["q"], block_size=4)["q"]["kernel"]
    assert "weight" in leaf.replace(weight=jnp.zeros((3, 6))).misfit()


# ------------------------------------------------------------------------- PyTorch peft
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    from test_models import _hf_llama

    directory = tmp_path_factory.mktemp("llama")
    _hf_llama(num_hidden_layers=1).save_pretrained(directory)
    return directory


def _torch_base(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_adapters_to_and_from_peft_llama(llama_base, tmp_path):
    from safetensors.numpy import load_file
    from test_models import _tokens

    from lorax.models import llama

    ids = _tokens(2, 7, seed=3)
    # peft -> lorax: random rotations (init_weights=False), Cayley-Neumann (peft's default)
    torch.manual_seed(0)
    config = peft.OFTConfig(
        oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False
    )
    theirs_model = peft.get_peft_model(_torch_base(llama_base), config).eval()
    theirs_model.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(ids)).logits.numpy()
        base = _torch_base(llama_base)(torch.tensor(ids)).logits.numpy()
    model, params = llama.from_pretrained(llama_base, scan_layers=True)
    tree = lorax.import_peft(tmp_path / "theirs", params, model="llama")
    leaf = tree["ScanLayers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(leaf, lorax.OftWeight) and leaf.weight.shape == (1, 6, 28)  # scanned
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lorax.lora(model.apply), compiler_options=FAST)(
            {"params": tree}, ids))  # fmt: skip
    assert np.abs(ours - base).max() > 1e-2  # the rotations matter
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    lorax.export_peft(tmp_path / "again", tree, model="llama")  # and back, bit for bit
    again, original = (load_file(tmp_path / d / "adapter_model.safetensors")
                       for d in ("again", "theirs"))  # fmt: skip
    assert sorted(again) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(again[k], original[k])

    # lorax -> peft: exact Cayley, r blocks per module, COFT; unscanned
    model, params = llama.from_pretrained(llama_base, scan_layers=False)
    made = lorax.oft(params, targets=["k_proj", "down_proj"], r=4, use_cayley_neumann=False,
                     coft=True, eps=0.5)  # fmt: skip
    trainable, frozen = lorax.split(made)
    rng = np.random.default_rng(4)
    trainable = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype),
                             trainable)  # fmt: skip
    made = lorax.combine(trainable, frozen)
    lorax.export_peft(tmp_path / "ours", made, model="llama")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (written["peft_type"], written["r"], written["oft_block_size"]) == ("OFT", 4, 0)
    loaded = peft.PeftModel.from_pretrained(_torch_base(llama_base), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = loaded(torch.tensor(ids)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lorax.lora(model.apply), compiler_options=FAST)(
            {"params": made}, ids))  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_peft_interop_refusals(tmp_path):
    from lorax.models import gpt2

    tree = {"h_0": {"attn": {"c_attn": {"kernel": jnp.ones((32, 96))}}}}
    made = lorax.oft(tree, targets=["c_attn"], block_size=8)
    with pytest.raises(LoraxValueError, match="Conv1D"):
        lorax.export_peft(tmp_path / "gpt2", made, model=gpt2.peft_modules(tree))
    p = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((8, 4))}}
    mixed = lorax.oft(p, targets=["a"], block_size=4)
    mixed = lorax.oft(mixed, targets=["b"], block_size=4, coft=True)
    names = {"a/kernel": "a", "b/kernel": "b"}
    with pytest.raises(LoraxValueError, match="one set of options"):
        lorax.export_peft(tmp_path / "mixed", mixed, model=names)
    lorax.export_peft(tmp_path / "ok", lorax.oft(p, targets=["a"], block_size=4), model=names)
    with pytest.raises(LoraxValueError, match=r"'a.oft_R.weight'.*needs"):
        lorax.import_peft(tmp_path / "ok", {"a": {"kernel": jnp.ones((6, 4))}},
                          model={"a/kernel": "a"})  # fmt: skip
