"""Train-step time and peak memory: LoRA over a bf16 base vs QLoRA over an NF4 base.

The Llama-1B shape of ANCHORS.md (d 2048, 16 layers, GQA 32/8, ff 8192, vocab 32000), batch
4 x 2048, LoRA r=8 alpha=16 on q, k, v, o (the anchor's targets), bf16 compute, AdamW on the
adapters, layers under nn.scan with remat, cuDNN flash attention on GPU. Random weights.
Prints one JSON line. Run each mode in its own process so peak memory is its own:

    python benchmarks/qlora_step.py --mode lora
    python benchmarks/qlora_step.py --mode qlora
    python benchmarks/qlora_step.py --mode lora --small   # CPU smoke test
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lorax

BF16 = jnp.bfloat16


def rope(x, base=10000.0):
    s, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / (base ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = jnp.arange(s, dtype=jnp.float32)[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Block(nn.Module):
    d: int
    heads: int
    kv_heads: int
    ff: int
    attn_impl: str | None

    @nn.compact
    def __call__(self, x, _):
        hd = self.d // self.heads
        dense = lambda feats, name, axis=-1: nn.DenseGeneral(  # noqa: E731
            feats, axis=axis, use_bias=False, dtype=BF16, param_dtype=BF16, name=name)
        h = nn.RMSNorm(dtype=BF16, param_dtype=BF16)(x)
        q = rope(dense((self.heads, hd), "q_proj")(h))
        k = rope(dense((self.kv_heads, hd), "k_proj")(h))
        v = dense((self.kv_heads, hd), "v_proj")(h)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attn_impl)
        x = x + dense(self.d, "o_proj", axis=(-2, -1))(o)
        h = nn.RMSNorm(dtype=BF16, param_dtype=BF16)(x)
        g = dense(self.ff, "gate_proj")(h)
        u = dense(self.ff, "up_proj")(h)
        return x + dense(self.d, "down_proj")(nn.silu(g) * u), None


class Llama(nn.Module):
    d: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    ff: int = 8192
    vocab: int = 32000
    attn_impl: str | None = None

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d, dtype=BF16, param_dtype=BF16, name="embed_tokens")(ids)
        block = nn.remat(Block, prevent_cse=False)
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=self.layers)(self.d, self.heads, self.kv_heads, self.ff,
                                           self.attn_impl, name="ScanLayers")(x, None)
        x = nn.RMSNorm(dtype=BF16, param_dtype=BF16)(x)
        return nn.Dense(self.vocab, use_bias=False, dtype=BF16, param_dtype=BF16,
                        name="lm_head")(x)


def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["lora", "qlora"], required=True)
    ap.add_argument("--small", action="store_true", help="tiny config for a CPU smoke test")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    gpu = jax.default_backend() == "gpu"
    if args.small:
        model, batch, seq = Llama(256, 2, 4, 2, 512, 1000), 2, 128
    else:
        model, batch, seq = Llama(attn_impl="cudnn" if gpu else None), 4, 2048
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, model.vocab)
    params = jax.jit(model.init)(jax.random.key(1), ids)["params"]
    linear = r".*(q|k|v|o|gate|up|down)_proj/kernel"
    dense_linear_bytes = nbytes([l for p, l in jax.tree_util.tree_flatten_with_path(params)[0]
                                 if "_proj" in jax.tree_util.keystr(p)])
    if args.mode == "qlora":
        params = lorax.quantize(params, "nf4", targets=linear, compute_dtype=BF16)
    base_linear_bytes = nbytes([l for p, l in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lorax.is_lorax_leaf)[0] if "_proj" in jax.tree_util.keystr(p)])
    weights_bytes = nbytes(params)
    lp = lorax.wrap(params, rank=8, alpha=16, targets=r".*(q|k|v|o)_proj/kernel",
                    key=jax.random.key(2))
    trainable, frozen = lorax.split(lp)
    del params, lp
    tx = optax.adamw(1e-4)
    opt_state = tx.init(trainable)
    apply = lorax.lora(model.apply, strict=True)

    def loss_fn(t, ids):
        logits = apply({"params": lorax.combine(t, frozen)}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

    @jax.jit
    def step(t, s, ids):
        loss, g = jax.value_and_grad(loss_fn)(t, ids)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    step = jax.jit(step.__wrapped__ if hasattr(step, "__wrapped__") else step,
                   donate_argnums=(0, 1))
    for _ in range(3):
        trainable, opt_state, loss = step(trainable, opt_state, ids)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainable, opt_state, loss = step(trainable, opt_state, ids)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    print(json.dumps(dict(
        bench="qlora_step", mode=args.mode, device=jax.devices()[0].device_kind,
        batch=batch, seq=seq, step_ms=round(dt * 1e3, 1), tok_s=round(batch * seq / dt),
        peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        weights_gib=round(weights_bytes / 2**30, 3),
        linear_weights_vs_bf16=round(base_linear_bytes / dense_linear_bytes, 3),
        loss=float(loss))), flush=True)


if __name__ == "__main__":
    main()
