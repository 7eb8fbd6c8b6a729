"""QLoRA at the LLaMA-65B shape: peak device memory of one train step.

The shape of the QLoRA paper's largest run (d 8192, 80 layers, 64 heads without GQA, ff 22016,
vocab 32000: 65.2B parameters), random weights, LoRA r=16 on every attention and MLP
projection, batch 1 x 512 tokens, each layer rematerialized. The NF4 weights are created on
the device one layer at a time (a ``lax.map`` that draws a layer and quantizes it), so the
dense model never exists; the embedding, LM head and norms stay bf16 as in bitsandbytes.

    python benchmarks/qlora_65b.py                  # on a GPU: build, train 3 steps, report
    python benchmarks/qlora_65b.py --analyze        # anywhere: XLA's buffer plan, no arrays
    python benchmarks/qlora_65b.py --small          # CPU smoke test at a tiny width

``--analyze`` compiles the step for abstract inputs of the full shape on whatever backend
JAX has and prints XLA's memory analysis (arguments + outputs - aliased + temporaries): a
prediction, not a measurement; a real run reports the allocator's peak. One JSON line goes to
stdout and to ``--out``/qlora_65b.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GB, GIB = 1e9, 2**30


def config_for(args):
    import dataclasses

    from bench_shapes import llama_config

    from lorax.models import llama

    if args.small:
        return llama.LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            vocab_size=1000,
        )
    config = llama_config("llama-65b")
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    return config


def nf4_layers(key, n_layers: int, layer_shape: tuple[int, ...], std: float):
    """``n_layers`` random N(0, std) weights, NF4-quantized one layer at a time, stacked."""
    import jax
    import jax.numpy as jnp

    from lorax.quant import quantize_nf4

    def one(k):  # float32 draws: quantize_nf4 reads float32, so no rounding step between
        return quantize_nf4(std * jax.random.normal(k, layer_shape, jnp.float32))

    return jax.lax.map(one, jax.random.split(key, n_layers))


def make_base(model, key):
    """The model's parameters with every layer kernel NF4: built leaf by leaf, each by its
    own jitted program, so no more than one dense layer matrix is alive at a time."""
    import jax
    import jax.numpy as jnp

    from lorax.paths import path_str

    shapes = jax.eval_shape(model.init, key, jnp.zeros((1, 8), jnp.int32))["params"]
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    make_layers = jax.jit(nf4_layers, static_argnums=(1, 2, 3))
    leaves = []
    for i, (path, sds) in enumerate(paths):
        name = path_str(path)
        k = jax.random.fold_in(key, i)
        if "ScanLayers" in name and name.endswith("kernel"):
            leaves.append(make_layers(k, sds.shape[0], tuple(sds.shape[1:]), 0.02))
        elif name.endswith(("scale", "weight")):  # RMSNorm gains
            leaves.append(jnp.ones(sds.shape, jnp.bfloat16))
        else:
            leaves.append(
                jax.jit(lambda k, s=sds.shape: 0.02 * jax.random.normal(k, s, jnp.bfloat16))(k)
            )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), leaves)


def nbytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--analyze",
        action="store_true",
        help="compile for abstract inputs and print XLA's memory plan",
    )
    p.add_argument("--small", action="store_true", help="tiny width (CPU smoke test)")
    p.add_argument("--layers", type=int, default=None, help="override the 80 layers")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--remat", default="nothing_saveable", help="jax.checkpoint_policies name per layer"
    )
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    import lorax
    from lorax.models import llama

    config = config_for(args)
    model = llama.Llama(config, jnp.bfloat16, scan_layers=True, remat_policy=args.remat)
    if jax.default_backend() == "gpu":
        model = model.clone(attention_impl="cudnn")
    key = jax.random.key(0)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, config.vocab_size)

    def adapt(base):
        return lorax.wrap(
            base,
            rank=args.rank,
            alpha=2 * args.rank,
            targets=TARGETS,
            dtype=jnp.float32,
            key=jax.random.key(2),
        )

    def loss_of(trainable, frozen, tokens):
        logits = lorax.lora(model.apply)(
            {"params": lorax.combine(trainable, frozen)}, tokens[:, :-1]
        )
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        ).mean()

    tx = optax.adamw(1e-4)

    def update(trainable, opt_state, frozen, tokens):
        value, grads = jax.value_and_grad(loss_of)(trainable, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    step = jax.jit(update, donate_argnums=(0, 1))
    n_params = sum(
        x.size
        for x in jax.tree.leaves(jax.eval_shape(model.init, key, jnp.zeros((1, 8), jnp.int32)))
    )
    result = dict(
        shape="llama-65b" if not args.small else "small",
        layers=config.num_hidden_layers,
        params=n_params,
        rank=args.rank,
        batch=args.batch,
        seq=args.seq,
        remat=args.remat,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
    )

    if args.analyze:
        base = jax.eval_shape(lambda k: make_base(model, k), key)
        trainable, frozen = jax.eval_shape(lambda b: lorax.split(adapt(b)), base)
        opt_state = jax.eval_shape(tx.init, trainable)
        start = time.perf_counter()
        compiled = step.lower(trainable, opt_state, frozen, tokens).compile()
        m = compiled.memory_analysis()
        peak = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
        result.update(
            mode="analyze",
            compile_s=round(time.perf_counter() - start, 1),
            frozen_gb=round(nbytes(frozen) / GB, 3),
            trainable_params=sum(x.size for x in jax.tree.leaves(trainable)),
            arguments_gb=round(m.argument_size_in_bytes / GB, 3),
            outputs_gb=round(m.output_size_in_bytes / GB, 3),
            aliased_gb=round(m.alias_size_in_bytes / GB, 3),
            temp_gb=round(m.temp_size_in_bytes / GB, 3),
            predicted_peak_gb=round(peak / GB, 3),
            predicted_peak_gib=round(peak / GIB, 3),
        )
    else:

        def stats() -> dict:
            return jax.devices()[0].memory_stats() or {}  # None on the CPU

        start = time.perf_counter()
        base = make_base(model, key)
        jax.block_until_ready(base)
        built_s = time.perf_counter() - start
        build_peak = stats().get("peak_bytes_in_use", 0)
        trainable, frozen = lorax.split(adapt(base))
        del base
        opt_state = tx.init(trainable)
        resident = stats().get("bytes_in_use", 0)
        losses, times = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainable, opt_state, value = step(trainable, opt_state, frozen, tokens)
            losses.append(float(value))  # a host sync per step: this measures memory
            times.append(time.perf_counter() - start)
        peak = stats().get("peak_bytes_in_use", 0)
        result.update(
            mode="run",
            build_s=round(built_s, 1),
            frozen_gb=round(nbytes(frozen) / GB, 3),
            trainable_params=sum(x.size for x in jax.tree.leaves(trainable)),
            build_peak_gb=round(build_peak / GB, 3),
            resident_gb=round(resident / GB, 3),
            peak_gb=round(peak / GB, 3),
            peak_gib=round(peak / GIB, 3),
            host_peak_rss_gb=round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3
            ),
            step_s=round(min(times[1:] or times), 3),
            losses=losses,
        )
        if not all(math.isfinite(v) for v in losses):
            raise SystemExit(f"qlora_65b: non-finite loss {losses}")
    print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "qlora_65b.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
