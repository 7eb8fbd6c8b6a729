"""Llama (1, 2, 3.x) in Flax linen, loading Hugging Face checkpoints: RoPE (with Llama 3
scaling), RMSNorm, SwiGLU, grouped-query attention through ``jax.nn.dot_product_attention``
(cuDNN flash attention on GPU with ``attention_impl="cudnn"``), optional ``nn.scan`` over
layers and a remat policy.

The Llama relatives load here too, told apart by config.json's ``model_type`` (a
:class:`LlamaConfig` field) and a few switches: ``mistral`` (sliding-window attention),
``qwen2`` (Qwen2 / Qwen2.5: biases on q, k, v; sliding layers past ``max_window_layers``),
``gemma`` (RMSNorm with ``1 + weight``, embeddings scaled by sqrt(hidden_size), tanh-GELU,
tied head) and ``gemma2`` (Gemma with logit soft-capping, pre- and post-feedforward norms,
a post-attention norm, ``query_pre_attn_scalar`` and a window on alternating layers).

Parameter names follow Hugging Face (``layers_0/self_attn/q_proj``, ``mlp/gate_proj``, ...),
so targets read as in peft: ``lorax.wrap(params, targets=["q_proj", "v_proj"])``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorax.models import llama
  >>> config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
  ...                            num_hidden_layers=2, num_attention_heads=4,
  ...                            num_key_value_heads=2)
  >>> model = llama.Llama(config, scan_layers=True)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  >>> params["ScanLayers"]["self_attn"]["k_proj"]["kernel"].shape   # [layers, in, out]
  (2, 32, 16)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.io.peft import PeftModuleMap, register_peft_family
from lorax.models import hub
from lorax.models.layers import (
    HIDDEN,
    KVCache,
    StackOptions,
    apply_rope,
    attention,
    attention_context,
    constrain,
    prepend_prompt,
    rope_frequencies,
    rope_tables,
    run_layers,
    updated_cache,
)

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
"""transformers' ``model_type`` of the Llama relatives this module loads; what differs from
Llama is switched by :class:`LlamaConfig`'s fields (Gemma's norms and embedding scale by the
``model_type`` itself)."""
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
# transformers' defaults of the family-specific keys, for a config.json that omits them
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "gemma": {"head_dim": 256, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {
        "head_dim": 256,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
}
# the config.json keys of the family fields each model_type writes (the others are its fixed
# behaviour: Qwen2's q / k / v biases, Gemma's norms)
_FAMILY_KEYS = {
    "llama": ("attention_bias", "mlp_bias"),
    "mistral": ("sliding_window",),
    "qwen2": ("sliding_window", "layer_types"),
    "gemma": ("attention_bias",),
    "gemma2": (
        "attention_bias",
        "sliding_window",
        "layer_types",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
    ),
}
ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}
LAYER_TYPES = ("full_attention", "sliding_attention")
_NO_WINDOW = 2**31 - 1  # the window of a full-attention layer among sliding ones
# the rope types layers.rope_frequencies implements, with the keys each needs
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face Llama config.json that the model uses."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF's dict, accepted as given and stored as its sorted items (hashable)
    rope_scaling: tuple[tuple[str, Any], ...] | dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # the Llama relatives: transformers' model_type and the switches their layers need
    model_type: str = "llama"
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma's)
    qkv_bias: bool = False  # Qwen2: biases on q, k, v (not o)
    # keys further back than this many slots are masked (on the layers layer_types says;
    # without layer_types on every layer, except gemma2's default: even layers slide)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer: full_attention / sliding_attention
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention logits times its -1/2 power
    attn_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(logits / cap)
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        hub.check_sizes(
            "LlamaConfig",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
        )
        hub.check_positive(
            "LlamaConfig", rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta
        )
        if self.num_attention_heads % self.kv_heads:
            raise LoraxValueError(
                f"LlamaConfig: num_attention_heads {self.num_attention_heads} is "
                f"not a multiple of num_key_value_heads {self.kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise LoraxValueError(
                f"LlamaConfig: hidden_size {self.hidden_size} is not a "
                "multiple of num_attention_heads "
                f"{self.num_attention_heads}; set head_dim"
            )
        if isinstance(self.rope_scaling, dict):  # accept HF's dict, store it hashable
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):  # several eos ids (Llama 3 instruct): hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        scaling = self.scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise LoraxValueError(
                f"LlamaConfig: rope type {kind!r} (config key rope_parameters "
                f"or rope_scaling: {scaling}) is not supported; supported: "
                f"{sorted(ROPE_TYPES)}"
            )
        lacking = [k for k in ROPE_TYPES[kind] if k not in scaling]
        if lacking:
            raise LoraxValueError(
                f"LlamaConfig: rope type {kind!r} needs {lacking} in "
                f"rope_parameters / rope_scaling; got {scaling}"
            )
        self._check_family()

    def _check_family(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise LoraxValueError(
                f"LlamaConfig: model_type={self.model_type!r} is not supported; supported: "
                f"{list(MODEL_TYPES)}"
            )
        if self.hidden_act not in ACTIVATIONS:
            key = "hidden_activation" if self.model_type == "gemma2" else "hidden_act"
            raise LoraxValueError(
                f"LlamaConfig: config key {key}={self.hidden_act!r} is not supported "
                f"(implemented: {sorted(ACTIVATIONS)})"
            )
        if self.model_type == "qwen2":  # Qwen2's q / k / v always have biases
            object.__setattr__(self, "qkv_bias", True)
        allowed = _FAMILY_KEYS[self.model_type] + ("hidden_act",)
        allowed += ("qkv_bias",) if self.model_type == "qwen2" else ()
        for key in _FAMILY_FIELDS:  # a switch the family's transformers class does not have
            value = getattr(self, key)
            if key not in allowed and value not in (None, False):
                raise LoraxValueError(
                    f"LlamaConfig: {key}={value!r} does not exist in transformers' "
                    f"{ARCHITECTURES[self.model_type]} (model_type {self.model_type!r}, whose "
                    f"switches are {sorted(allowed)})"
                )
        hub.check_sizes("LlamaConfig", sliding_window=self.sliding_window)
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, key) is not None:
                hub.check_positive("LlamaConfig", **{key: getattr(self, key)})
        if self.layer_types is None and self.model_type == "gemma2":  # transformers' default
            kinds = tuple(LAYER_TYPES[(i + 1) % 2] for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", kinds)
        if isinstance(self.layer_types, list):  # HF's list, stored hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types is not None:
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown or len(self.layer_types) != self.num_hidden_layers:
                raise LoraxValueError(
                    f"LlamaConfig: config key layer_types={list(self.layer_types)} must list "
                    f"one of {list(LAYER_TYPES)} per layer ({self.num_hidden_layers} layers)"
                )

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None: full causal attention)."""
        kinds = self.layer_types or ("sliding_attention",) * self.num_hidden_layers
        return tuple(self.sliding_window if kind == "sliding_attention" else None for kind in kinds)

    @property
    def gemma(self) -> bool:
        """Gemma's RMSNorm (``1 + weight``) and embeddings scaled by sqrt(hidden_size)."""
        return self.model_type in ("gemma", "gemma2")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dims(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def scaling(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face config dict (transformers 4's ``rope_theta`` /
        ``rope_scaling`` or 5's ``rope_parameters``)."""
        hub.check_model_type(hf, MODEL_TYPES, "LlamaConfig", "Llama")
        hf = _family_keys(dict(hf))
        rope = hf.pop("rope_parameters", None) or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise LoraxTypeError(
                f"LlamaConfig: config key rope_parameters / rope_scaling must "
                f"be an object; got {type(rope).__name__} {rope!r}"
            )
        rope = dict(rope)
        if "rope_theta" in rope:
            hf["rope_theta"] = rope.pop("rope_theta")
        kind = rope.get("rope_type", rope.get("type", "default"))
        hf["rope_scaling"] = None if kind == "default" else rope
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    def to_hf(self) -> dict[str, Any]:
        out = {
            **dataclasses.asdict(self),
            "architectures": [ARCHITECTURES[self.model_type]],
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.dims,
        }
        for key in _FAMILY_FIELDS:
            out.pop(key)
        for key in _FAMILY_KEYS[self.model_type]:
            out[key] = getattr(self, key)
        out["hidden_activation" if self.model_type == "gemma2" else "hidden_act"] = self.hidden_act
        if "layer_types" in out and self.sliding_window is not None:
            out["layer_types"] = [
                "sliding_attention" if w else "full_attention" for w in self.windows
            ]
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
        rope = {"rope_type": "default", **(self.scaling or {}), "rope_theta": self.rope_theta}
        out.pop("rope_scaling")
        out.pop("rope_theta")
        out["rope_parameters"] = rope
        return out


_FAMILY_FIELDS = (
    "attention_bias",
    "mlp_bias",
    "qkv_bias",
    "hidden_act",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


def _family_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """A transformers config dict with its family's keys as LlamaConfig's fields: defaults
    filled, the keys a family ignores dropped, what is not implemented refused."""
    kind = hf.get("model_type") or "llama"
    hf = {**HF_DEFAULTS[kind], **hf, "model_type": kind}
    if hf.get("use_bidirectional_attention"):
        raise LoraxValueError(
            f"LlamaConfig: config key use_bidirectional_attention="
            f"{hf['use_bidirectional_attention']!r} (model_type {kind!r}) is not supported: "
            "the reference models are causal language models"
        )
    if kind == "gemma2":  # Gemma 2 reads hidden_activation, not hidden_act
        hf["hidden_act"] = hf.pop("hidden_activation")
    if kind == "gemma" and hf.get("hidden_act") == "gelu":  # what transformers does too
        hf["hidden_act"] = "gelu_pytorch_tanh"
    if kind == "qwen2":
        hub.check_sizes("LlamaConfig", max_window_layers=hf.get("max_window_layers"))
        if not hf.get("use_sliding_window"):
            hf["sliding_window"] = None
        if hf.get("layer_types") is None and hf["sliding_window"] is not None:
            hf["layer_types"] = [
                LAYER_TYPES[int(i >= hf["max_window_layers"])]
                for i in range(hf.get("num_hidden_layers", 32))
            ]
        hf["qkv_bias"] = True
    kept = _FAMILY_KEYS[kind] + ("hidden_act", "qkv_bias")
    for key in _FAMILY_FIELDS:  # transformers' class of this family ignores the others
        if key not in kept:
            hf.pop(key, None)
    return hf


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

CONFIGS = {
    "llama-2-7b": LlamaConfig(rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama-2-13b": LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.2-3b": LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}  # the benchmarks' own shapes (Llama-1B anchor, LLaMA-65B) are in benchmarks/bench_shapes.py


def _dense(features: int, bias: bool, config: LlamaConfig, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        name=name,
        kernel_init=nn.initializers.normal(config.initializer_range),
    )


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)`` in float32 (``scale`` starts at 0, as
    the checkpoints store it)."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.epsilon)
        scale = scale.reshape((1,) * (x.ndim - 1) + scale.shape)
        return (h * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


def _norm(config: LlamaConfig, dtype: Any, name: str) -> nn.Module:
    cls = GemmaRMSNorm if config.gemma else nn.RMSNorm
    return cls(epsilon=config.rms_norm_eps, dtype=dtype, name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, ctx, window=None):
        c = self.config
        batch, t, _ = x.shape
        heads, kv_heads, dims, bias = (c.num_attention_heads, c.kv_heads, c.dims, c.attention_bias)
        in_bias = bias or c.qkv_bias
        q = _dense(heads * dims, in_bias, c, self.dtype, "q_proj")(x)
        q = q.reshape(batch, t, heads, dims)
        k = _dense(kv_heads * dims, in_bias, c, self.dtype, "k_proj")(x)
        v = _dense(kv_heads * dims, in_bias, c, self.dtype, "v_proj")(x)
        k, v = k.reshape(batch, t, kv_heads, dims), v.reshape(batch, t, kv_heads, dims)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        out, layer_cache = attention(
            q, k, v, ctx, layer_cache, window=window, scale=scale, softcap=c.attn_logit_softcapping
        )
        out = _dense(c.hidden_size, bias, c, self.dtype, "o_proj")(out.reshape(batch, t, -1))
        return out, layer_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c.intermediate_size, c.mlp_bias, c, self.dtype, "gate_proj")(x)
        up = _dense(c.intermediate_size, c.mlp_bias, c, self.dtype, "up_proj")(x)
        act = ACTIVATIONS[c.hidden_act]
        return _dense(c.hidden_size, c.mlp_bias, c, self.dtype, "down_proj")(act(gate) * up)


class LlamaBlock(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, ctx, window=None):
        c = self.config
        x = constrain(x, HIDDEN)
        norm = functools.partial(_norm, c, self.dtype)
        h, layer_cache = LlamaAttention(c, self.dtype, name="self_attn")(
            norm("input_layernorm")(x), layer_cache, ctx, window
        )
        mlp = LlamaMLP(c, self.dtype, name="mlp")
        if c.model_type != "gemma2":
            x = x + h
            return x + mlp(norm("post_attention_layernorm")(x)), layer_cache
        # Gemma 2: each sublayer's output normed too before the residual
        x = x + norm("post_attention_layernorm")(h)
        h = mlp(norm("pre_feedforward_layernorm")(x))
        return x + norm("post_feedforward_layernorm")(h), layer_cache


class Llama(nn.Module):
    """Llama causal language model (``LlamaForCausalLM``): token ids in, float32 logits out.

    Attributes and call arguments as :class:`lorax.models.gpt2.GPT2`.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_impl: str | None = None

    @property
    def max_positions(self) -> int | None:
        return None  # RoPE has no table; longer contexts degrade but run

    def peft_modules(self, params: Any = None) -> PeftModuleMap:
        """This model's PEFT module map (as :meth:`lorax.models.gpt2.GPT2.peft_modules`;
        ``fan_in_fan_out`` false)."""
        rows = hf_table(self.config, self.scan_layers)
        return PeftModuleMap(
            modules=hub.peft_modules(rows), fan_in_fan_out=False, tensors=hub.peft_tensors(rows)
        )

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of at most ``max_len`` tokens."""
        c = self.config
        return KVCache.empty(
            c.num_hidden_layers, batch, max_len, c.kv_heads, c.dims, dtype or self.dtype
        )

    @nn.compact
    def __call__(self, input_ids, *, attention_mask=None, positions=None, cache=None, prompt=None):
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            name="embed_tokens",
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        x = embed(input_ids)
        if c.gemma:  # in the compute dtype, as transformers' scaled embedding
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        x, attention_mask, n_prompt = prepend_prompt(x, prompt, attention_mask)
        ctx = attention_context(x.shape[:2], attention_mask, positions, cache, self.attention_impl)
        ctx = ctx.replace(  # pyright: ignore[reportAttributeAccessIssue]  # flax struct
            rope=rope_tables(ctx.positions, rope_frequencies(c.dims, c.rope_theta, c.scaling))
        )
        windows = None
        if any(w is not None for w in c.windows):  # sliding layers: each layer's window
            windows = jnp.asarray([_NO_WINDOW if w is None else w for w in c.windows], jnp.int32)
        x, kv = run_layers(
            LlamaBlock,
            dict(config=c, dtype=self.dtype),
            c.num_hidden_layers,
            StackOptions(self.scan_layers, self.remat_policy),
            "layers",
            x,
            ctx,
            cache,
            windows,
        )
        x = constrain(x, HIDDEN)
        h = _norm(c, self.dtype, "norm")(x[:, n_prompt:])
        if c.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = _dense(c.vocab_size, False, c, self.dtype, "lm_head")(h)
        logits = logits.astype(jnp.float32)
        if c.final_logit_softcapping is not None:
            cap = c.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        logits = constrain(logits, ("batch", None, "vocab"))
        if cache is None:
            return logits
        return logits, updated_cache(cache, ctx, kv, x.shape[1])


_LAYER_ROWS = (
    [  # (flax path inside a block, HF name inside a block, transposed)
        ("input_layernorm/scale", "input_layernorm.weight", False),
        ("post_attention_layernorm/scale", "post_attention_layernorm.weight", False),
    ]
    + [
        (f"self_attn/{p}/kernel", f"self_attn.{p}.weight", True)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    + [(f"mlp/{p}/kernel", f"mlp.{p}.weight", True) for p in ("gate_proj", "up_proj", "down_proj")]
)

HF_PREFIX = "model."
HF_IGNORE = r"(rotary_emb\.inv_freq|^lm_head\.weight)$"  # buffers; only read when untied


def _ignore(config: LlamaConfig) -> str:
    return HF_IGNORE if config.tie_word_embeddings else r"rotary_emb\.inv_freq$"


def _block_rows(config: LlamaConfig) -> list[tuple[str, str, bool]]:
    layer_rows = list(_LAYER_ROWS)
    if config.model_type == "gemma2":
        layer_rows += [
            (f"{n}/scale", f"{n}.weight", False)
            for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        ]
    if config.attention_bias or config.qkv_bias:
        biased = ("q_proj", "k_proj", "v_proj") + (("o_proj",) if config.attention_bias else ())
        layer_rows += [(f"self_attn/{p}/bias", f"self_attn.{p}.bias", False) for p in biased]
    if config.mlp_bias:
        layer_rows += [
            (f"mlp/{p}/bias", f"mlp.{p}.bias", False) for p in ("gate_proj", "up_proj", "down_proj")
        ]
    return layer_rows


_LM_HEAD = hub.Entry("lm_head/kernel", "lm_head.weight", transpose=True)


def hf_table(config: LlamaConfig, scan_layers: bool = False) -> list[hub.Entry]:
    """Every parameter's Flax path and Hugging Face tensor name (``LlamaForCausalLM`` and
    its relatives: Qwen2's q / k / v biases, Gemma 2's feedforward norms)."""
    rows = [
        hub.Entry("embed_tokens/embedding", "model.embed_tokens.weight"),
        hub.Entry("norm/scale", "model.norm.weight"),
    ]
    if not config.tie_word_embeddings:
        rows.append(_LM_HEAD)
    return rows + hub.stack_rows(
        _block_rows(config), config.num_hidden_layers, scan_layers, "layers", "model.layers"
    )


def peft_modules(params: Any) -> PeftModuleMap:
    """The PEFT module map of a Llama parameter tree: what ``model="llama"`` (or
    ``"mistral"``, ``"qwen2"``, ``"gemma"``, ``"gemma2"``) means to ``lorax.export_peft`` /
    ``lorax.import_peft`` (registered when this module is imported).

    The layer count is read from the paths (``layers_<i>/...``, or the stack of
    ``ScanLayers/...``), and ``lm_head`` is mapped when the tree has one (untied head).
    ``fan_in_fan_out`` is false (``torch.nn.Linear``).

    Args:
      params: a Llama parameter tree, wrapped or not.

    Returns:
      Every projection's ``model.layers.<i>...`` module, and ``lm_head``'s if present.

    Example:
      >>> import numpy as np
      >>> from lorax.models import llama
      >>> tree = {"ScanLayers": {"self_attn": {"q_proj": {"kernel": np.zeros((2, 8, 8))}}}}
      >>> llama.peft_modules(tree).modules["ScanLayers/self_attn/q_proj/kernel"]
      (('model.layers.0.self_attn.q_proj', 0), ('model.layers.1.self_attn.q_proj', 1))
    """
    paths = hub.param_paths(params)
    n_layers, scanned = hub.layer_count(params, paths, "layers")
    in_bias = any(p.endswith("self_attn/q_proj/bias") for p in paths)
    out_bias = any(p.endswith("self_attn/o_proj/bias") for p in paths)
    qkv_only = in_bias and not out_bias
    kind = "qwen2" if qkv_only else "llama"
    if any("pre_feedforward_layernorm/" in p for p in paths):  # Gemma 2's extra norms
        kind = "gemma2"
    config = LlamaConfig(  # only what the table reads: which rows exist
        num_hidden_layers=1,
        model_type=kind,
        tie_word_embeddings=not any(p.startswith("lm_head/") for p in paths),
        attention_bias=out_bias,
        qkv_bias=qkv_only and kind == "qwen2",
        mlp_bias=any(p.endswith("mlp/gate_proj/bias") for p in paths) and kind == "llama",
    )
    top = [e for e in hf_table(config) if not e.path.startswith("layers_")]
    rows = top + hub.stack_rows(_block_rows(config), n_layers, scanned, "layers", "model.layers")
    return PeftModuleMap(
        modules=hub.peft_modules(rows), fan_in_fan_out=False, tensors=hub.peft_tensors(rows)
    )


for _family in MODEL_TYPES:  # one table for the family: the paths say which rows exist
    register_peft_family(_family, peft_modules)


def from_pretrained(
    name_or_dir: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    scan_layers: bool = False,
    remat_policy: str | None = None,
    attention_impl: str | None = None,
    mesh: Any = None,
    rules: Any = None,
    quantize: str | None = None,
) -> tuple[Llama, dict]:
    """Loads a Hugging Face Llama, Mistral, Qwen2 / Qwen2.5, Gemma or Gemma 2 checkpoint
    (``model_type`` in :data:`MODEL_TYPES`; arguments and errors as
    :func:`lorax.models.gpt2.from_pretrained`). A config key this model does not implement
    (another rope type, a hidden activation other than silu / gelu_pytorch_tanh,
    bidirectional attention, an unknown layer type) is refused with a ``LoraxValueError``
    naming it."""
    return hub.load_model(
        name_or_dir,
        LlamaConfig,
        Llama,
        hf_table,
        dtype=dtype,
        param_dtype=param_dtype,
        strip_prefix=HF_PREFIX,
        ignore=_ignore,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        attention_impl=attention_impl,
        mesh=mesh,
        rules=rules,
        quantize=quantize,
    )


def save_pretrained(directory: str | os.PathLike, model: Llama, params: dict) -> None:
    """Writes ``params`` (dense) as a Hugging Face checkpoint of the config's ``model_type``
    (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ...)."""
    hub.save_model(directory, model, params, hf_table)
