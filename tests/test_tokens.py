"""lorax.trainable_tokens: a few rows of an embedding table trainable; the lookups and the
tied head against the merged dense table (outputs and gradients)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.methods.tokens import TrainableTokensWeight
from lorax.models import gpt2, llama

GPT2 = gpt2.GPT2(gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
GPT2_PARAMS = GPT2.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
LLAMA = llama.Llama(
    llama.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
)
LLAMA_PARAMS = LLAMA.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
IDS = jnp.array([[3, 1, 60, 5, 3, 63], [0, 60, 60, 2, 9, 3]])


def _perturbed(tree, key):
    """The tree with random deltas (a trained state), so that the rows differ."""

    def move(x):
        if isinstance(x, TrainableTokensWeight):
            return x.replace(delta=x.delta + jax.random.normal(key, x.delta.shape))
        return x

    return jax.tree.map(move, tree, is_leaf=lambda x: isinstance(x, TrainableTokensWeight))


def _check(model, tree, ids):
    """Logits and the gradient of delta equal the merged dense model's (its table rows')."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorax.LoraxDensifyWarning)  # never forms the table
        trainable, frozen = lorax.split(tree)
        apply = lorax.lora(model.apply)
        loss = lambda t: _loss(apply({"params": lorax.combine(t, frozen)}, ids))  # noqa: E731
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    dense = lorax.merge(tree)
    dense_loss = lambda p: _loss(model.apply({"params": p}, ids))  # noqa: E731
    (_, want), dense_grads = jax.jit(jax.value_and_grad(dense_loss, has_aux=True))(dense)
    np.testing.assert_allclose(out, want, atol=2e-5)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, TrainableTokensWeight)
    )[0]:
        if isinstance(leaf, TrainableTokensWeight):
            g = _at(grads, path).delta
            want = _at(dense_grads, path)[np.asarray(leaf.token_ids)]
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def _loss(logits):
    return (logits**2).mean(), logits


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_tied_table_equals_the_merged_model():
    """GPT-2 ties its head to wte: the lookup and h @ E.T both see the trained rows (the
    first and last rows included, and a row the input never looks up)."""
    tree = lorax.trainable_tokens(GPT2_PARAMS, targets=["wte"], token_ids=[63, 3, 0, 40])
    _check(GPT2, _perturbed(tree, jax.random.key(4)), IDS)


def test_untied_table_and_nf4_base():
    tree = lorax.trainable_tokens(LLAMA_PARAMS, targets=["embed_tokens"], token_ids=[60, 3])
    _check(LLAMA, _perturbed(tree, jax.random.key(1)), IDS)
    # float32 compute: a bfloat16 table would round the trained rows when merged only
    q = lorax.quantize(LLAMA_PARAMS, "nf4", targets=["embed_tokens"], compute_dtype=jnp.float32)
    tree = lorax.trainable_tokens(q, targets=["embed_tokens"], token_ids=[60, 3])
    leaf = tree["embed_tokens"]["embedding"]
    assert isinstance(leaf.base, lorax.NF4Weight)
    dense_rows = lorax.merge(q)["embed_tokens"]["embedding"][jnp.array([60, 3])]
    np.testing.assert_array_equal(leaf.delta, dense_rows)  # starts as the rows it replaces
    _check(LLAMA, _perturbed(tree, jax.random.key(2)), IDS)


def test_training_changes_only_the_chosen_rows():
    ids = [5, 60]
    tree = lorax.trainable_tokens(LLAMA_PARAMS, targets=["embed_tokens"], token_ids=ids)
    np.testing.assert_array_equal(  # unchanged at the start
        lorax.merge(tree)["embed_tokens"]["embedding"], LLAMA_PARAMS["embed_tokens"]["embedding"]
    )
    trainable, frozen = lorax.split(tree)
    assert [x.shape for x in jax.tree.leaves(trainable)] == [(2, 16)]
    apply = lorax.lora(LLAMA.apply)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(t, s):
        loss = lambda t: (apply({"params": lorax.combine(t, frozen)}, IDS) ** 2).mean()  # noqa: E731
        g = jax.grad(loss)(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s

    state = tx.init(trainable)
    for _ in range(3):
        trainable, state = step(trainable, state)
    table = lorax.merge(lorax.combine(trainable, frozen))["embed_tokens"]["embedding"]
    base = LLAMA_PARAMS["embed_tokens"]["embedding"]
    changed = np.flatnonzero(np.any(np.asarray(table) != np.asarray(base), axis=1))
    assert changed.tolist() == sorted(ids)


def test_save_and_load_round_trip(tmp_path):
    tree = _perturbed(
        lorax.trainable_tokens(GPT2_PARAMS, targets=["wte"], token_ids=[7, 2]), jax.random.key(3)
    )
    lorax.save(tmp_path / "ckpt", tree)
    back = lorax.load(tmp_path / "ckpt", GPT2_PARAMS)
    leaf = back["wte"]["embedding"]
    assert isinstance(leaf, TrainableTokensWeight)
    np.testing.assert_array_equal(leaf.token_ids, [7, 2])
    np.testing.assert_array_equal(leaf.delta, tree["wte"]["embedding"].delta)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(targets=None, token_ids=[1]), LoraxValueError, "targets="),
        (dict(targets=["wte"], token_ids=[]), LoraxTypeError, "non-empty"),
        (dict(targets=["wte"], token_ids=[1.5]), LoraxTypeError, "ints"),
        (dict(targets=["wte"], token_ids=[64]), LoraxValueError, r"\[64\].*64 rows of 'wte"),
        (dict(targets=["wte"], token_ids=[-1, 2]), LoraxValueError, "outside"),
        (dict(targets=["wte"], token_ids=[2, 2]), LoraxValueError, "repeat"),
        (dict(targets=r".*c_attn/bias", token_ids=[1]), LoraxValueError, "matched no"),
        (dict(targets=["nothing_here"], token_ids=[1]), LoraxValueError, "nothing_here"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        lorax.trainable_tokens(GPT2_PARAMS, **kwargs)


def test_a_stacked_table_is_refused():
    stacked = {"embed": {"embedding": jnp.ones((2, 8, 4))}}
    with pytest.raises(LoraxValueError, match=r"'embed/embedding' has shape \(2, 8, 4\)"):
        lorax.trainable_tokens(stacked, targets=["embed"], token_ids=[1])
