"""lora(apply)(wrapped) equals apply(merge(wrapped)) for the layers Flax users write."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import check_lora_equals_merged, randomize_b

import lorax

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

KEY = jax.random.key(0)


def _wrap(variables, **kw):
    kw.setdefault("rank", 3)
    kw.setdefault("alpha", 6.0)
    lp = lorax.wrap(variables, key=jax.random.key(1), **kw)
    return randomize_b(lp, jax.random.key(2))


class DenseGeneralModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [b, s, 12]
        h = nn.DenseGeneral((3, 4), name="split_heads")(x)  # kernel (12, 3, 4)
        h = nn.DenseGeneral(10, axis=(-2, -1), name="merge_heads")(h)  # kernel (3, 4, 10)
        return nn.DenseGeneral((2, 5), axis=-1, use_bias=False, name="nobias")(h)


class EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # [b, s, 6]
        h = nn.Einsum((6, 2, 5), "bsd,dhk->bshk", name="proj")(x)
        return nn.Einsum((2, 5, 7), "bshk,hko->bso", name="out")(h)


class ConvModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # [b, h, w, 3]
        x = nn.Conv(8, (3, 3), name="c1")(x)
        x = nn.relu(x)
        x = nn.Conv(6, (3, 3), strides=(2, 2), padding="VALID", name="c2")(x)
        return nn.Conv(4, (1,), name="c3")(x.reshape(x.shape[0], -1, x.shape[-1]))


class EmbedModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(50, 12, name="embed")
        h = emb(ids)
        h = nn.Dense(12, name="mlp")(h)
        return emb.attend(h)  # tied LM head: the embedding used transposed


class AttentionModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name="attn")(
            x, mask=mask
        )


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        h = nn.Dense(24, name="up")(h)
        h = nn.gelu(h)
        return x + nn.Dense(8, name="down")(h), None


class ScanModel(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="ScanBlocks")(x, None)
        return nn.Dense(5, name="head")(x)


class RematModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.remat(Block, policy=jax.checkpoint_policies.nothing_saveable)()(x, None)
        x, _ = nn.remat(Block)()(x, None)
        return x


def _linen_case(model, x, **wrap_kw):
    variables = jax.jit(model.init)(KEY, x)
    lp = _wrap(variables, **wrap_kw)
    return check_lora_equals_merged(model.apply, lp, x)


def test_dense():
    _linen_case(nn.Dense(7), jnp.linspace(-1, 1, 30).reshape(2, 3, 5))


def test_dense_general_3d_and_multi_axis_kernels():
    x = jax.random.normal(KEY, (2, 3, 12))
    variables = jax.jit(DenseGeneralModel().init)(KEY, x)
    lp = _wrap(variables)
    p = lp["params"]
    assert p["split_heads"]["kernel"].a.shape == (12, 3)  # in = (12,)
    assert p["split_heads"]["kernel"].b.shape == (3, 3, 4)  # out = (3, 4)
    assert p["merge_heads"]["kernel"].a.shape == (3, 4, 3)  # in = (3, 4)
    assert p["merge_heads"]["kernel"].b.shape == (3, 10)
    check_lora_equals_merged(DenseGeneralModel().apply, lp, x)


def test_einsum():
    _linen_case(EinsumModel(), jax.random.normal(KEY, (2, 3, 6)))


def test_conv():
    x = jax.random.normal(KEY, (2, 9, 9, 3))
    variables = jax.jit(ConvModel().init)(KEY, x)
    lp = _wrap(variables)
    assert lp["params"]["c1"]["kernel"].a.shape == (3, 3, 3, 3)  # (kh, kw, in, r)
    check_lora_equals_merged(ConvModel().apply, lp, x)


def test_embed_lookup_and_tied_head():
    ids = jax.random.randint(KEY, (2, 7), 0, 50)
    model = EmbedModel()
    variables = jax.jit(model.init)(KEY, ids)
    lp = _wrap(variables, targets=r".*(embedding|kernel)")
    assert isinstance(lp["params"]["embed"]["embedding"], lorax.LoraWeight)
    check_lora_equals_merged(model.apply, lp, ids)


def test_default_targets_skip_embeddings():
    ids = jnp.zeros((1, 3), jnp.int32)
    lp = lorax.wrap(jax.jit(EmbedModel().init)(KEY, ids))
    assert not lorax.is_lorax_leaf(lp["params"]["embed"]["embedding"])
    assert lorax.is_lorax_leaf(lp["params"]["mlp"]["kernel"])


def test_multi_head_attention():
    _linen_case(AttentionModel(), jax.random.normal(KEY, (2, 5, 16)))


@pytest.mark.parametrize("remat", [False, True])
def test_scan_stack(remat):
    x = jax.random.normal(KEY, (2, 4, 8))
    model = ScanModel(remat=remat)
    variables = jax.jit(model.init)(KEY, x)
    lp = _wrap(variables)
    up = lp["params"]["ScanBlocks"]["up"]["kernel"]
    assert up.a.shape == (3, 8, 3) and up.b.shape == (3, 3, 24)  # one pair per layer
    plain = lorax.wrap(variables, rank=3)["params"]["ScanBlocks"]["up"]["kernel"]
    assert plain.base is variables["params"]["ScanBlocks"]["up"]["kernel"]  # never copied
    check_lora_equals_merged(model.apply, lp, x)


def test_scan_stack_named_by_user_needs_stacked_hint():
    x = jax.random.normal(KEY, (2, 4, 8))

    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
            )
            return stack(name="layers")(x, None)[0]

    variables = jax.jit(Named().init)(KEY, x)
    lp = _wrap(variables, stacked=r".*layers/.*")
    assert lp["params"]["layers"]["down"]["kernel"].stack_ndim == 1
    check_lora_equals_merged(Named().apply, lp, x)


def test_remat_keeps_policy():
    x = jax.random.normal(KEY, (2, 4, 8))
    model = RematModel()
    lp = _wrap(jax.jit(model.init)(KEY, x))
    check_lora_equals_merged(model.apply, lp, x)
    jaxpr = jax.make_jaxpr(lorax.lora(model.apply))(lp, x)
    policies = [e.params["policy"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "remat2"]
    assert jax.checkpoint_policies.nothing_saveable in policies


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(6, 8, rngs=rngs)
        self.gen = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)

    def __call__(self, x, img):
        h = self.gen(self.lin(x))
        return h, self.conv(img)


def test_nnx_split_merge():
    graphdef, state = nnx.split(NnxModel(nnx.Rngs(0)))
    lp = _wrap(state)
    assert lorax.is_lorax_leaf(lp["lin"]["kernel"].value)

    def apply(state, x, img):
        return nnx.merge(graphdef, state)(x, img)

    x = jax.random.normal(KEY, (3, 6))
    img = jax.random.normal(KEY, (1, 5, 5, 2))
    check_lora_equals_merged(apply, lp, x, img)


def test_zero_b_is_identity():
    x = jax.random.normal(KEY, (2, 4, 8))
    model = ScanModel()
    variables = jax.jit(model.init)(KEY, x)
    lp = lorax.wrap(variables, rank=2)
    out = lorax.lora(model.apply)(lp, x)
    ref = model.apply(variables, x)
    assert jnp.array_equal(out, ref) or jnp.allclose(out, ref, rtol=1e-6, atol=1e-6)
