"""GPT-2 in Flax linen, loading Hugging Face checkpoints.

Parameter names follow the Hugging Face module names (``wte``, ``h_0/attn/c_attn``, ...), so
targets read the same here as in peft: ``lorax.wrap(params, targets=["c_attn"])``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorax.models import gpt2
  >>> config = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
  >>> model = gpt2.GPT2(config)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  >>> model.apply({"params": params}, jnp.zeros((2, 8), jnp.int32)).shape
  (2, 8, 64)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lorax.errors import LoraxValueError
from lorax.io.peft import PeftModuleMap, register_peft_family
from lorax.models import hub
from lorax.models.layers import (
    HIDDEN,
    KVCache,
    StackOptions,
    attention,
    attention_context,
    constrain,
    prepend_prompt,
    run_layers,
    updated_cache,
)

ACTIVATIONS = {
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of a Hugging Face GPT-2 config.json that the model uses."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256

    def __post_init__(self):
        hub.check_sizes(
            "GPT2Config",
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
        )
        hub.check_positive("GPT2Config", layer_norm_epsilon=self.layer_norm_epsilon)
        if self.n_embd % self.n_head:
            raise LoraxValueError(
                f"GPT2Config: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise LoraxValueError(
                f"GPT2Config: activation_function {self.activation_function!r} "
                f"is not one of {sorted(ACTIVATIONS)}"
            )
        if isinstance(self.eos_token_id, list):  # several eos ids: keep the config hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """From a Hugging Face config dict; refuses another architecture and options that
        change the computation (the logits would differ from transformers')."""
        hub.check_model_type(hf, MODEL_TYPES, "GPT2Config", "GPT-2")
        for flag, ok in [
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
            ("scale_attn_weights", True),
            ("tie_word_embeddings", True),
        ]:
            if hf.get(flag, ok) != ok:
                raise LoraxValueError(
                    f"GPT2Config: config key {flag}={hf[flag]!r} is not "
                    f"supported (GPT2 implements {flag}={ok})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    def to_hf(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "tie_word_embeddings": True,
        }


CONFIGS = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}


def _dense(features: int, config: GPT2Config, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        name=name,
        kernel_init=nn.initializers.normal(config.initializer_range),
    )


class GPT2Attention(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, ctx):
        c = self.config
        batch, t, _ = x.shape
        qkv = _dense(3 * c.n_embd, c, self.dtype, "c_attn")(x)
        q, k, v = (a.reshape(batch, t, c.n_head, -1) for a in jnp.split(qkv, 3, axis=-1))
        out, layer_cache = attention(q, k, v, ctx, layer_cache)
        return _dense(c.n_embd, c, self.dtype, "c_proj")(out.reshape(batch, t, -1)), layer_cache


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = ACTIVATIONS[c.activation_function](_dense(c.inner, c, self.dtype, "c_fc")(x))
        return _dense(c.n_embd, c, self.dtype, "c_proj")(h)


class GPT2Block(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, ctx):
        x = constrain(x, HIDDEN)
        norm = functools.partial(
            nn.LayerNorm, epsilon=self.config.layer_norm_epsilon, dtype=self.dtype
        )
        h, layer_cache = GPT2Attention(self.config, self.dtype, name="attn")(
            norm(name="ln_1")(x), layer_cache, ctx
        )
        x = x + h
        x = x + GPT2MLP(self.config, self.dtype, name="mlp")(norm(name="ln_2")(x))
        return x, layer_cache


class GPT2(nn.Module):
    """GPT-2 language model (``GPT2LMHeadModel``): token ids in, float32 logits out.

    Attributes:
      config: the architecture.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters keep their own dtype.
      scan_layers: run the blocks with ``nn.scan`` (one ``ScanLayers`` module whose
        parameters carry a leading layer axis; faster to compile for deep models).
      remat_policy: None, or a ``jax.checkpoint_policies`` name to rematerialize each block.
      attention_impl: passed to ``jax.nn.dot_product_attention`` (None, "xla", "cudnn").

    Call with ``input_ids [batch, T]`` and optionally ``attention_mask [batch, T]`` (1 for
    real tokens, 0 for padding), ``positions``, a ``cache`` from :meth:`init_cache` (or a
    prefix from ``lorax.models.prefix_cache``), and a soft ``prompt [P, d]`` placed before the
    tokens (prompt tuning; the logits cover the tokens only). With a cache it returns
    ``(logits, new_cache)``.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    attention_impl: str | None = None

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    def peft_modules(self, params: Any = None) -> PeftModuleMap:
        """This model's PEFT module map, for ``lorax.export_peft(..., model=model)``: the
        modules of its config's layers (scanned or not as the model is); ``params`` is not
        read."""
        rows = hf_table(self.config, self.scan_layers)
        return PeftModuleMap(
            modules=hub.peft_modules(rows), fan_in_fan_out=True, tensors=hub.peft_tensors(rows)
        )

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of at most ``max_len`` tokens."""
        c = self.config
        return KVCache.empty(
            c.n_layer, batch, max_len, c.n_head, c.n_embd // c.n_head, dtype or self.dtype
        )

    @nn.compact
    def __call__(self, input_ids, *, attention_mask=None, positions=None, cache=None, prompt=None):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype, embedding_init=init, name="wte")
        wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype, embedding_init=init, name="wpe")
        x, attention_mask, n_prompt = prepend_prompt(wte(input_ids), prompt, attention_mask)
        length = x.shape[1] if cache is None else cache.max_len
        if length > c.n_positions:
            raise LoraxValueError(
                f"GPT2: {length} positions requested; this model has n_positions={c.n_positions}"
            )
        ctx = attention_context(x.shape[:2], attention_mask, positions, cache, self.attention_impl)
        x = x + wpe(ctx.positions)
        x, kv = run_layers(
            GPT2Block,
            dict(config=c, dtype=self.dtype),
            c.n_layer,
            StackOptions(self.scan_layers, self.remat_policy),
            "h",
            x,
            ctx,
            cache,
        )
        x = nn.LayerNorm(epsilon=c.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        x = constrain(x, HIDDEN)
        logits = wte.attend(x[:, n_prompt:]).astype(jnp.float32)  # the head is tied
        logits = constrain(logits, ("batch", None, "vocab"))
        if cache is None:
            return logits
        return logits, updated_cache(cache, ctx, kv, x.shape[1])


_LAYER_ROWS = [  # (flax path inside a block, HF name inside a block); Conv1D is [in, out]
    ("ln_1/scale", "ln_1.weight"),
    ("ln_1/bias", "ln_1.bias"),
    ("attn/c_attn/kernel", "attn.c_attn.weight"),
    ("attn/c_attn/bias", "attn.c_attn.bias"),
    ("attn/c_proj/kernel", "attn.c_proj.weight"),
    ("attn/c_proj/bias", "attn.c_proj.bias"),
    ("ln_2/scale", "ln_2.weight"),
    ("ln_2/bias", "ln_2.bias"),
    ("mlp/c_fc/kernel", "mlp.c_fc.weight"),
    ("mlp/c_fc/bias", "mlp.c_fc.bias"),
    ("mlp/c_proj/kernel", "mlp.c_proj.weight"),
    ("mlp/c_proj/bias", "mlp.c_proj.bias"),
]

HF_PREFIX = "transformer."
HF_IGNORE = r"(\.attn\.bias|\.attn\.masked_bias|^lm_head\.weight)$"  # buffers; tied head


def _blocks(n_layer: int, scan_layers: bool) -> list[hub.Entry]:
    return hub.stack_rows(
        [(path, name, False) for path, name in _LAYER_ROWS],
        n_layer,
        scan_layers,
        "h",
        "transformer.h",
    )


def hf_table(config: GPT2Config, scan_layers: bool = False) -> list[hub.Entry]:
    """Every parameter's Flax path and Hugging Face ``GPT2LMHeadModel`` tensor name."""
    return [
        hub.Entry("wte/embedding", "transformer.wte.weight"),
        hub.Entry("wpe/embedding", "transformer.wpe.weight"),
        hub.Entry("ln_f/scale", "transformer.ln_f.weight"),
        hub.Entry("ln_f/bias", "transformer.ln_f.bias"),
    ] + _blocks(config.n_layer, scan_layers)


def peft_modules(params: Any) -> PeftModuleMap:
    """The PEFT module map of a GPT-2 parameter tree: what ``model="gpt2"`` means to
    ``lorax.export_peft`` / ``lorax.import_peft`` (registered when this module is imported).

    The layer count is read from the paths (``h_<i>/...``, or the stack of
    ``ScanLayers/...``), so a tree of any depth maps. GPT-2's ``Conv1D`` stores its weight
    ``[in, out]``: ``fan_in_fan_out`` is true.

    Args:
      params: a GPT-2 parameter tree, wrapped or not.

    Returns:
      Every block kernel's ``transformer.h.<i>...`` module.

    Example:
      >>> import numpy as np
      >>> from lorax.models import gpt2
      >>> m = gpt2.peft_modules({"h_1": {"mlp": {"c_fc": {"kernel": np.zeros((2, 8))}}}})
      >>> m.modules["h_1/mlp/c_fc/kernel"], m.fan_in_fan_out
      ((('transformer.h.1.mlp.c_fc', None),), True)
    """
    n_layer, scanned = hub.layer_count(params, hub.param_paths(params), "h")
    top = [e for e in hf_table(GPT2Config(n_layer=1)) if not e.path.startswith("h_")]
    rows = top + _blocks(n_layer, scanned)
    return PeftModuleMap(
        modules=hub.peft_modules(rows), fan_in_fan_out=True, tensors=hub.peft_tensors(rows)
    )


register_peft_family("gpt2", peft_modules)


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
) -> tuple[GPT2, dict]:
    """Loads a Hugging Face GPT-2 checkpoint.

    Args:
      name_or_dir: a directory with config.json and model.safetensors (or a sharded index),
        or a Hub name such as ``"gpt2"`` (downloaded when online, else read from the cache).
      dtype: compute dtype, and the parameters' dtype unless ``param_dtype`` is given.
      param_dtype: dtype of the loaded parameters.
      scan_layers, remat_policy, attention_impl: see :class:`GPT2`.
      mesh: a ``jax.sharding.Mesh`` with axes ``fsdp`` / ``tp``: each tensor is placed on it
        as it is read (by ``lorax.models.partitioning``'s logical axes), so no host holds
        the whole model; with several processes each keeps only its devices' shards.
      rules: logical-to-mesh rules (default ``partitioning.RULES["fsdp_tp"]``).
      quantize: ``"nf4"`` or ``"int8"``: each weight ``lorax.quantize`` targets by default
        is quantized as soon as it is read (on its mesh shards when ``mesh`` is given),
        so the dense model is never held at once; None keeps the weights dense.

    Returns:
      ``(model, params)``, with ``model.apply({"params": params}, input_ids)`` the logits.

    Raises:
      ValueError: a config of another model_type or with a feature GPT-2 here does not
        implement (naming config.json and the key), or weights that do not match it;
        :class:`lorax.CheckpointError` for a config.json, index or safetensors file that
        does not parse (naming it).
      FileNotFoundError: no checkpoint there, or a shard the index names is missing.
    """
    return hub.load_model(
        name_or_dir,
        GPT2Config,
        GPT2,
        hf_table,
        dtype=dtype,
        param_dtype=param_dtype,
        strip_prefix=HF_PREFIX,
        ignore=HF_IGNORE,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        attention_impl=attention_impl,
        mesh=mesh,
        rules=rules,
        quantize=quantize,
    )


def save_pretrained(directory: str | os.PathLike, model: GPT2, params: dict) -> None:
    """Writes ``params`` (dense) as a Hugging Face GPT-2 checkpoint that both
    :func:`from_pretrained` and transformers' ``GPT2LMHeadModel.from_pretrained`` read."""
    hub.save_model(directory, model, params, hf_table)
