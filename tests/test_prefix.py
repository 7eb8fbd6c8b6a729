"""Prefix tuning and prompt tuning on the reference models: a prefix is a pre-filled KV
cache, a soft prompt is a row of input embeddings; both generate, both train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fit

from lorax.models import generate, gpt2, init_prefix, init_prompt, llama, prefix_cache
from lorax.models.prefix import extend_cache

pytestmark = pytest.mark.fast_compile  # compile-bound: small shapes (tests/conftest.py)

VOCAB = 61


def _models():
    g = gpt2.GPT2(gpt2.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    ll = llama.Llama(
        llama.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        scan_layers=True,
    )
    out = []
    for i, m in enumerate((g, ll)):
        params = m.init(jax.random.key(i), jnp.zeros((1, 4), jnp.int32))["params"]
        params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)  # O(1) logits
        out.append((m, params))
    return out


MODELS = _models()
P_TOK = np.random.default_rng(0).integers(0, VOCAB, (1, 5))
X_TOK = np.random.default_rng(1).integers(0, VOCAB, (3, 7))


@pytest.mark.parametrize("index", [0, 1])
def test_prefix_is_a_prefilled_cache(index):
    model, params = MODELS[index]
    full = model.apply({"params": params}, np.concatenate([np.repeat(P_TOK, 3, 0), X_TOK], 1))
    _, cache = model.apply({"params": params}, P_TOK, cache=model.init_cache(1, 5))
    prefix = {"keys": cache.keys[:, 0], "values": cache.values[:, 0]}  # one row's K/V
    logits, _ = model.apply({"params": params}, X_TOK, cache=prefix_cache(model, prefix, 3, 5 + 7))
    np.testing.assert_allclose(logits, full[:, 5:], atol=1e-4, rtol=1e-4)
    # generation continues from the prefix as from the tokens it came from
    with_prefix = generate(model, params, X_TOK, 6, prefix=prefix_cache(model, prefix, 3, 5))
    plain = generate(model, params, np.concatenate([np.repeat(P_TOK, 3, 0), X_TOK], 1), 6)
    np.testing.assert_array_equal(with_prefix, plain)


@pytest.mark.parametrize("index", [0, 1])
def test_prompt_is_a_row_of_input_embeddings(index):
    model, params = MODELS[index]
    table = params["wte" if index == 0 else "embed_tokens"]["embedding"]
    prompt = table[P_TOK[0]]  # [5, d]
    logits = model.apply({"params": params}, X_TOK, prompt=prompt)
    full = model.apply({"params": params}, np.concatenate([np.repeat(P_TOK, 3, 0), X_TOK], 1))
    np.testing.assert_allclose(logits, full[:, 5:], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(
        generate(model, params, X_TOK, 6, prompt=prompt),
        generate(model, params, np.concatenate([np.repeat(P_TOK, 3, 0), X_TOK], 1), 6),
    )


def _lm_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def test_prefix_and_prompt_train():
    model, params = MODELS[0]
    data = jnp.asarray(np.tile(np.arange(12) % 5 + 3, (4, 1)))  # a pattern the base lacks
    for hidden in (None, 16):
        prefix = init_prefix(model, 4, jax.random.key(2), hidden=hidden)
        if hidden:
            assert prefix["w2"].shape == (16, 2 * 2 * 4 * 8)
        loss = lambda p: _lm_loss(
            model.apply(  # noqa: E731
                {"params": params}, data, cache=prefix_cache(model, p, 4, 4 + 12)
            )[0],
            data,
        )
        _, values = fit(loss, prefix, 60, lr=3e-2)
        assert values[-1] < 0.7 * values[0]
    prompt = init_prompt(model, params, 4, jax.random.key(3))
    loss = lambda p: _lm_loss(model.apply({"params": params}, data, prompt=p), data)  # noqa
    _, values = fit(loss, prompt, 60, lr=3e-2)
    assert values[-1] < 0.7 * values[0]
    with pytest.raises(ValueError, match="max_len"):
        prefix_cache(model, init_prefix(model, 4, jax.random.key(0)), 1, 2)
    with pytest.raises(ValueError, match="slots"):
        extend_cache(model.init_cache(1, 8), 4)


def test_prefix_and_prompt_save_and_load(tmp_path):
    """Prefixes and prompts are plain trainable trees: lorax.unfreeze lets lorax.save /
    lorax.load keep them like any adapter."""
    import lorax

    model, _ = MODELS[1]
    prefix = init_prefix(model, 3, jax.random.key(4), hidden=8)
    lorax.save(tmp_path / "prefix", lorax.unfreeze(prefix, targets=".*"))
    template = init_prefix(model, 3, jax.random.key(0), hidden=8)
    loaded = lorax.merge(lorax.load(tmp_path / "prefix", template))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(prefix)):
        np.testing.assert_array_equal(a, b)
