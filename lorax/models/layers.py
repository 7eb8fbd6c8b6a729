"""Pieces the reference models share: the KV cache, attention with its masks, RoPE, and
the layer stack (unrolled, or ``nn.scan`` over layers, optionally under ``nn.remat``).

A model call sees one :class:`AttentionContext`, built once from the inputs and the cache:
the absolute positions of the new tokens, which key slots hold real tokens, and where the
new keys go. Every layer reads it; only its own slice of the cache changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lorax.errors import LoraxValueError

REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for ``max_len`` slots, filled left to right.

    Attributes:
      keys: ``[layers, batch, max_len, kv_heads, head_dim]``.
      values: same shape as ``keys``.
      valid: ``[batch, max_len]`` bool, slots holding a real (not padding) token.
      length: int32 scalar, the number of slots written so far (shared by all rows).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    length: jax.Array

    @classmethod
    def empty(
        cls,
        layers: int,
        batch: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any = jnp.float32,
    ) -> KVCache:
        shape = (layers, batch, max_len, kv_heads, head_dim)
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, max_len), bool),
            jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]


@struct.dataclass
class AttentionContext:
    """What every layer needs to attend, built once per call by :func:`attention_context`."""

    positions: jax.Array  # [batch, T] absolute positions of the new tokens
    padding: jax.Array | None  # [batch, T] bool, only without a cache
    valid: jax.Array | None  # [batch, max_len] bool, with a cache
    start: jax.Array | None  # int32 slot of the first new token, with a cache
    rope: tuple[jax.Array, jax.Array] | None = None  # cos, sin: [batch, T, head_dim]
    implementation: str | None = struct.field(pytree_node=False, default=None)


def attention_context(
    shape: tuple[int, ...],
    attention_mask: jax.Array | None,
    positions: jax.Array | None,
    cache: KVCache | None,
    implementation: str | None = None,
) -> AttentionContext:
    """Positions and masks for a call on ``shape = (batch, T)`` new tokens.

    Positions default to the count of real tokens before each one (so left-padded rows start
    at 0, as Hugging Face computes them); with a cache the count includes the cached slots.
    """
    batch, t = shape
    mask = (
        jnp.ones((batch, t), bool)
        if attention_mask is None
        else jnp.asarray(attention_mask).astype(bool)
    )
    if cache is None:
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        padding = None if attention_mask is None else mask
        return AttentionContext(
            positions.astype(jnp.int32), padding, None, None, implementation=implementation
        )
    start = cache.length
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, start, axis=1)
    if positions is None:
        counts = jnp.cumsum(valid, axis=1) - 1
        positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(counts, start, t, axis=1), 0)
    return AttentionContext(
        positions.astype(jnp.int32), None, valid, start, implementation=implementation
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ctx: AttentionContext,
    layer_cache: tuple[jax.Array, jax.Array] | None,
    *,
    window: jax.Array | int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Causal attention of ``q [B, T, N, H]`` over ``k, v [B, T, K, H]`` (K divides N) and
    the layer's cached keys; returns the output ``[B, T, N, H]`` and the updated cache.

    ``window`` (sliding-window attention, as Mistral's): a query in slot ``i`` sees the keys
    of slots ``j`` with ``i - window < j <= i`` (slots, not positions, as transformers'
    masks); it may be a traced int (one per layer under ``nn.scan``). ``scale`` replaces
    ``1 / sqrt(H)``; ``softcap`` caps the logits at ``softcap * tanh(logits / softcap)``
    before the mask (Gemma 2)."""
    if layer_cache is None and window is None and softcap is None:
        mask = None if ctx.padding is None else ctx.padding[:, None, None, :]
        out = jax.nn.dot_product_attention(  # pyright: ignore[reportCallIssue]
            q,
            k,
            v,
            mask=mask,
            scale=scale,
            is_causal=True,
            # a str checked by the model config ("xla" / "cudnn" / None), not the Literal
            implementation=ctx.implementation,  # pyright: ignore[reportArgumentType]
        )
        return out, None
    if layer_cache is None:
        slots = jnp.arange(q.shape[1])
        mask = (slots[None, :] <= slots[:, None])[None, None]  # [1, 1, T, T]
        if ctx.padding is not None:
            mask = mask & ctx.padding[:, None, None, :]
        if window is not None:
            mask = mask & (slots[:, None] - slots[None, :] < window)[None, None]
        return _attend(q, k, v, mask, scale, softcap), None
    cached_k, cached_v = layer_cache
    # attention_context sets start and valid whenever there is a cache
    assert ctx.start is not None and ctx.valid is not None
    cached_k = jax.lax.dynamic_update_slice_in_dim(
        cached_k, k.astype(cached_k.dtype), ctx.start, axis=1
    )
    cached_v = jax.lax.dynamic_update_slice_in_dim(
        cached_v, v.astype(cached_v.dtype), ctx.start, axis=1
    )
    t, s = q.shape[1], cached_k.shape[1]
    causal = jnp.arange(s)[None, :] <= (ctx.start + jnp.arange(t))[:, None]  # [T, S]
    mask = causal[None, None] & ctx.valid[:, None, None, :]  # [B,1,T,S]
    if window is not None:
        ahead = (ctx.start + jnp.arange(t))[:, None] - jnp.arange(s)[None, :]
        mask = mask & (ahead < window)[None, None]
    out = _attend(q, cached_k.astype(q.dtype), cached_v.astype(q.dtype), mask, scale, softcap)
    return out, (cached_k, cached_v)


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float | None,
    softcap: float | None,
) -> jax.Array:
    """Masked attention; with ``softcap`` spelled out (``dot_product_attention`` has no
    logit cap): logits in float32, capped, masked, softmax, grouped-query heads kept."""
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    batch, t, heads, dims = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, t, kv_heads, heads // kv_heads, dims)
    logits = jnp.einsum("btkgh,bskh->bkgts", grouped, k, preferred_element_type=jnp.float32)
    logits = logits * (dims**-0.5 if scale is None else scale)
    logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    return out.reshape(batch, t, heads, dims)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> jax.Array:
    """Inverse frequencies of rotary embeddings, with Llama 3 or linear scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    assert scaling is not None  # only "default" comes without a scaling dict
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return jnp.where(medium, smoothed, scaled)
    raise NotImplementedError(
        f"lorax.models: rope_scaling type {kind!r} is not supported "
        "(supported: default, linear, llama3)"
    )


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[batch, T, head_dim]`` for the rotate-half convention of Hugging Face."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, heads, head_dim]`` (rotate-half layout, as HF Llama checkpoints)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class StackOptions:
    """How the layer stack runs: unrolled or ``nn.scan``, and which remat policy (if any)."""

    scan_layers: bool = False
    remat_policy: str | None = None

    def __post_init__(self):
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise LoraxValueError(
                f"lorax.models: remat_policy must be None or one of "
                f"{REMAT_POLICIES}; got {self.remat_policy!r}"
            )


def run_layers(
    block: type[nn.Module],
    block_kwargs: dict[str, Any],
    n_layers: int,
    options: StackOptions,
    prefix: str,
    x: jax.Array,
    ctx: AttentionContext,
    cache: KVCache | None,
    layer_inputs: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Runs ``n_layers`` blocks ``block(**block_kwargs)(x, layer_cache, ctx)``, each returning
    ``(x, layer_cache)``; with ``layer_inputs`` (leading axis ``n_layers``, e.g. each layer's
    attention window) block ``i`` gets ``layer_inputs[i]`` as a fourth argument.

    Must be called inside a compact ``__call__``. Unrolled blocks are named
    ``{prefix}_{i}`` (as Hugging Face numbers them); a scanned stack is one module named
    ``ScanLayers`` whose parameters carry a leading layer axis (``lorax.wrap`` recognises the
    name). Returns the output and the stacked new keys/values (None without a cache).
    """
    cls, kwargs = block, block_kwargs
    if options.remat_policy is not None:
        cls = nn.remat(
            cls,
            policy=getattr(jax.checkpoint_policies, options.remat_policy),
            prevent_cse=not options.scan_layers,
        )
    layer_caches = None if cache is None else (cache.keys, cache.values)
    if options.scan_layers:
        # flax's stub says int; nn.broadcast for the context, 0 for per-layer inputs
        in_axes: Any = (0, nn.broadcast) + ((0,) if layer_inputs is not None else ())
        stack = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=in_axes,
            length=n_layers,
        )
        extra = () if layer_inputs is None else (layer_inputs,)
        return stack(**kwargs, name="ScanLayers")(x, layer_caches, ctx, *extra)
    new_k, new_v = [], []
    for i in range(n_layers):
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
        extra = () if layer_inputs is None else (layer_inputs[i],)
        x, layer_cache = cls(**kwargs, name=f"{prefix}_{i}")(x, layer_cache, ctx, *extra)
        if layer_cache is not None:
            new_k.append(layer_cache[0])
            new_v.append(layer_cache[1])
    return x, (None if cache is None else (jnp.stack(new_k), jnp.stack(new_v)))


def prepend_prompt(
    embeddings: jax.Array, prompt: jax.Array | None, attention_mask: jax.Array | None
) -> tuple[jax.Array, jax.Array | None, int]:
    """Soft-prompt tuning: ``prompt [P, d]`` before every row's token embeddings ``[B, T, d]``
    (and ones before the mask). Returns the embeddings, the mask and ``P``."""
    if prompt is None:
        return embeddings, attention_mask, 0
    batch, n = embeddings.shape[0], prompt.shape[0]
    rows = jnp.broadcast_to(prompt[None].astype(embeddings.dtype), (batch,) + prompt.shape)
    if attention_mask is not None:
        attention_mask = jnp.concatenate(
            [jnp.ones((batch, n), jnp.asarray(attention_mask).dtype), attention_mask], axis=1
        )
    return jnp.concatenate([rows, embeddings], axis=1), attention_mask, n


def updated_cache(
    cache: KVCache,
    ctx: AttentionContext,
    kv: tuple[jax.Array, jax.Array] | None,
    new_tokens: int,
) -> KVCache:
    """The cache after a call wrote ``new_tokens`` slots."""
    assert kv is not None and ctx.valid is not None  # a call with a cache returns both
    return KVCache(kv[0], kv[1], ctx.valid, cache.length + new_tokens)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``nn.with_logical_constraint`` when logical axis rules are in context (as
    ``with nn.logical_axis_rules(partitioning.RULES["fsdp"])``), else ``x``: the hidden
    states stay split over the batch as the rules say, so FSDP gathers each layer's weights
    instead of splitting the activations along the model width. Without rules (one device,
    or a mesh used without them) nothing is constrained."""
    if not nn.get_logical_axis_rules():
        return x
    from flax.linen import spmd

    return spmd.with_logical_constraint(x, names)


HIDDEN = ("batch", None, None)  # [batch, length, width]: rows split, the rest whole
