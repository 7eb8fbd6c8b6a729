"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021) for the reference
models. Both are small trainable trees beside frozen params, passed the way Hugging Face
models take past keys and input embeddings:

    prefix = init_prefix(model, 16, key)                       # keys/values per layer
    logits, _ = model.apply({"params": params}, ids,
                            cache=prefix_cache(model, prefix, batch, 16 + T))
    prompt = init_prompt(model, params, 16, key)               # [16, d] soft tokens
    logits = model.apply({"params": params}, ids, prompt=prompt)

A prefix is a pre-filled KV cache: every layer attends to its ``P`` trained keys and values
before the tokens, which take positions ``P, P+1, ...``. ``generate`` takes both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorax.errors import LoraxValueError
from lorax.models.layers import KVCache


def _kv_shape(model: Any) -> tuple[int, int, int]:
    keys = model.init_cache(1, 1).keys
    return keys.shape[0], keys.shape[3], keys.shape[4]  # layers, kv heads, head dim


def init_prefix(
    model: Any, length: int, key: jax.Array, hidden: int | None = None, scale: float = 0.02
) -> dict:
    """Trainable prefix parameters for ``length`` virtual tokens.

    Args:
      model: a reference model.
      length: the number of prefix positions ``P``.
      key: PRNG key.
      hidden: if set, reparameterize as peft's ``prefix_projection``: an embedding
        ``[P, hidden]`` through ``tanh`` MLP ``hidden -> hidden -> layers * 2 * kv_dim``.
      scale: standard deviation of the initial values.

    Returns:
      ``{"keys", "values"}`` ``[layers, P, kv_heads, head_dim]``, or the MLP's parameters.
    """
    if length < 1:
        raise LoraxValueError(f"init_prefix: length must be >= 1, got {length}")
    layers, heads, dims = _kv_shape(model)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if hidden is None:
        shape = (layers, length, heads, dims)
        return {
            "keys": scale * jax.random.normal(k1, shape),
            "values": scale * jax.random.normal(k2, shape),
        }
    out = layers * 2 * heads * dims
    return {
        "embedding": jax.random.normal(k1, (length, hidden)),
        "w1": jax.random.normal(k2, (hidden, hidden)) / hidden**0.5,
        "b1": jnp.zeros(hidden),
        "w2": scale * jax.random.normal(k3, (hidden, out)) / hidden**0.5,
        "b2": jnp.zeros(out),
    }


def prefix_kv(model: Any, prefix: dict) -> tuple[jax.Array, jax.Array]:
    """The prefix's keys and values ``[layers, P, kv_heads, head_dim]``."""
    if "keys" in prefix:
        return prefix["keys"], prefix["values"]
    layers, heads, dims = _kv_shape(model)
    h = jnp.tanh(prefix["embedding"] @ prefix["w1"] + prefix["b1"][None, :])
    flat = h @ prefix["w2"] + prefix["b2"][None, :]  # [P, layers*2*heads*dims]
    kv = flat.reshape(flat.shape[0], layers, 2, heads, dims).transpose(2, 1, 0, 3, 4)
    return kv[0], kv[1]


def prefix_cache(model: Any, prefix: dict, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """A KV cache of ``max_len`` slots whose first ``P`` hold the prefix for every row."""
    keys, values = prefix_kv(model, prefix)
    length = keys.shape[1]
    if max_len < length:
        raise LoraxValueError(f"prefix_cache: max_len {max_len} < prefix length {length}")
    cache = model.init_cache(batch, max_len, dtype)
    fill = (
        lambda buf, kv: buf.at[:, :, :length].set(  # noqa: E731
            jnp.broadcast_to(kv[:, None], (kv.shape[0], batch) + kv.shape[1:]).astype(buf.dtype)
        )
    )
    return KVCache(
        fill(cache.keys, keys),
        fill(cache.values, values),
        cache.valid.at[:, :length].set(True),
        jnp.asarray(length, jnp.int32),
    )


def extend_cache(cache: KVCache, max_len: int) -> KVCache:
    """``cache`` with room for ``max_len`` slots in all (its filled slots kept)."""
    grow = max_len - cache.max_len
    if grow < 0:
        raise LoraxValueError(
            f"extend_cache: the cache already has {cache.max_len} > {max_len} slots"
        )
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, grow), (0, 0), (0, 0)])  # noqa: E731
    return KVCache(
        pad(cache.keys), pad(cache.values), jnp.pad(cache.valid, [(0, 0), (0, grow)]), cache.length
    )


def init_prompt(model: Any, params: Any, length: int, key: jax.Array) -> jax.Array:
    """A soft prompt ``[length, d]`` initialised from random rows of the token embedding
    table (a common, stable start); train it with the model's params frozen."""
    table = params["wte"]["embedding"] if "wte" in params else params["embed_tokens"]["embedding"]
    table = getattr(table, "materialize", lambda: table)()
    ids = jax.random.randint(key, (length,), 0, table.shape[0])
    return jnp.asarray(table[ids], jnp.float32)
