"""Where a step's time goes: a ``jax.profiler`` trace summed per XLA op and per kind of op.

    python benchmarks/profile_summary.py TRACE_DIR [--steps N] [--top K]

Reads the newest ``*.xplane.pb`` under TRACE_DIR with ``jax.profiler.ProfileData`` (no
TensorBoard needed). On a GPU it sums the kernels of the device plane, each attributed to its
XLA op by the trace's ``hlo_op`` stat; on the CPU the host thunks that carry one. Kinds:
matmul (cuBLAS / cuBLASLt gemms, ``dot`` fusions), attention (cuDNN fused attention),
copy / transpose, collective, fusion (the elementwise and reduction code XLA generates),
other. ``train_step.py --profile`` calls :func:`summarize` on its own trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os


def _kind(op: str, kernel: str) -> str:
    text = f"{op} {kernel}".lower()
    if any(k in text for k in ("cudnn", "flash", "fmha", "dot_product_attention", "sdpa")):
        return "attention"
    if any(k in text for k in ("gemm", "cublas", "dot", "matmul", "nvjet", "xmma", "ynn")):
        return "matmul"
    if any(k in text for k in ("all-reduce", "all-gather", "reduce-scatter", "nccl")):
        return "collective"
    if any(k in text for k in ("copy", "transpose", "memcpy", "memset")):
        return "copy"
    if "fusion" in text or "loop_" in text or "input_" in text:
        return "fusion"
    return "other"


def summarize(trace_dir: str, steps: int = 1, top: int = 15) -> dict:
    """Per-op and per-kind time of the ops in the newest trace under ``trace_dir``.

    Args:
      trace_dir: the directory given to ``jax.profiler.trace``.
      steps: how many train steps the trace holds (times are reported per step).
      top: how many of the most expensive ops to list.

    Returns:
      ``{"plane", "busy_ms", "kinds": {kind: ms}, "top": [[op, kind, ms, share], ...]}``,
      every time in milliseconds per step.
    """
    from jax.profiler import ProfileData

    files = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        raise FileNotFoundError(f"profile_summary: no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if not planes:
        planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
    per_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    for plane in planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if op is None:
                    continue
                per_op[(str(op), event.name)] += event.duration_ns / 1e6 / steps
    by_op: dict[str, list] = {}
    for (op, kernel), ms in per_op.items():
        entry = by_op.setdefault(op, [op, _kind(op, kernel), 0.0])
        entry[2] += ms
    busy = sum(e[2] for e in by_op.values())
    kinds: dict[str, float] = collections.defaultdict(float)
    for _, kind, ms in by_op.values():
        kinds[kind] += ms
    ranked = sorted(by_op.values(), key=lambda e: -e[2])[:top]
    return dict(
        plane=planes[0].name if planes else None,
        busy_ms=round(busy, 3),
        kinds={k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        top=[
            [op, kind, round(ms, 3), round(ms / busy, 4) if busy else 0.0]
            for op, kind, ms in ranked
        ],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="train steps in the trace")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    print(json.dumps(summarize(args.trace_dir, args.steps, args.top), indent=1))


if __name__ == "__main__":
    main()
