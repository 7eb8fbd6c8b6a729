"""Text generation with the KV cache, compiled once: a prefill call, then a ``lax.scan`` of
one-token steps (greedy, temperature, top-k), through ``lorax.lora`` so LoRA and NF4 trees
generate unmerged."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorax.errors import LoraxValueError
from lorax.models.layers import KVCache
from lorax.models.prefix import extend_cache
from lorax.transform import lora


def generate(
    model: nn.Module,
    params: Any,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    attention_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    prefix: KVCache | None = None,
    prompt: jax.Array | None = None,
) -> jax.Array:
    """Continues ``input_ids`` by ``max_new_tokens`` tokens.

    Args:
      model: a reference model (``GPT2``, ``Llama``).
      params: its params; may hold lorax leaves (LoRA, NF4), used without merging.
      input_ids: ``[batch, T]`` prompts; rows of different lengths are left-padded and
        described by ``attention_mask``.
      max_new_tokens: how many tokens to add.
      attention_mask: ``[batch, T]``, 1 for real tokens, 0 for padding.
      temperature: 0 for greedy decoding, else the softmax temperature of sampling.
      top_k: sample among the ``top_k`` most likely tokens only.
      key: PRNG key for sampling (needed when ``temperature > 0``).
      eos_token_id: once a row emits it, the row continues with ``pad_token_id``.
      pad_token_id: what finished rows emit.
      prefix: a KV cache holding a prefix for every row (``lorax.models.prefix_cache``).
      prompt: soft-prompt embeddings ``[P, d]`` placed before the prompt tokens.

    Returns:
      ``[batch, max_new_tokens]`` new token ids.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lorax.models import gpt2, generate
      >>> model = gpt2.GPT2(gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32,
      ...                                   n_layer=1, n_head=2))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
      >>> generate(model, params, jnp.ones((2, 4), jnp.int32), 5).shape
      (2, 5)
    """
    if max_new_tokens < 1:
        raise LoraxValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise LoraxValueError(f"generate: temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise LoraxValueError("generate: sampling (temperature > 0) needs a PRNG key")
    total = (
        input_ids.shape[1]
        + max_new_tokens
        + (0 if prefix is None else prefix.max_len)
        + (0 if prompt is None else prompt.shape[0])
    )
    limit = getattr(model, "max_positions", None)
    if limit is not None and total > limit:
        raise LoraxValueError(
            f"generate: {input_ids.shape[1]} prompt + {max_new_tokens} new "
            f"tokens exceed the model's {limit} positions"
        )
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    key = jax.random.key(0) if key is None else key
    return _generate(
        model,
        params,
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        key,
        prefix,
        prompt,
        max_new_tokens,
        float(temperature),
        top_k,
        eos_token_id,
        pad_token_id,
    )


def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10, 11))
def _generate(
    model,
    params,
    input_ids,
    attention_mask,
    key,
    prefix,
    prompt,
    max_new_tokens,
    temperature,
    top_k,
    eos_token_id,
    pad_token_id,
):
    apply = lora(model.apply)
    batch, t = input_ids.shape
    room = t + max_new_tokens + (0 if prompt is None else prompt.shape[0])
    cache = (
        model.init_cache(batch, room)
        if prefix is None
        else extend_cache(prefix, prefix.max_len + room)
    )
    logits, cache = apply(
        {"params": params}, input_ids, attention_mask=attention_mask, cache=cache, prompt=prompt
    )
    keys = jax.random.split(key, max_new_tokens)
    first = _sample(logits[:, -1], keys[0], temperature, top_k)
    done = jnp.zeros(batch, bool) if eos_token_id is None else first == eos_token_id

    def step(carry, step_key):
        token, cache, done = carry
        logits, cache = apply({"params": params}, token[:, None], cache=cache)
        nxt = _sample(logits[:, -1], step_key, temperature, top_k)
        nxt = jnp.where(done, pad_token_id, nxt)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        return (nxt, cache, done), nxt

    _, rest = jax.lax.scan(step, (first, cache, done), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)
