"""Sharded train steps without the weights: XLA's per-device memory plan and the collectives
of LoRA, QLoRA and full fine-tuning on FSDP and FSDP x TP meshes of 8 devices.

For the Llama-1B shape (``bench_shapes.py``'s ``llama-1b-anchor``) and the Llama-2-7B shape
(``lorax.models.llama.CONFIGS["llama-2-7b"]``), layers under ``nn.scan`` and each layer
rematerialized, three train steps (AdamW, donated buffers):

* ``lora``: LoRA r=16 (alpha 32, float32 factors) on q, k, v, o, gate, up and down over a
  bf16 base; the whole base is frozen.
* ``qlora``: the same adapters over an NF4 base (those seven projections quantized, as
  bitsandbytes does; embedding, LM head and norms stay bf16).
* ``dense``: full fine-tuning, AdamW on every (bf16) weight.

on two meshes: ``fsdp8`` (``make_mesh("fsdp=8")``, ``RULES["fsdp"]``) and ``fsdp4_tp2``
(``make_mesh("fsdp=4,tp=2")``, ``RULES["fsdp_tp"]``). Every input is a
``jax.ShapeDtypeStruct`` carrying the sharding ``lorax.partition_specs`` derives from
``partitioning.logical_axes``; the step is lowered and compiled, nothing is allocated.

Activations (``--activations``): ``batch`` (default) traces the step under
``partitioning.sharded(mesh, rules)``, where the reference models constrain each decoder
layer's hidden states and the logits to the batch split (rows over ``fsdp``, replicated
over ``tp``), which is what FSDP and Megatron-style TP training do. ``auto`` adds no
constraint and leaves the activations to XLA's propagation: with weights split along
``embed`` it can choose to split the activations along ``embed`` too and all-reduce every
projection's output instead of gathering the weights (see the
``all-reduce`` column); both can be given to compare.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharded.py
    python benchmarks/sharded.py --quick           # 1B, lora + dense, fsdp8, batch 8 x 128
    python benchmarks/sharded.py --shape 7b --method qlora --mesh fsdp4_tp2
    python benchmarks/sharded.py --activations batch auto --shape 1b

The script sets that XLA flag itself when it is missing (before importing JAX); on a host
with fewer than 8 accelerators the mesh is made of 8 CPU devices. One JSON document goes to
``--out`` (default ``benchmarks/results/sharded.json``) and a markdown table is printed last.

How to read the table (every size is per device, from the compiled SPMD program):

* ``args`` / ``out`` / ``temp``: ``compiled.memory_analysis()``'s argument, output and
  temporary bytes; ``total`` = args + out - aliased (donated) + temp, XLA's predicted peak.
* ``frozen/dev`` / ``frozen all``: bytes of the frozen arrays (the split's frozen half: base
  weights, NF4 codes and scales, embedding, head, norms) one device holds, and their full
  size; with FSDP the ratio is about the fsdp size (tiny tables are replicated).
* ``all-reduce`` ... ``permute``: the collectives in ``compiled.as_text()``: how many
  instructions and the bytes of their results (tuple results summed), counted once each as
  written (an op inside the scanned layer body is counted once). ``comm/step`` is every
  collective's result bytes as executed in one step (ops in a ``while`` body times its known
  trip count).
* ``max grad reduce``: the largest all-reduce / reduce-scatter instruction's bytes of
  results shaped like a trainable array (whole, per-device shard, partial shard, or one
  layer's slice of a scanned stack; XLA combines many into one tuple-shaped op): the
  gradient reduction. For LoRA / QLoRA it is adapter-sized; for dense, weight-sized.
* ``frozen-sized reduce``: all-reduce / reduce-scatter results shaped like a frozen weight
  matrix (the same variants; dims compared in any order, size-1 dims ignored; a flat array
  by its element count). ``none`` means no gradient of a frozen weight is reduced: the
  frozen weights get no gradient at all. Dense training has no frozen weights (``-``).

CPU caveat: XLA's CPU backend computes bf16 dots in float32: it converts a bf16 base's
whole local shard of the layer stack to float32 before the layer loop (so ``temp`` holds
about twice the frozen shard for LoRA, and likewise for dense; NF4 codes are dequantized
one layer at a time, so QLoRA has no such copy), gathers the converted weights (f32
all-gathers), and lowers reduce-scatter as all-reduce plus a slice. A GPU compile of the
same step gathers bf16 and may use reduce-scatter. The memory plan is the CPU compiler's
(``temp`` especially); the arguments' layout and the frozen bytes are exact.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import gc
import itertools
import json
import math
import re
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = ("1b", "7b")
METHODS = ("lora", "qlora", "dense")
MESHES = {"fsdp8": ("fsdp=8", "fsdp"), "fsdp4_tp2": ("fsdp=4,tp=2", "fsdp_tp")}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
REDUCTIONS = ("all-reduce", "reduce-scatter")
N_DEVICES = 8
GIB, MIB = 2**30, 2**20


# --------------------------------------------------------------------------------------
# The model, the trees and the step
# --------------------------------------------------------------------------------------


def llama_shape(name: str):
    from bench_shapes import llama_config  # the scripts run from benchmarks/

    from lorax.models import llama

    if name == "1b":
        return llama_config("llama-1b-anchor")
    return llama.CONFIGS["llama-2-7b"]


def mesh_devices():
    import jax

    devices = jax.devices()
    if len(devices) < N_DEVICES:
        devices = jax.devices("cpu")
    if len(devices) < N_DEVICES:
        raise SystemExit(
            f"sharded.py: {len(devices)} devices; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES} before JAX starts"
        )
    return devices[:N_DEVICES]


def abstract_trees(model, method: str, rank: int):
    """The dense bf16 params and the tree the step trains (wrapped for LoRA / QLoRA), as
    ShapeDtypeStructs: ``jax.eval_shape`` all the way, so no weight is ever made."""
    import jax
    import jax.numpy as jnp

    import lorax

    def init():
        ids = jnp.zeros((1, 8), jnp.int32)
        params = model.init(jax.random.key(0), ids)["params"]
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

    params = jax.eval_shape(init)
    if method == "dense":
        return params, params
    base = params
    if method == "qlora":
        base = jax.eval_shape(lambda p: lorax.quantize(p, "nf4", targets=TARGETS), params)
    wrapped = jax.eval_shape(
        lambda p: lorax.wrap(
            p,
            rank=rank,
            alpha=2 * rank,
            targets=TARGETS,
            dtype=jnp.float32,
            key=jax.random.key(1),
        ),
        base,
    )
    return params, wrapped


def with_shardings_like(state, params, mesh):
    """``state`` (abstract, from ``jax.eval_shape(tx.init, params)``) with shardings: every
    subtree of ``params``' structure (AdamW's mu and nu) sharded like ``params``, the rest
    (the step count) replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    pdef = jax.tree.structure(params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(node):
        if jax.tree.structure(node) == pdef:
            return jax.tree.map(
                lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
                node,
                params,
            )
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), node
        )

    return jax.tree.map(place, state, is_leaf=lambda x: jax.tree.structure(x) == pdef)


def compile_step(model, method, mesh, rules, wrapped, batch, seq, activations):
    """Lowers and compiles one train step for abstract sharded inputs. Returns the compiled
    step, the sharded trainable and frozen trees (frozen None for dense) and timings."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    import lorax
    from lorax.models import partitioning

    specs = lorax.partition_specs(
        wrapped, partitioning.logical_axes(wrapped), rules=rules, mesh=mesh
    )
    placed = lorax.shard(wrapped, specs, mesh=mesh)
    if method == "dense":
        trainable, frozen = placed, None
    else:
        trainable, frozen = lorax.split(placed)
    tx = optax.adamw(1e-4)
    opt_state = with_shardings_like(jax.eval_shape(tx.init, trainable), trainable, mesh)
    tokens = jax.ShapeDtypeStruct(
        (batch, seq + 1), jnp.int32, sharding=NamedSharding(mesh, partitioning.batch_spec(mesh))
    )
    apply = model.apply if method == "dense" else lorax.lora(model.apply)

    def loss_of(t, f, tokens):
        p = t if f is None else lorax.combine(t, f)
        logits = apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        ).mean()

    def update(t, s, f, tokens):
        value, grads = jax.value_and_grad(loss_of)(t, f, tokens)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    step = jax.jit(
        update,
        out_shardings=(
            shardings(trainable),
            shardings(opt_state),
            NamedSharding(mesh, PartitionSpec()),
        ),
        donate_argnums=(0, 1),
    )
    # "batch": traced under the rules, so the models keep their hidden states split over
    # the batch (lorax.models.layers.constrain); "auto": no constraint at all
    scope = partitioning.sharded(mesh, rules) if activations == "batch" else nullcontext()
    start = time.perf_counter()
    with scope:
        lowered = step.lower(trainable, opt_state, frozen, tokens)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return compiled, trainable, frozen, specs, lowered_at - start, done - lowered_at


# --------------------------------------------------------------------------------------
# Shapes of arrays: whole, sharded, per layer
# --------------------------------------------------------------------------------------


def local_size(x) -> int:
    """Bytes of one device's shard of a sharded ShapeDtypeStruct."""
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def full_size(x) -> int:
    return math.prod(x.shape) * x.dtype.itemsize


def shape_key(dims) -> tuple[int, ...]:
    """Dims in any order, size-1 dims ignored."""
    return tuple(sorted(int(d) for d in dims if int(d) != 1))


def shape_variants(shape, spec, mesh_sizes: dict[str, int], stacked: bool) -> set:
    """The shapes an array (or its gradient) can take in the program: whole, cut by any
    subset of the mesh axes of its spec, and (scanned stacks) one layer of each."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    names = sorted(
        {n for e in entries if e is not None for n in ((e,) if isinstance(e, str) else e)}
    )
    out = set()
    for k in range(len(names) + 1):
        for subset in itertools.combinations(names, k):
            dims = []
            for n, e in zip(shape, entries):
                axes = () if e is None else ((e,) if isinstance(e, str) else tuple(e))
                div = math.prod(mesh_sizes[a] for a in axes if a in subset)
                dims.append(n // div if n % div == 0 else n)
            out.add(shape_key(dims))
            if stacked and len(dims) > 1:
                out.add(shape_key(dims[1:]))
    return out


def shape_table(tree, specs, mesh, *, matrices_only: bool) -> tuple[set, set]:
    """(dims keys, flat element counts) of every array of ``tree`` (abstract, plain, not
    wrapped) with its spec; ``matrices_only`` keeps arrays of >= 2 dims per layer."""
    import jax

    from lorax.paths import path_str

    sizes = {str(k): int(v) for k, v in dict(mesh.shape).items()}
    keys: set = set()
    flats: set = set()

    def add(path, x, spec):
        stacked = "ScanLayers" in path_str(path)
        if matrices_only and len(x.shape) - int(stacked) < 2:
            return
        variants = shape_variants(x.shape, tuple(spec or ()), sizes, stacked)
        keys.update(variants)
        flats.update(math.prod(v) for v in variants)

    jax.tree_util.tree_map_with_path(add, tree, specs)
    return keys, flats


# --------------------------------------------------------------------------------------
# The compiled HLO: collectives, their shapes and how often they run
# --------------------------------------------------------------------------------------

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s("
    + "|".join(re.escape(c) for c in COLLECTIVES)
    + r")(-start)?\("
)
_CALLEE = re.compile(
    r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def dtype_bytes(name: str) -> float:
    if name == "pred":
        return 1
    m = re.match(r"[a-z]+?(\d+)", name)
    return int(m.group(1)) / 8 if m else 0


def arrays_of(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO type: one, or each element of a tuple."""
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _ARRAY.findall(type_text)
        if dt not in ("token",)
    ]


def parse_collectives(hlo: str) -> tuple[list[dict], dict]:
    """Every collective instruction of the module, with the computation it sits in and that
    computation's executions per step (``while`` trip counts multiplied down the calls)."""
    ops, calls = [], defaultdict(list)  # calls: caller -> [(callee, factor)]
    entry, current = None, None
    for line in hlo.splitlines():
        if not line.startswith((" ", "\t")):
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if current is None:
            continue
        m = _OP.match(line)
        if m:
            type_text, kind, is_async = m.group(1), m.group(2), bool(m.group(3))
            arrays = arrays_of(type_text)
            if is_async and kind in ("all-gather", "collective-permute") and len(arrays) > 1:
                arrays = [arrays[1]]  # (operand, result, ...): keep the result
            ops.append(dict(kind=kind, computation=current, arrays=arrays))
        trip = _TRIP.search(line)
        factor = int(trip.group(1)) if (trip and " while(" in line) else 1
        for role, callee in _CALLEE.findall(line):
            calls[current].append((callee, factor if role in ("body", "condition") else 1))
        for group in _BRANCHES.findall(line):
            for callee in re.findall(r"%?([\w.\-]+)", group):
                calls[current].append((callee, 1))
    runs = execution_counts(entry, calls)
    for op in ops:
        op["runs"] = runs.get(op["computation"], 1)
    return ops, runs


def execution_counts(entry, calls) -> dict[str, int]:
    """Executions per step of each computation reachable from ``entry`` (a DAG)."""
    order, seen = [], set()

    def visit(name):  # post-order: callees after their callers once reversed
        if name in seen:
            return
        seen.add(name)
        for callee, _ in calls.get(name, ()):
            visit(callee)
        order.append(name)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    if entry is not None:
        visit(entry)
    runs = defaultdict(int)
    if entry is not None:
        runs[entry] = 1
    for name in reversed(order):
        for callee, factor in calls.get(name, ()):
            runs[callee] += runs[name] * factor
    return dict(runs)


def summarize_collectives(ops, trainable_shapes, frozen_shapes) -> dict:
    """Counts and bytes per kind; the reductions classified as gradient-, frozen- or other-
    shaped."""
    t_keys, t_flat = trainable_shapes
    f_keys, f_flat = frozen_shapes

    def matches(dims, keys, flats) -> bool:
        key = shape_key(dims)
        return key in keys or (len(key) == 1 and key[0] in flats)

    kinds = {k: dict(count=0, bytes=0, executed=0, executed_bytes=0) for k in COLLECTIVES}
    grad_op, grad_array, other_max, frozen_hits = 0, 0, 0, []
    for op in ops:
        nbytes = sum(int(math.prod(d) * dtype_bytes(dt)) for dt, d in op["arrays"])
        row = kinds[op["kind"]]
        row["count"] += 1
        row["bytes"] += nbytes
        row["executed"] += op["runs"]
        row["executed_bytes"] += nbytes * op["runs"]
        if op["kind"] not in REDUCTIONS:
            continue
        grads = 0  # a combined (tuple) reduction: its gradient-shaped elements together
        for dt, dims in op["arrays"]:
            size = int(math.prod(dims) * dtype_bytes(dt))
            if f_keys and matches(dims, f_keys, f_flat):
                frozen_hits.append(dict(kind=op["kind"], dtype=dt, dims=list(dims), bytes=size))
            elif matches(dims, t_keys, t_flat):
                grads += size
                grad_array = max(grad_array, size)
            else:
                other_max = max(other_max, size)
        grad_op = max(grad_op, grads)
    return dict(
        kinds=kinds,
        executed_bytes=sum(k["executed_bytes"] for k in kinds.values()),
        max_grad_reduce_bytes=grad_op,
        max_grad_reduce_array_bytes=grad_array,
        max_other_reduce_bytes=other_max,
        frozen_sized_reduces=frozen_hits,
    )


# --------------------------------------------------------------------------------------
# One configuration, the table, the command line
# --------------------------------------------------------------------------------------


def measure(shape: str, method: str, mesh_name: str, activations: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    from lorax.models import llama, partitioning

    config = llama_shape(shape)
    model = llama.Llama(
        config,
        jnp.bfloat16,
        scan_layers=True,
        remat_policy=None if args.remat == "none" else args.remat,
    )
    mesh_spec, rules_name = MESHES[mesh_name]
    mesh = partitioning.make_mesh(mesh_spec, devices=mesh_devices())
    rules = partitioning.RULES[rules_name]
    fsdp = dict(mesh.shape)["fsdp"]
    if args.batch % fsdp:
        raise SystemExit(f"sharded.py: --batch {args.batch} is not a multiple of fsdp {fsdp}")

    params, wrapped = abstract_trees(model, method, args.rank)
    compiled, trainable, frozen, specs, lower_s, compile_s = compile_step(
        model, method, mesh, rules, wrapped, args.batch, args.seq, activations
    )
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )

    import lorax

    # The dense weights' own specs: the shapes a frozen weight's gradient would have.
    dense_specs = lorax.partition_specs(
        params, partitioning.logical_axes(params), rules=rules, mesh=mesh
    )
    t_specs = jax.tree.map(lambda x: x.sharding.spec, trainable)
    trainable_shapes = shape_table(trainable, t_specs, mesh, matrices_only=False)
    frozen_shapes = (set(), set())
    if method != "dense":
        frozen_shapes = shape_table(params, dense_specs, mesh, matrices_only=True)
    ops, _ = parse_collectives(compiled.as_text())
    coll = summarize_collectives(ops, trainable_shapes, frozen_shapes)

    frozen_leaves = jax.tree.leaves(frozen) if frozen is not None else []
    trainable_leaves = jax.tree.leaves(trainable)
    row = dict(
        shape=shape,
        method=method,
        mesh=mesh_name,
        mesh_spec=mesh_spec,
        rules=rules_name,
        activations=activations,
        batch=args.batch,
        seq=args.seq,
        rank=args.rank if method != "dense" else None,
        remat=args.remat,
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        trainable_params=sum(math.prod(x.shape) for x in trainable_leaves),
        lower_s=round(lower_s, 2),
        compile_s=round(compile_s, 2),
        memory_bytes=dict(
            argument=m.argument_size_in_bytes,
            output=m.output_size_in_bytes,
            alias=m.alias_size_in_bytes,
            temp=m.temp_size_in_bytes,
            total=total,
        ),
        memory_gib=dict(
            argument=m.argument_size_in_bytes / GIB,
            output=m.output_size_in_bytes / GIB,
            alias=m.alias_size_in_bytes / GIB,
            temp=m.temp_size_in_bytes / GIB,
            total=total / GIB,
        ),
        trainable_bytes_per_device=sum(local_size(x) for x in trainable_leaves),
        trainable_bytes_total=sum(full_size(x) for x in trainable_leaves),
        frozen_bytes_per_device=sum(local_size(x) for x in frozen_leaves),
        frozen_bytes_total=sum(full_size(x) for x in frozen_leaves),
        collectives=coll["kinds"],
        collective_bytes_per_step=coll["executed_bytes"],
        max_grad_reduce_bytes=coll["max_grad_reduce_bytes"],
        max_grad_reduce_array_bytes=coll["max_grad_reduce_array_bytes"],
        max_other_reduce_bytes=coll["max_other_reduce_bytes"],
        frozen_sized_reduces=coll["frozen_sized_reduces"],
    )
    del compiled
    jax.clear_caches()
    gc.collect()
    return row


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}" if n < 100 * MIB else f"{n / MIB:,.0f}"


def table(rows: list[dict]) -> str:
    head = [
        "shape",
        "method",
        "mesh",
        "acts",
        "args GiB",
        "out GiB",
        "temp GiB",
        "total GiB",
        "frozen/dev GiB",
        "frozen all GiB",
        "all-reduce n / MiB",
        "all-gather n / MiB",
        "reduce-scatter n / MiB",
        "all-to-all n / MiB",
        "permute n / MiB",
        "comm/step MiB",
        "max grad reduce MiB",
        "frozen-sized reduce",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        g = r["memory_gib"]
        cells = [
            r["shape"],
            r["method"],
            r["mesh"],
            r["activations"],
            f"{g['argument']:.3f}",
            f"{g['output']:.3f}",
            f"{g['temp']:.3f}",
            f"{g['total']:.3f}",
            f"{r['frozen_bytes_per_device'] / GIB:.3f}",
            f"{r['frozen_bytes_total'] / GIB:.3f}",
        ]
        for kind in COLLECTIVES:
            c = r["collectives"][kind]
            cells.append(f"{c['count']} / {_mib(c['bytes'])}" if c["count"] else "0")
        cells.append(_mib(r["collective_bytes_per_step"]))
        cells.append(_mib(r["max_grad_reduce_bytes"]))
        hits = r["frozen_sized_reduces"]
        if r["method"] == "dense":
            cells.append("-")
        elif not hits:
            cells.append("none")
        else:
            cells.append(f"YES: {len(hits)}, max {_mib(max(h['bytes'] for h in hits))} MiB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, action="append", help="default: both")
    p.add_argument("--method", choices=METHODS, action="append", help="default: all three")
    p.add_argument("--mesh", choices=sorted(MESHES), action="append", help="default: both")
    p.add_argument(
        "--activations",
        nargs="+",
        choices=("batch", "auto"),
        default=None,
        help="constrain layer activations to the batch split (batch), or not (auto)",
    )
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 8)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 512)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--remat",
        default="nothing_saveable",
        help="jax.checkpoint_policies name per layer, or none",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1B shape, lora and dense, fsdp8 mesh, batch 8 x 128 (a couple of minutes)",
    )
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "sharded.json"),
        help="JSON file (default benchmarks/results/sharded.json)",
    )
    args = p.parse_args(argv)
    if args.quick:
        shapes, methods, meshes = ["1b"], ["lora", "dense"], ["fsdp8"]
        args.batch, args.seq = args.batch or 8, args.seq or 128
    else:
        shapes = args.shape or list(SHAPES)
        methods = args.method or list(METHODS)
        meshes = args.mesh or list(MESHES)
    args.batch, args.seq = args.batch or 8, args.seq or 512
    activations = args.activations or ["batch"]

    import jax

    rows = []
    started = time.perf_counter()
    for shape, method, mesh_name, acts in itertools.product(shapes, methods, meshes, activations):
        row = measure(shape, method, mesh_name, acts, args)
        rows.append(row)
        brief = {k: row[k] for k in ("shape", "method", "mesh", "activations", "compile_s")}
        brief["total_gib"] = round(row["memory_gib"]["total"], 3)
        print(json.dumps(brief), flush=True)
    devices = mesh_devices()
    document = dict(
        meta=dict(
            jax=jax.__version__,
            backend=devices[0].platform,
            device=devices[0].device_kind,
            devices=len(devices),
            batch=args.batch,
            seq=args.seq,
            rank=args.rank,
            remat=args.remat,
            targets=TARGETS,
            wall_s=round(time.perf_counter() - started, 1),
        ),
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {out}", flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
