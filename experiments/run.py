"""lorax's research questions, answered by measurement in one command.

How low is the rank of a fine-tuning update, what does each rank cost and buy, how does a 4-bit
base change learning, and when is full fine-tuning worth it? This runs the experiments that
answer them on the main job's offline task family (examples/finetune_gpt2.py: a base trained on
two-digit addition, task A, adapted to the same sums written with letters, task B; accuracy and
perplexity on number pairs neither task trained on), with several seeds:

1. rank: LoRA at r in {1, 2, 4, 8, 16, 64} and full fine-tuning;
2. memory: full fine-tuning, LoRA, QLoRA (NF4 base), DoRA, IA3 and AdaLoRA at the budget of r=8;
3. targets: Q; Q,K; Q,K,V; Q,K,V,O; all linear layers including the MLP;
4. delta: the learned update's singular values, energy in the top k, effective rank, the
   similarity of the r=8 and r=64 subspaces, and the amplification factor.

It writes ``results/*.json`` (one per experiment, every run and seed), ``results/report.md``
(the tables, mean and spread over seeds) and matplotlib plots ``results/*.png``::

    python experiments/run.py                   # CPU, offline: under 20 minutes on 2 cores
    python experiments/run.py --quick           # tiny sizes, one seed: a few minutes
    python experiments/run.py --model gpt2 --data notes.txt   # a real GPT-2 on your text

The base model is a small Llama (separate q, k, v and o projections, so every target set of
experiment 3 exists) trained here on task A and cached in ``--out``. With ``--model`` (a Hub
name or a checkpoint directory, GPT-2 or Llama) the base is that model and, with ``--data``, the
quality measure is perplexity on a held-out tenth of the text.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lorax
from lorax.models import gpt2, hub, llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_gpt2 as job  # noqa: E402  (the main job: its tasks, data and accuracy)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
# GPT-2 fuses q, k and v into one matrix: its target sets are the separable ones
GPT2_TARGETS = {
    "Q,K,V": (r".*attn/c_attn/kernel",),
    "Q,K,V,O": (r".*attn/c_attn/kernel", r".*attn/c_proj/kernel"),
    "all": ("c_attn", "c_proj", "c_fc"),
}
LLAMA_TARGETS = {
    "Q": ("q_proj",),
    "Q,K": ("q_proj", "k_proj"),
    "Q,K,V": ("q_proj", "k_proj", "v_proj"),
    "Q,K,V,O": ATTENTION,
    "all": ALL_LINEAR,
}


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """How big and how long: the base, the adaptation and the measurement."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    base_steps: int
    steps: int
    batch: int
    eval: int
    seeds: int
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
    budget: int = 8  # the rank of the memory and target tables (the others match its budget)
    delta_ranks: tuple[int, int] = (8, 64)  # the two adapters whose subspaces are compared
    target_sets: tuple[str, ...] = ("Q", "Q,K", "Q,K,V", "Q,K,V,O", "all")
    time_steps: int = 5  # the last steps of each run, timed


FULL = Sizes(
    hidden=128, layers=4, heads=4, ffn=256, base_steps=1000, steps=200, batch=64, eval=300, seeds=3
)
QUICK = Sizes(
    hidden=32,
    layers=1,
    heads=2,
    ffn=64,
    base_steps=30,
    steps=6,
    batch=16,
    eval=20,
    seeds=1,
    ranks=(2, 4),
    budget=2,
    delta_ranks=(2, 4),
    target_sets=("Q", "all"),
    time_steps=2,
)
# peak learning rates, chosen by a sweep of LoRA r=8 and full fine-tuning on these tasks
# (1e-3, 3e-3, 1e-2: 3e-3 was best for both); IA3's vectors need more
LEARNING_RATES = {"ia3": 3e-2}
DEFAULT_LR = 3e-3
SEQ = 16  # tokens per row: every task example fits


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One way to fine-tune: a table row."""

    name: str
    method: str  # full, lora, qlora, dora, ia3, adalora
    rank: int | None = None
    targets: str = "all"  # a key of the target sets
    experiments: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name


def variants(sizes: Sizes, target_sets: dict[str, tuple[str, ...]]) -> list[Variant]:
    """Every distinct run, with the experiments (tables) it belongs to."""
    rows: dict[str, Variant] = {}

    def add(v: Variant, experiment: str) -> None:
        old = rows.get(v.name)
        rows[v.name] = replace(
            old or v, experiments=(*(old.experiments if old else ()), experiment)
        )

    add(Variant(name="full", method="full"), "rank")
    for r in sizes.ranks:
        add(Variant(name=f"lora r={r}", method="lora", rank=r), "rank")
    budget = sizes.budget
    add(Variant(name="full", method="full"), "memory")
    add(Variant(name=f"lora r={budget}", method="lora", rank=budget), "memory")
    for method in ("qlora", "dora", "adalora"):
        add(Variant(name=f"{method} r={budget}", method=method, rank=budget), "memory")
    add(Variant(name="ia3", method="ia3"), "memory")
    for label in (t for t in target_sets if t in sizes.target_sets):
        name = f"lora r={budget}" if label == "all" else f"lora r={budget} {label}"
        add(Variant(name=name, method="lora", rank=budget, targets=label), "targets")
    return list(rows.values())


# --------------------------------------------------------------------------------- the task


@dataclass
class Task:
    """The base model and the data of the adaptation."""

    model: Any
    params: Any
    tok: Any
    train: tuple[np.ndarray, np.ndarray]  # token rows, loss mask
    held_out: tuple[np.ndarray, np.ndarray]
    eval_examples: list | None  # task B prompts and answers (None with --data)
    arch: str  # "llama" or "gpt2"
    base_info: dict = field(default_factory=dict)


def small_llama(sizes: Sizes) -> llama.Llama:
    return llama.Llama(
        llama.LlamaConfig(
            vocab_size=256,
            hidden_size=sizes.hidden,
            intermediate_size=sizes.ffn,
            num_hidden_layers=sizes.layers,
            num_attention_heads=sizes.heads,
            max_position_embeddings=64,
            bos_token_id=job.ByteTokenizer.eos,
            eos_token_id=job.ByteTokenizer.eos,
        )
    )


def base_on_task_a(sizes: Sizes, out: Path, log: Callable[[str], None]) -> tuple[Any, Any, dict]:
    """The small Llama trained on task A (full fine-tuning), cached under ``out/base``."""
    tok, directory = job.ByteTokenizer(), out / "base"
    model = small_llama(sizes)
    stamp = json.dumps(
        {"config": asdict(model.config), "steps": sizes.base_steps, "batch": sizes.batch},
        sort_keys=True,
        default=str,
    )
    if (directory / "stamp.json").is_file() and (directory / "stamp.json").read_text() == stamp:
        model, params = llama.from_pretrained(directory)
        log(f"base: the cached task-A model in {directory}")
        return model, params, json.loads((directory / "info.json").read_text())
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    pairs, held_out = job.number_pairs(0, sizes.eval)
    rows = job.rows_from_examples(job.task_examples(job.task_a, pairs, tok), SEQ, tok.eos)
    t0 = time.perf_counter()
    params, _, _ = train_steps(
        lambda p, _, x, m: job.loss_fn(model.apply, p, x, m),
        params,
        {},
        job.batches(*rows, sizes.batch, 0),
        sizes.base_steps,
        3e-3,
    )
    examples_a = job.task_examples(job.task_a, held_out, tok)
    info = {
        "steps": sizes.base_steps,
        "seconds": time.perf_counter() - t0,
        "task_a_accuracy": job.accuracy(model, params, examples_a, tok),
    }
    llama.save_pretrained(directory, model, params)
    (directory / "info.json").write_text(json.dumps(info))
    (directory / "stamp.json").write_text(stamp)
    log(
        f"base: trained on task A for {sizes.base_steps} steps in {info['seconds']:.0f}s; "
        f"held-out task A accuracy {info['task_a_accuracy']:.1%}"
    )
    return model, params, info


def load_task(args: argparse.Namespace, sizes: Sizes, log: Callable[[str], None]) -> Task:
    tok: Any = job.ByteTokenizer()
    if args.model:
        directory = hub.resolve(args.model)
        kind = hub.read_config(directory).get("model_type")
        if kind not in ("gpt2", "llama"):
            sys.exit(f"--model: model_type {kind!r}; this runner knows 'gpt2' and 'llama'")
        module = gpt2 if kind == "gpt2" else llama
        model, params = module.from_pretrained(args.model)
        eos = model.config.eos_token_id
        tok = job.HFTokenizer(directory, eos[0] if isinstance(eos, tuple) else eos)
        arch, info = kind, {"model": str(args.model)}
    else:
        model, params, info = base_on_task_a(sizes, Path(args.out), log)
        arch = "llama"
    if args.data:
        rows = job.rows_from_text(job.read_text(args.data), tok, args.seq or 64)
        cut = max(1, len(rows[0]) // 10)
        held_out = (rows[0][:cut], rows[1][:cut])
        return Task(model, params, tok, (rows[0][cut:], rows[1][cut:]), held_out, None, arch, info)
    if args.model:
        sys.exit("--model needs --data: the tasks' byte tokens are not its tokenizer's")
    pairs, held_out_pairs = job.number_pairs(0, sizes.eval)
    train = job.rows_from_examples(job.task_examples(job.task_b, pairs, tok), SEQ, tok.eos)
    eval_b = job.task_examples(job.task_b, held_out_pairs, tok)
    held_out = job.rows_from_examples(eval_b, SEQ, tok.eos)
    return Task(model, params, tok, train, held_out, eval_b, arch, info)


# ------------------------------------------------------------------------------ training


# compiled training steps by run (variant and learning rate): the seeds of a run share one
# program, since only the values of its arguments differ (saves a compilation per seed)
_COMPILED: dict[Any, Any] = {}


def train_steps(
    loss, trainable, frozen, data, steps, lr, *, hook=None, time_steps=0, cache_key=None
):
    """AdamW (warmup, cosine decay, clipping) on ``trainable``: (trained, frozen, cost).

    ``loss(trainable, frozen, tokens, mask)``; ``frozen`` goes in as an argument, not as
    constants baked into the program. ``hook(step, trainable, frozen, grads, state) ->
    (trainable, frozen, state)`` runs after each update (AdaLoRA's importance and masks,
    which live in the frozen half). The step is compiled once, with its state donated;
    ``cost`` is its peak memory by XLA's memory analysis (arguments + outputs + temporaries
    - donated), its FLOPs, and the median seconds of the last ``time_steps`` steps (on a
    GPU also the allocator's peak). With ``cache_key``, a step compiled earlier under the
    same key (the same loss, learning rate, steps and shapes) is reused.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

    def step(trainable, opt_state, frozen, tokens, mask):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        return (new, opt_state, value, grads) if hook else (new, opt_state, value, None)

    trainable = jax.tree.map(jnp.copy, trainable)  # donated below: the caller's stays intact
    opt_state, hook_state = tx.init(trainable), None
    tokens, mask = next(data)
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (trainable, frozen, tokens, mask)
    )
    key = None if cache_key is None else (cache_key, lr, steps, bool(hook), str(shapes))
    compiled = _COMPILED.get(key) if key is not None else None
    if compiled is None:
        compiled = (
            jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, tokens, mask)
        ).compile()
        if key is not None:
            _COMPILED[key] = compiled
    times, value = [], jnp.zeros(())
    for i in range(steps):
        if i:
            tokens, mask = next(data)
        timed = i >= steps - time_steps
        if timed:  # the step alone: what the previous step and hook dispatched is done
            jax.block_until_ready((trainable, opt_state, frozen))
        t0 = time.perf_counter()
        trainable, opt_state, value, grads = compiled(trainable, opt_state, frozen, tokens, mask)
        if timed:
            jax.block_until_ready((trainable, opt_state, value))
            times.append(time.perf_counter() - t0)
        if hook is not None:
            trainable, frozen, hook_state = hook(i, trainable, frozen, grads, hook_state)
    if not bool(jnp.isfinite(value)):
        raise FloatingPointError(f"the loss is {float(value)} after {steps} steps; lower the lr")
    return trainable, frozen, step_cost(compiled, times)


def step_cost(compiled, times: list[float]) -> dict:
    """Peak memory, FLOPs and seconds per step of a compiled training step (see train_steps)."""
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = int(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "peak_bytes": peak,
        "device_peak_bytes": int(stats["peak_bytes_in_use"])
        if "peak_bytes_in_use" in stats
        else None,
        "flops": float(cost["flops"]) if cost and "flops" in cost else None,
        "seconds_per_step": float(np.median(times)) if times else None,
    }


def build(variant: Variant, params: Any, task: Task, sizes: Sizes, seed: int, targets):
    """(the tree to train, a hook for the training loop or None)."""
    key = jax.random.key(1000 + seed)
    names = list(targets[variant.targets])
    rank = variant.rank or 8
    if variant.method == "full":
        return params, None
    if variant.method in ("lora", "qlora", "dora"):
        base = lorax.quantize(params, "nf4", targets=names) if variant.method == "qlora" else params
        return lorax.wrap(
            base, rank=rank, alpha=2.0 * rank, targets=names, key=key, dora=variant.method == "dora"
        ), None
    if variant.method == "ia3":
        ffn = [n for n in names if n in ("down_proj", "c_proj")]
        ia3_targets = [n for n in names if n in ("k_proj", "v_proj", "down_proj")] or names
        if task.arch == "gpt2":
            # a regex string (a list would name modules): only the MLP's c_proj
            return lorax.ia3(
                params, targets=["c_attn", "c_proj"], feedforward=r".*mlp/c_proj/kernel"
            ), None
        return lorax.ia3(params, targets=ia3_targets, feedforward=ffn or None), None
    if variant.method == "adalora":
        return adalora_tree(params, names, rank, sizes, key)
    raise ValueError(f"unknown method {variant.method!r}")


def adalora_tree(params, names, rank, sizes, key):
    """AdaLoRA: start at 1.5x the rank and let importance shrink the total to ``rank`` per
    module on average, with peft's schedule (a warm-up of a fifth of the steps, pruning to the
    target by the last fifth, then the masks fixed) and its defaults (betas 0.85)."""
    init_rank = max(rank + 1, (3 * rank) // 2)
    tree = lorax.adalora(
        params, init_rank=init_rank, target_rank=rank, alpha=2.0 * rank, targets=names, key=key
    )
    total = sizes.steps
    tinit, tfinal = total // 5, total // 5
    update = jax.jit(lorax.update_importance)

    @jax.jit
    def prune(trainable, frozen, state, budget):
        whole = lorax.mask_to_budget(lorax.combine(trainable, frozen), state, budget)
        return lorax.split(whole)

    def hook(step, trainable, frozen, grads, state):
        if step >= total - tfinal:  # the final phase: the masks stay as they are
            return trainable, frozen, state
        state = update(
            state if state is not None else lorax.AdaLoraState.init(trainable), trainable, grads
        )
        if step > tinit:
            budget = lorax.budget_at(
                step,
                init_budget=state.init_budget,
                target_budget=state.target_budget,
                tinit=tinit,
                tfinal=tfinal,
                total_step=total,
            )
            trainable, frozen = prune(trainable, frozen, state, budget)
        return trainable, frozen, state

    return tree, hook


def regularized(loss, variant):
    """AdaLoRA's loss adds its orthogonality regulariser (peft's weight, 0.5)."""
    if variant.method != "adalora":
        return loss
    return lambda t, f, x, m: (
        loss(t, f, x, m) + 0.5 * lorax.orthogonal_regularizer(lorax.combine(t, f))
    )


def run_variant(variant: Variant, task: Task, sizes: Sizes, seed: int, targets, lr_scale):
    """Fine-tunes once; returns the row's measurements and the trained tree."""
    apply = lorax.lora(task.model.apply)
    tree, hook = build(variant, task.params, task, sizes, seed, targets)
    trainable, frozen = (tree, {}) if variant.method == "full" else lorax.split(tree)

    def loss(t, f, x, m):
        return job.loss_fn(apply, t if variant.method == "full" else lorax.combine(t, f), x, m)

    lr = LEARNING_RATES.get(variant.method, DEFAULT_LR) * lr_scale
    t0 = time.perf_counter()
    data = job.batches(*task.train, sizes.batch, seed + 2)
    trainable, frozen, cost = train_steps(
        regularized(loss, variant),
        trainable,
        frozen,
        data,
        sizes.steps,
        lr,
        hook=hook,
        time_steps=sizes.time_steps,
        cache_key=(variant.key, task.arch),
    )
    seconds = time.perf_counter() - t0
    tuned = trainable if variant.method == "full" else lorax.combine(trainable, frozen)
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable))
    n_base = sum(int(x.size) for x in jax.tree.leaves(task.params))
    merged = lorax.merge(tuned)
    quality = evaluate(task, merged)
    row = {
        "variant": variant.name,
        "method": variant.method,
        "rank": variant.rank,
        "targets": variant.targets,
        "seed": seed,
        "trainable": n_trainable,
        "trainable_percent": 100.0 * n_trainable / n_base,
        **quality,
        "train_seconds": seconds,
        **cost,
    }
    if variant.method == "adalora":
        row["final_ranks"] = {m.module: m.rank for m in lorax.summary(tuned).rows if m.rank}
    return row, tuned


def evaluate(task: Task, params: Any) -> dict:
    """Held-out loss and perplexity (the answers' tokens, or every token with --data) and,
    on task B, exact-match accuracy of greedy answers; ``params`` dense."""
    held = float(_held_out_loss(task.model, params, *(jnp.asarray(x) for x in task.held_out)))
    out = {"held_out_loss": held, "perplexity": math.exp(held)}
    if task.eval_examples is not None:
        out["accuracy"] = job.accuracy(task.model, params, task.eval_examples, task.tok)
    return out


@partial(jax.jit, static_argnums=0)
def _held_out_loss(model, params, tokens, mask):
    return job.loss_fn(model.apply, params, tokens, mask)


# --------------------------------------------------------------------------------- ΔW


def delta_analysis(runs: dict[str, Any], base: Any, rank_small: int, rank_large: int) -> dict:
    """The learned updates of one seed: spectra, energy, effective rank, amplification (per
    module, from ``lorax.analysis``) and the r-small vs r-large subspace similarity."""
    from lorax import analysis

    out: dict[str, Any] = {}
    ks = (1, 2, 4, 8, 16)
    for name in (f"lora r={rank_small}", f"lora r={rank_large}"):
        if name in runs:
            out[name] = analysis.update_report(runs[name], k=ks)
    if "full" in runs:  # amplification along its top rank_small directions, as LoRA's
        out["full"] = analysis.update_report(runs["full"], base, k=ks, r=rank_small)
    small, large = runs.get(f"lora r={rank_small}"), runs.get(f"lora r={rank_large}")
    if small is not None and large is not None:
        sims = {}
        leaves_s = _lora_leaves(small)
        leaves_l = _lora_leaves(large)
        for path, leaf in leaves_s.items():
            if path in leaves_l:
                a1, a2 = _matrix_a(leaf), _matrix_a(leaves_l[path])
                grid = np.asarray(analysis.similarity_grid(a1, a2))
                sims[path] = grid.tolist()
        out["similarity"] = sims
    return out


def _lora_leaves(tree) -> dict[str, lorax.LoraWeight]:
    found = {}

    def visit(path, x):
        if isinstance(x, lorax.LoraWeight):
            found[jax.tree_util.keystr(path, simple=True, separator="/")] = x
        return x

    jax.tree_util.tree_map_with_path(visit, tree, is_leaf=lorax.is_lorax_leaf)
    return found


def _matrix_a(leaf: lorax.LoraWeight) -> jax.Array:
    a = leaf.a
    return a.reshape(-1, a.shape[-1])


# ----------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and one seed (the tests')")
    p.add_argument("--seeds", type=job.positive_int, help="seeds per run (default 3; quick 1)")
    p.add_argument("--steps", type=job.positive_int, help="adaptation steps per run")
    p.add_argument("--model", help="a GPT-2 or Llama checkpoint (Hub name or directory)")
    p.add_argument("--data", help="a text file to adapt to (perplexity on a held-out tenth)")
    p.add_argument("--seq", type=job.positive_int, help="tokens per row with --data")
    p.add_argument(
        "--lr-scale", type=job.positive_float, default=1.0, help="multiplies every learning rate"
    )
    p.add_argument(
        "--experiments",
        default="rank,memory,targets,delta",
        help="which of rank, memory, targets, delta (default: all)",
    )
    p.add_argument("--out", default="experiments/results", help="where results go")
    args = p.parse_args(argv)
    unknown = set(args.experiments.split(",")) - {"rank", "memory", "targets", "delta"}
    if unknown:
        p.error(f"--experiments: unknown {sorted(unknown)}; known: rank, memory, targets, delta")
    return args


def machine() -> dict:
    d = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "platform": d.platform,
        "device": d.device_kind,
        "cpu": platform.processor() or platform.machine(),
        "cores": __import__("os").cpu_count(),
        "jax": jax.__version__,
        "lorax": lorax.__version__,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sizes = replace(sizes, seeds=args.seeds or sizes.seeds, steps=args.steps or sizes.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = set(args.experiments.split(","))
    t_start = time.perf_counter()
    task = load_task(args, sizes, tqdm.write)
    targets = GPT2_TARGETS if task.arch == "gpt2" else LLAMA_TARGETS
    todo = [v for v in variants(sizes, targets) if chosen & set(v.experiments)]
    if "delta" in chosen:  # the updates it analyses
        need = {"full", *(f"lora r={r}" for r in sizes.delta_ranks)}
        have = {v.name for v in todo}
        extra = [v for v in variants(sizes, targets) if v.name in need - have]
        todo += [replace(v, experiments=(*v.experiments, "delta")) for v in extra]
    before = evaluate(task, task.params)  # the base on task B, before any adaptation
    tqdm.write(f"base before adaptation: {before}")
    rows: list[dict] = []
    deltas: list[dict] = []
    bar = tqdm(total=len(todo) * sizes.seeds, desc="runs", unit="run", dynamic_ncols=True)
    for seed in range(sizes.seeds):
        trained = {}
        for variant in todo:
            bar.set_postfix_str(f"{variant.name}, seed {seed}")
            row, tuned = run_variant(variant, task, sizes, seed, targets, args.lr_scale)
            row["experiments"] = list(variant.experiments)
            rows.append(row)
            trained[variant.name] = tuned
            bar.update(1)
        if "delta" in chosen:
            d = delta_analysis(trained, task.params, *sizes.delta_ranks)
            d["seed"] = seed
            deltas.append(d)
    bar.close()
    meta = {
        "machine": machine(),
        "sizes": asdict(sizes),
        "base": {**task.base_info, "before": before},
        "arch": task.arch,
        "model": args.model,
        "data": args.data,
        "seconds": time.perf_counter() - t_start,
        "learning_rates": {**LEARNING_RATES, "others": DEFAULT_LR, "scale": args.lr_scale},
    }
    results = {}
    for name in ("rank", "memory", "targets"):
        if name in chosen:
            results[name] = {**meta, "runs": [r for r in rows if name in r["experiments"]]}
    if "delta" in chosen:
        results["delta"] = {**meta, "seeds": deltas}
    for name, content in results.items():
        (out / f"{name}.json").write_text(json.dumps(content, indent=1, default=float))
    report.write(out, results, meta)
    tqdm.write(f"wrote {sorted(p.name for p in out.iterdir() if p.is_file())} to {out}")
    tqdm.write((out / "report.md").read_text())
    return results


if __name__ == "__main__":
    main()
