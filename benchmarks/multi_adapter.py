"""Serving several LoRA adapters in one batch: throughput of 8 adapters (one per row,
``lorax.stack``) against one adapter unmerged and one adapter merged into the base.

The Llama-1B shape of docs/benchmarks.md in bf16, random weights, LoRA r=8 on q, k, v, o
with random (non-zero) B factors; per mode, a prefill forward pass over ``batch x prompt``
tokens and a greedy ``generate`` of ``new`` tokens after the prompt.

    python benchmarks/multi_adapter.py                 # on a GPU
    python benchmarks/multi_adapter.py --small         # CPU smoke test

One JSON line per mode goes to stdout and ``--out``/multi_adapter.jsonl; a markdown table
with the ratios to the single unmerged adapter is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

MODES = ("merged", "single", "multi")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def adapters(base, n: int, rank: int):
    """``n`` LoRA adapters over ``base`` with random A and B (B=0 would hide the cost)."""
    import jax

    import lorax

    trees = []
    for i in range(n):
        tree = lorax.wrap(
            base, rank=rank, alpha=2 * rank, targets=TARGETS, key=jax.random.key(100 + i)
        )
        leaves, treedef = jax.tree.flatten(tree, is_leaf=lorax.is_lorax_leaf)
        keys = jax.random.split(jax.random.key(200 + i), len(leaves))
        leaves = [
            dataclasses.replace(x, b=0.01 * jax.random.normal(k, x.b.shape, x.b.dtype))
            if isinstance(x, lorax.LoraWeight)
            else x
            for x, k in zip(leaves, keys)
        ]
        trees.append(jax.tree.unflatten(treedef, leaves))
    return trees


def timed(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` (its output blocked on), after one warm-up call."""
    import jax

    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import lorax
    from lorax.models import generate, llama

    if args.small:
        config = llama.LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=500,
        )
        args.prompt, args.new = min(args.prompt, 32), min(args.new, 8)
    else:
        from bench_shapes import llama_config

        config = llama_config("llama-1b-anchor")
    model = llama.Llama(config, jnp.bfloat16, scan_layers=True)
    if jax.default_backend() == "gpu":
        model = model.clone(attention_impl="cudnn")
    base = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    trees = adapters(base, args.adapters, args.rank)
    rows_adapter = jnp.arange(args.batch) % args.adapters
    params = {
        "merged": lorax.merge(trees[0]),
        "single": trees[0],
        "multi": lorax.stack(trees, rows_adapter),
    }
    prompt = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 0, config.vocab_size)
    forward = jax.jit(lambda p, x: lorax.lora(model.apply)({"params": p}, x))

    results = []
    for mode in MODES:
        prefill_s = timed(lambda m=mode: forward(params[m], prompt), args.repeats)
        generate_s = timed(
            lambda m=mode: generate(model, params[m], prompt, args.new), max(1, args.repeats // 2)
        )
        results.append(
            dict(
                mode=mode,
                adapters=args.adapters if mode == "multi" else 1,
                batch=args.batch,
                prompt=args.prompt,
                new=args.new,
                rank=args.rank,
                prefill_tok_s=round(args.batch * args.prompt / prefill_s),
                generate_tok_s=round(args.batch * args.new / generate_s),
                prefill_ms=round(1e3 * prefill_s, 2),
                generate_ms=round(1e3 * generate_s, 2),
                backend=jax.default_backend(),
                device=jax.devices()[0].device_kind,
            )
        )
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "multi_adapter.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    single = next(r for r in results if r["mode"] == "single")
    print(
        "| mode | adapters | prefill tokens/s | generate tokens/s | prefill vs single | "
        "generate vs single |\n| --- | --- | --- | --- | --- | --- |"
    )
    for r in results:
        print(
            f"| {r['mode']} | {r['adapters']} | {r['prefill_tok_s']:,} | "
            f"{r['generate_tok_s']:,} | {r['prefill_tok_s'] / single['prefill_tok_s']:.2f}x | "
            f"{r['generate_tok_s'] / single['generate_tok_s']:.2f}x |"
        )
    return results


if __name__ == "__main__":
    main()
