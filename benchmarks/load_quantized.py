"""Quantize while loading: the host memory of ``from_pretrained(..., quantize="nf4")``.

``lorax.models.llama.from_pretrained(directory, quantize="nf4")`` reads a safetensors
checkpoint one tensor at a time and quantizes each weight as soon as it is read, so the host
holds the NF4 model plus the tensor in flight, never the dense model. This script measures
that: it writes a checkpoint of random weights at a Llama shape (sharded one file per layer,
as the Hub's are, in bfloat16 by default), then loads it in fresh processes, densely and
quantized, and reports each load's peak resident memory above the process's resident memory
just before the load (VmHWM against VmRSS of ``/proc/self/status``; Linux)::

    python benchmarks/load_quantized.py                       # Llama-3.2-1B's shape (~2.5 GB)
    python benchmarks/load_quantized.py --shape small         # a 57M-parameter Llama, float32
    python benchmarks/load_quantized.py --dir /data/ckpt --keep   # write there and keep it

It prints a table and one JSON line. The NF4 load should peak near the NF4 tree's bytes (the
embedding table stays dense, as ``lorax.quantize`` leaves it) plus one tensor, the dense load
near the dense tree's bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Llama-3.2-1B's published shape (lorax.models.llama.CONFIGS): 1.24B parameters
    "1b": "llama-3.2-1b",
    # a shape that a test can afford: 57M parameters, 226 MB in float32
    "small": dict(
        vocab_size=2048,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
}


def config_of(shape: str):
    from lorax.models import llama

    if shape not in SHAPES:
        raise SystemExit(f"--shape: {shape!r}; known: {sorted(SHAPES)}")
    spec = SHAPES[shape]
    return llama.CONFIGS[spec] if isinstance(spec, str) else llama.LlamaConfig(**spec)


def write_checkpoint(directory: Path, shape: str, dtype: str, seed: int = 0) -> dict:
    """A Hugging Face Llama checkpoint of random weights (normal, std 0.02), one shard per
    layer plus one for the rest, written without ever holding more than one layer."""
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    from lorax.models import hub, llama

    config = config_of(shape)
    model = llama.Llama(config)
    shapes = hub.abstract_shapes(model)
    shards: dict[str, list] = {}
    for entry in llama.hf_table(config):  # one shard per decoder layer, one for the rest
        layer = re.search(r"\.layers\.(\d+)\.", entry.name)
        shards.setdefault(f"{int(layer[1]):06d}" if layer else "rest", []).append(entry)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map, total, largest = {}, 0, 0
    for i, (_, entries) in enumerate(sorted(shards.items())):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for entry in entries:
            flax_shape = shapes[entry.path]  # the table of unscanned layers: one per path
            hf_shape = tuple(reversed(flax_shape)) if entry.transpose else tuple(flax_shape)
            if entry.name.endswith("norm.weight"):
                value = np.ones(hf_shape, np.float32)
            else:
                value = rng.standard_normal(hf_shape, np.float32) * 0.02
            tensors[entry.name] = value.astype(jnp.dtype(dtype))
            weight_map[entry.name] = file
            total += tensors[entry.name].nbytes
            largest = max(largest, tensors[entry.name].nbytes)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    return {"checkpoint_bytes": total, "largest_tensor_bytes": largest}


def _status_bytes(field: str) -> int:
    """A size of /proc/self/status (Linux): VmRSS, resident now; VmHWM, the peak. Not
    ``ru_maxrss``: a child started by fork + exec inherits its parent's peak there."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(directory: Path, quantize: str | None, dtype: str) -> dict:
    """Loads ``directory`` in this process (call it in a fresh one); returns the peak
    resident bytes above the resident bytes just before the load, and the tree's bytes."""
    import jax
    import jax.numpy as jnp

    import lorax
    from lorax.models import llama

    # start XLA and compile the quantizer once, so the load's figure is the load's own
    jax.block_until_ready(lorax.quantize({"w": jnp.ones((64, 64), dtype)}, "nf4"))
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    _, params = llama.from_pretrained(directory, dtype=dtype, quantize=quantize)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    leaves = jax.tree.leaves(params)
    return {
        "quantize": quantize,
        "peak_above_start_bytes": peak - before,
        "tree_bytes": sum(int(x.nbytes) for x in leaves),
        "seconds": seconds,
    }


def measure_in_subprocess(directory: Path, quantize: str | None, dtype: str) -> dict:
    argv = [sys.executable, __file__, "--measure", str(directory), "--dtype", dtype]
    if quantize:
        argv += ["--quantize", quantize]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(shape: str, dtype: str, directory: Path | None = None, keep: bool = False) -> dict:
    """Writes the checkpoint, loads it densely and as NF4 in fresh processes; the figures."""
    made = directory is None
    directory = Path(tempfile.mkdtemp(prefix="lorax-load-")) if made else Path(directory)
    try:
        t0 = time.perf_counter()
        written = write_checkpoint(directory, shape, dtype)
        written["write_seconds"] = time.perf_counter() - t0
        dense = measure_in_subprocess(directory, None, dtype)
        nf4 = measure_in_subprocess(directory, "nf4", dtype)
    finally:
        if made and not keep:
            shutil.rmtree(directory, ignore_errors=True)
    return {"shape": shape, "dtype": dtype, **written, "dense": dense, "nf4": nf4}


def table(result: dict) -> str:
    gb = 1e9
    rows = [
        "| load | tree GB | peak above start GB | peak / dense tree | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    dense_tree = result["dense"]["tree_bytes"]
    for name in ("dense", "nf4"):
        r = result[name]
        rows.append(
            f"| {name} | {r['tree_bytes'] / gb:.3f} | {r['peak_above_start_bytes'] / gb:.3f} | "
            f"{r['peak_above_start_bytes'] / dense_tree:.2f} | {r['seconds']:.1f} |"
        )
    head = (
        f"shape {result['shape']}, {result['dtype']} checkpoint of "
        f"{result['checkpoint_bytes'] / gb:.3f} GB (largest tensor "
        f"{result['largest_tensor_bytes'] / gb:.3f} GB)"
    )
    return head + "\n\n" + "\n".join(rows)


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1b", help=f"one of {sorted(SHAPES)}")
    p.add_argument("--dtype", default=None, help="checkpoint and load dtype (1b: bfloat16)")
    p.add_argument("--dir", type=Path, help="where the checkpoint goes (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's mode
    p.add_argument("--quantize", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.shape == "1b" else "float32")
    if args.measure:
        print(json.dumps(measure(args.measure, args.quantize, dtype)))
        return None
    result = run(args.shape, dtype, args.dir, args.keep)
    print(table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
