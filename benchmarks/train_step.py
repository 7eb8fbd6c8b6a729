"""Train-step throughput, MFU and peak memory of the reference models: full fine-tune, LoRA
and QLoRA, beside the PyTorch peft anchor (shared/bench/anchor_peft.py) in the same call.

The shapes of docs/benchmarks.md: GPT-2 124M at batch 8 x 1024 (LoRA r=8 on c_attn) and
the Llama-1B shape at batch 4 x 2048 (LoRA r=8 on q, k, v, o); random weights, bf16 compute,
float32 adapters, AdamW, donated buffers, layers under nn.scan, cuDNN attention on GPU.

    python benchmarks/train_step.py                       # every model and mode, + anchor
    python benchmarks/train_step.py --model llama-1b --mode lora --remat dots_saveable
    python benchmarks/train_step.py --small --no-anchor   # CPU smoke test of the script

The QLoRA anchor (shared/bench/anchor_qlora.py: peft + bitsandbytes NF4 on the Llama-1B
shape) runs too when QLoRA on llama-1b is measured and bitsandbytes imports; see
benchmarks/NOTES.md for carrying its wheel to the GPU machine.

Each (model, mode) runs in its own process so that its peak memory is its own; results go
to --out (JSON lines) and a markdown table with the ratios to the anchor is printed last.
MFU counts, as docs/benchmarks.md, 6N (full) or 4N (LoRA, QLoRA) FLOPs per token plus attention
(non-causal, 3 x 4 s d per layer) over 800 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEAK_FLOPS = 800e12
SHAPES = {
    "gpt2-124m": ("gpt2", 8, 1024, ["c_attn"]),
    "llama-1b": ("llama-1b-anchor", 4, 2048, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}
MODES = ("full", "lora", "qlora")
BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench"
ANCHOR, ANCHOR_QLORA = BENCH / "anchor_peft.py", BENCH / "anchor_qlora.py"


def build(name: str, small: bool, remat: str | None):
    import jax.numpy as jnp
    from bench_shapes import llama_config

    from lorax.models import gpt2, llama

    family, batch, seq, targets = SHAPES[name]
    if name.startswith("gpt2"):
        config = (
            gpt2.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=128)
            if small
            else gpt2.CONFIGS[family]
        )
        model = gpt2.GPT2(config, jnp.bfloat16, scan_layers=True, remat_policy=remat)
    else:
        config = (
            llama.LlamaConfig(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
            if small
            else llama_config(family)
        )
        model = llama.Llama(config, jnp.bfloat16, scan_layers=True, remat_policy=remat)
    if small:
        batch, seq = 2, 64
    return model, batch, seq, targets


def measure(
    name: str, mode: str, small: bool, remat: str | None, steps: int, profile: bool = False
) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import lorax

    model, batch, seq, targets = build(name, small, remat)
    if jax.default_backend() == "gpu":
        model = model.clone(attention_impl="cudnn")
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    vocab = model.config.vocab_size
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, vocab)
    apply = lorax.lora(model.apply)

    def loss_of(p):
        logits = apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    tx = optax.adamw(1e-4)
    if mode == "full":
        trainable, frozen = params, None
        loss = loss_of
    else:
        base = params
        if mode == "qlora":
            base = lorax.quantize(params, "nf4", targets=r".*(ScanLayers)/.*kernel")
        lp = lorax.wrap(base, rank=8, alpha=16, targets=targets, dtype=jnp.float32)
        trainable, frozen = lorax.split(lp)
        loss = lambda t, f: loss_of(lorax.combine(t, f))  # noqa: E731
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    opt_state = tx.init(trainable)

    def update(t, s, *frozen):
        value, grads = jax.value_and_grad(loss)(t, *frozen)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    step = jax.jit(update, donate_argnums=(0, 1))
    extra = () if mode == "full" else (frozen,)
    for _ in range(3):  # compile and warm up
        trainable, opt_state, value = step(trainable, opt_state, *extra)
    float(value)
    start = time.perf_counter()
    for _ in range(steps):
        trainable, opt_state, value = step(trainable, opt_state, *extra)
    final = float(value)  # one host sync, after the timed loop
    seconds = (time.perf_counter() - start) / steps
    stats = jax.devices()[0].memory_stats() or {}
    summary = None
    if profile:  # a separate traced run, so that tracing costs nothing in the timing above
        import tempfile

        from profile_summary import summarize

        trace_dir = tempfile.mkdtemp(prefix=f"trace-{name}-{mode}-")  # traces stay out of --out
        with jax.profiler.trace(trace_dir):
            for _ in range(3):
                trainable, opt_state, value = step(trainable, opt_state, *extra)
            float(value)
        summary = summarize(trace_dir, steps=3)
    c = model.config
    layers = getattr(c, "n_layer", None) or c.num_hidden_layers
    width = getattr(c, "n_embd", None) or c.hidden_size
    per_token = (6 if mode == "full" else 4) * n_params + layers * 3 * 4 * seq * width
    tokens_per_s = batch * seq / seconds
    return dict(
        model=name,
        mode=mode,
        batch=batch,
        seq=seq,
        tok_s=round(tokens_per_s),
        step_ms=round(seconds * 1e3, 2),
        mfu=round(per_token * tokens_per_s / PEAK_FLOPS, 4),
        peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        params=n_params,
        trainable=n_trainable,
        loss=final,
        remat=remat,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        **({"profile": summary} if summary else {}),
    )


def table(rows: list[dict], anchors: list[dict]) -> str:
    by = {(a["model"], a["mode"]): a for a in anchors}
    ours = {(r["model"], r["mode"]): r for r in rows}
    lines = [
        "| model | mode | tokens/s | step ms | MFU | peak GiB | vs peft eager | "
        "vs peft+compile | vs bnb QLoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eager = by.get((r["model"], "lora" if r["mode"] != "full" else "full"))
        compiled = by.get((r["model"], "lora+compile")) if r["mode"] != "full" else None
        bnb = by.get((r["model"], "qlora-bnb")) if r["mode"] == "qlora" else None
        ratio = lambda a: f"{r['tok_s'] / a['tok_s']:.2f}x" if a else "-"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['tok_s']:,} | {r['step_ms']} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_gib']} | {ratio(eager)} | "
            f"{ratio(compiled)} | {ratio(bnb)} |"
        )
    for a in anchors:
        lines.append(
            f"| {a['model']} | peft {a['mode']} | {a['tok_s']:,} | {a['step_ms']} | "
            f"- | {a['peak_gib']} | | | |"
        )
    for model in SHAPES:
        lora, qlora = ours.get((model, "lora")), ours.get((model, "qlora"))
        if lora and qlora:
            lines.append(
                f"\n{model}: our QLoRA step / our LoRA step = "
                f"{qlora['step_ms'] / lora['step_ms']:.3f}"
            )
    return "\n".join(lines)


def run_anchors(models: list[str], modes: list[str]) -> list[dict]:
    """The PyTorch anchors in child processes; their JSON lines as rows of the table."""
    anchors = []
    done = subprocess.run([sys.executable, str(ANCHOR), *models], capture_output=True, text=True)
    anchors += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode:
        print(f"anchor failed:\n{done.stderr[-3000:]}", file=sys.stderr)
    if "llama-1b" not in models or "qlora" not in modes:
        return anchors
    if subprocess.run(
        [sys.executable, "-c", "import bitsandbytes"], capture_output=True
    ).returncode:
        print(
            "QLoRA anchor skipped: bitsandbytes does not import (benchmarks/NOTES.md)",
            file=sys.stderr,
        )
        return anchors
    done = subprocess.run([sys.executable, str(ANCHOR_QLORA)], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("{") and '"qlora-anchor"' in line:
            row = json.loads(line)
            anchors.append(
                dict(
                    model="llama-1b",
                    mode=f"{row['mode']}-bnb",
                    tok_s=row["tok_s"],
                    step_ms=row["step_ms"],
                    peak_gib=row["peak_gib"],
                    weights_gib=row["weights_gib"],
                )
            )
        elif line.startswith("{"):
            print(line, file=sys.stderr)  # bitsandbytes' NF4 against the numpy reference
    if done.returncode:
        print(f"QLoRA anchor failed:\n{done.stderr[-3000:]}", file=sys.stderr)
    return anchors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SHAPES), action="append")
    p.add_argument("--mode", choices=MODES, action="append")
    p.add_argument("--remat", default=None, help="a jax.checkpoint_policies name per layer")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--no-anchor", action="store_true", help="skip the PyTorch peft anchor")
    p.add_argument(
        "--profile",
        action="store_true",
        help="trace 3 more steps of each mode and report time per XLA op",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where results.jsonl goes")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    models, modes = args.model or sorted(SHAPES), args.mode or list(MODES)
    if args.one:
        print(
            json.dumps(
                measure(models[0], modes[0], args.small, args.remat, args.steps, args.profile)
            )
        )
        return
    rows = []
    for model in models:
        for mode in modes:
            cmd = (
                [
                    sys.executable,
                    __file__,
                    "--one",
                    "--model",
                    model,
                    "--mode",
                    mode,
                    "--steps",
                    str(args.steps),
                ]
                + (["--small"] if args.small else [])
                + (["--remat", args.remat] if args.remat else [])
                + (["--profile"] if args.profile else [])
            )
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{model} {mode} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    anchors = [] if args.no_anchor else run_anchors(models, modes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        for r in rows + [{"anchor": True, **a} for a in anchors]:
            f.write(json.dumps(r) + "\n")
    print(table(rows, anchors))
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in prof["kinds"].items())
            print(
                f"\n{r['model']} {r['mode']}: ops busy {prof['busy_ms']:.2f} of "
                f"{r['step_ms']} ms per step ({kinds})"
            )
            for op, kind, ms, share in prof["top"][:8]:
                print(f"  {ms:8.3f} ms  {100 * share:5.1f}%  {kind:10s} {op}")


if __name__ == "__main__":
    main()
