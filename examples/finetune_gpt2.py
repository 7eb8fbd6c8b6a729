"""Fine-tune GPT-2 with LoRA (or QLoRA) in JAX with lorax: the main job.

With no arguments it runs on a CPU with no network in a few minutes: it first trains a small
GPT-2-architecture model on task A (two-digit addition, "37+45=082") and caches it as a
Hugging Face checkpoint, then adapts that pretrained base with LoRA to task B, the same sums
asked with letters for digits ("dh+ef=082"), measured on number pairs neither task trained on. It
prints trainable vs total parameters, exact-match accuracy before and after, saves the adapter
with lorax.save (orbax; size beside the full model's), reloads it into a fresh base and checks the
outputs match, then merges the adapter and prints generated samples.

    python examples/finetune_gpt2.py                      # small base, tasks A -> B
    python examples/finetune_gpt2.py --qlora              # the base in NF4 (QLoRA)
    python examples/finetune_gpt2.py --model gpt2         # real GPT-2 (Hub or cache)
    python examples/finetune_gpt2.py --model DIR --data notes.txt --steps 500

``--model`` takes a Hub name or a directory with config.json, model.safetensors and
tokenizer.json; ``--data FILE`` fine-tunes on your own text (loss before/after).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from tqdm import tqdm

import lorax
from lorax.models import generate, gpt2, partitioning

LETTERS = str.maketrans("0123456789", "abcdefghij")


def task_a(a: int, b: int) -> tuple[str, str]:
    """Two-digit addition with digits: 37+45=082."""
    return f"{a:02d}+{b:02d}=", f"{a + b:03d}"


def task_b(a: int, b: int) -> tuple[str, str]:
    """The same sums asked with letters for digits (0=a ... 9=j): dh+ef=082."""
    prompt, answer = task_a(a, b)
    return prompt.translate(LETTERS), answer


BASE_CONFIG = dict(
    vocab_size=256,
    n_positions=128,
    n_embd=128,
    n_layer=4,
    n_head=4,
    bos_token_id=10,
    eos_token_id=10,
)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        help="Hub name or checkpoint directory of a pretrained GPT-2; "
        "default: train a small base on task A (cached in --out)",
    )
    p.add_argument("--data", help="a text file to fine-tune on instead of task B")
    p.add_argument("--qlora", action="store_true", help="store the base in NF4 (QLoRA)")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--alpha", type=finite_float, default=16.0)
    p.add_argument(
        "--targets",
        default="c_attn,c_proj,c_fc",
        help="comma-separated module names to adapt (default: %(default)s)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=400, help="LoRA steps (default: %(default)s)"
    )
    p.add_argument("--lr", type=positive_float, default=1e-2, help="LoRA peak learning rate")
    p.add_argument("--batch", type=positive_int, default=64)
    p.add_argument(
        "--seq",
        type=positive_int,
        default=None,
        help="tokens per row (default: 16 for the tasks, 64 for --data)",
    )
    p.add_argument(
        "--base-steps",
        type=positive_int,
        default=1500,
        help="steps to train the small base on task A",
    )
    p.add_argument("--eval", type=positive_int, default=300, help="examples to measure accuracy on")
    p.add_argument("--out", default="runs/finetune_gpt2", help="where base and adapter go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mesh",
        help="train sharded on a device mesh, e.g. 'fsdp=4,tp=2' (8 devices; on a CPU set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8)",
    )
    args = p.parse_args(argv)
    args.seq = args.seq or (64 if args.data else 16)
    return args


class ByteTokenizer:
    """Bytes as tokens (vocab 256); newline ends a text. Used by the small base."""

    vocab_size, eos = 256, 10

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode(errors="replace")


class HFTokenizer:
    """The checkpoint's tokenizer.json, through the `tokenizers` package."""

    def __init__(self, directory: Path, eos: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            sys.exit("--model needs the `tokenizers` package: pip install tokenizers")
        if not (directory / "tokenizer.json").is_file():
            sys.exit(f"--model: no tokenizer.json in {directory}")
        self.tok, self.eos = Tokenizer.from_file(str(directory / "tokenizer.json")), eos

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------------- data


def number_pairs(seed: int, n_eval: int):
    """All pairs of two-digit numbers, split into training pairs and held-out pairs."""
    pairs = np.array([(a, b) for a in range(100) for b in range(100)])
    np.random.default_rng(seed).shuffle(pairs)
    return pairs[n_eval:], pairs[:n_eval]


def task_examples(task, pairs, tok):
    """(prompt ids, answer ids + eos) for each pair."""
    return [(tok.encode(p), tok.encode(a) + [tok.eos]) for p, a in (task(*ab) for ab in pairs)]


def rows_from_examples(examples, seq, pad):
    """Token rows and a loss mask that covers the answers only."""
    tokens = np.full((len(examples), seq + 1), pad, np.int32)
    mask = np.zeros((len(examples), seq + 1), np.float32)
    for i, (p, a) in enumerate(examples):
        if len(p) + len(a) > seq + 1:
            sys.exit(f"--seq {seq} is too short for an example of {len(p) + len(a)} tokens")
        tokens[i, : len(p) + len(a)] = p + a
        mask[i, len(p) : len(p) + len(a)] = 1
    return tokens, mask


def read_text(path: str) -> str:
    """The --data file as text; a missing or binary file stops with a message."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        sys.exit(f"--data: no file '{path}'")
    except IsADirectoryError:
        sys.exit(f"--data: '{path}' is a directory; pass a text file")
    except UnicodeDecodeError as e:
        sys.exit(f"--data: '{path}' is not UTF-8 text (byte {e.start}); pass a text file")


def rows_from_text(text, tok, seq):
    """A text file cut into windows of seq + 1 tokens; every token is a target."""
    ids = np.array(tok.encode(text), np.int32)
    n = len(ids) // (seq + 1)
    if n < 2:
        sys.exit(f"--data: the file has {len(ids)} tokens; need at least {2 * (seq + 1)}")
    tokens = ids[: n * (seq + 1)].reshape(n, seq + 1)
    return tokens, np.ones(tokens.shape, np.float32)


def batches(tokens, mask, batch, seed):
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(tokens), min(batch, len(tokens)))
        yield tokens[idx], mask[idx]


# ------------------------------------------------------------------------------ training


def loss_fn(apply, params, tokens, mask):
    logits = apply({"params": params}, tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return (ce * mask[:, 1:]).sum() / jnp.maximum(mask[:, 1:].sum(), 1.0)


class Progress:
    """A tqdm bar over the steps, with the loss and tokens/s in its postfix.

    The loss is read from the device (which waits for the step) only when the postfix is
    refreshed: at most every quarter second on a terminal, every fifth of the run in a log;
    ``update`` says whether it read it.
    """

    def __init__(self, label, total, tokens_per_step):
        self.total, self.tps = total, tokens_per_step
        self.tty = sys.stdout.isatty()
        self.every = max(total // 5, 1)
        # in a log (not a terminal) the bar is drawn by update alone, one line each time
        self.bar = tqdm(
            total=total,
            desc=label,
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout if self.tty else _Lines(sys.stdout),
            miniters=None if self.tty else total + 1,
            leave=self.tty,
        )
        self.t0 = self.last = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def update(self, step, loss):
        now = time.perf_counter()
        due = step == self.total or (
            now - self.last >= 0.25 if self.tty else step % self.every == 0
        )
        if due:
            loss = float(loss)  # waits for the step
            self.last = time.perf_counter()
            rate = self.tps * step / max(self.last - self.t0, 1e-9)
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} tok/s", refresh=False)
        self.bar.update(1)
        if due and (step == self.total or not self.tty):
            self.bar.refresh()
        return due


class _Lines:
    """tqdm's output for a log: each redraw on a line of its own (blank ones dropped)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def train(label, loss, trainable, data, steps, lr, tokens_per_step, place=lambda x: x):
    """AdamW with warmup and cosine decay on ``trainable``; returns it trained. ``place``
    puts each batch where the step wants it (split over the mesh's fsdp axis)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, tokens, mask):
        value, grads = jax.value_and_grad(loss)(trainable, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    finite = jnp.array(True)  # on the device: no sync per step
    with Progress(label, steps, tokens_per_step) as progress:
        for i in range(1, steps + 1):
            tokens, mask = place(next(data))
            trainable, opt_state, value = step(trainable, opt_state, tokens, mask)
            finite = finite & jnp.isfinite(value)
            if progress.update(i, value) or i == steps:
                stop_unless_finite(label, finite, value, i, lr)
    return trainable


def stop_unless_finite(label, finite, value, step, lr):
    """Ends the run (exit status 1) once a loss was inf or NaN: nothing is saved, so the
    adapter of the last good run stays as it was."""
    if not bool(finite):
        sys.exit(
            f"{label}: the loss was not finite at or before step {step} (now "
            f"{float(value)}); stopping without saving anything. Lower --lr (now {lr})."
        )


def accuracy(model, params, examples, tok, batch=100):
    """Exact-match accuracy of greedy answers (prompts of equal length, batched)."""
    correct = 0
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        prompts = np.array([p for p, _ in chunk], np.int32)
        new = np.asarray(
            generate(
                model, params, prompts, len(chunk[0][1]), eos_token_id=tok.eos, pad_token_id=tok.eos
            )
        )
        correct += sum(list(row) == a for row, (_, a) in zip(new, chunk, strict=True))
    return correct / len(examples)


def held_out_loss(apply, params, tokens, mask):
    return float(jax.jit(lambda p: loss_fn(apply, p, tokens, mask))(params))


# --------------------------------------------------------------------------------- steps


def pretrained_base(args, out: Path):
    """(model, params, tokenizer): --model, or the small base trained on task A (cached)."""
    if args.model:
        model, params = gpt2.from_pretrained(args.model)
        directory = lorax.models.hub.resolve(args.model)
        return model, params, HFTokenizer(directory, model.config.eos_token_id), None
    tok = ByteTokenizer()
    base_dir = out / "base"
    stamp = json.dumps(
        {
            "config": BASE_CONFIG,
            "task": task_a(12, 34),
            "steps": args.base_steps,
            "seed": args.seed,
        },
        sort_keys=True,
    )
    if (base_dir / "stamp.json").is_file() and (base_dir / "stamp.json").read_text() == stamp:
        model, params = gpt2.from_pretrained(base_dir)
        print(f"base: loaded the cached task-A model from {base_dir}")
        return model, params, tok, None
    model = gpt2.GPT2(gpt2.GPT2Config(**BASE_CONFIG))
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, 8), jnp.int32))["params"]
    train_pairs, _ = number_pairs(args.seed, args.eval)
    tokens, mask = rows_from_examples(task_examples(task_a, train_pairs, tok), args.seq, tok.eos)
    t0 = time.perf_counter()
    params = train(
        "base (task A, full)",
        lambda p, t, m: loss_fn(model.apply, p, t, m),
        params,
        batches(tokens, mask, args.batch, args.seed),
        args.base_steps,
        3e-3,
        args.batch * args.seq,
    )
    base_time = time.perf_counter() - t0
    gpt2.save_pretrained(base_dir, model, params)
    (base_dir / "stamp.json").write_text(stamp)
    print(f"base: trained {args.base_steps} steps in {base_time:.0f}s, saved to {base_dir}")
    return model, params, tok, base_time


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}

    model, params, tok, result["base_seconds"] = pretrained_base(args, out)
    if args.seq > model.config.n_positions:  # positions past the table would be clamped
        sys.exit(f"--seq {args.seq} exceeds the model's {model.config.n_positions} positions")
    apply = lorax.lora(model.apply)

    # the data of the adaptation: task B, or the user's text
    if args.data:
        tokens, mask = rows_from_text(read_text(args.data), tok, args.seq)
        cut = max(1, len(tokens) // 10)
        eval_rows, (tokens, mask) = (tokens[:cut], mask[:cut]), (tokens[cut:], mask[cut:])
    else:
        train_pairs, eval_pairs = number_pairs(args.seed, args.eval)
        tokens, mask = rows_from_examples(
            task_examples(task_b, train_pairs, tok), args.seq, tok.eos
        )
        eval_b = task_examples(task_b, eval_pairs, tok)
        eval_rows = rows_from_examples(eval_b, args.seq, tok.eos)
        if not args.model:
            result["task_a_accuracy"] = accuracy(
                model, params, task_examples(task_a, eval_pairs, tok), tok
            )
            print(f"base on task A (held-out pairs): accuracy {result['task_a_accuracy']:.1%}")

    base = lorax.quantize(params, "nf4") if args.qlora else params
    wrap = lambda base: lorax.wrap(
        base,
        rank=args.rank,
        alpha=args.alpha,  # noqa: E731
        targets=args.targets.split(","),
        key=jax.random.key(args.seed + 1),
    )
    lp = wrap(base)
    print(lorax.summary(lp))
    place = lambda batch: batch  # noqa: E731
    mesh = specs = None
    if args.mesh:  # the same code, sharded: each weight and adapter placed by its spec
        mesh = partitioning.make_mesh(args.mesh)
        rules = partitioning.RULES["fsdp_tp"]
        specs = lorax.partition_specs(lp, partitioning.logical_axes(lp), rules=rules, mesh=mesh)
        lp = lorax.shard(lp, specs, mesh=mesh)
        batch_sharding = NamedSharding(mesh, partitioning.batch_spec(mesh))
        place = lambda batch: jax.device_put(batch, batch_sharding)  # noqa: E731
        print(f"mesh {dict(mesh.shape)}: the frozen weights and adapters are sharded")
    trainable, frozen = lorax.split(lp)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_total = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"trainable parameters: {n_trainable:,}; the base model has {n_total:,} "
        f"({100 * n_trainable / n_total:.2f}%)"
    )

    def metric(lp):
        if args.data:
            return "held-out loss", held_out_loss(apply, lp, *eval_rows)
        return "task B accuracy (held-out pairs)", accuracy(model, lp, eval_b, tok)

    name, before = metric(lp)
    print(f"before LoRA: {name} {before:.4f}")
    t0 = time.perf_counter()
    loss = lambda t, x, m: loss_fn(apply, lorax.combine(t, frozen), x, m)  # noqa: E731
    # on a mesh, traced with the rules: the model keeps its activations split over the batch
    scope = partitioning.sharded(mesh, "fsdp_tp") if mesh is not None else contextlib.nullcontext()
    with scope:
        trainable = train(
            "lora" + (" (nf4 base)" if args.qlora else ""),
            loss,
            trainable,
            batches(tokens, mask, args.batch, args.seed + 2),
            args.steps,
            args.lr,
            args.batch * args.seq,
            place,
        )
    result["lora_seconds"] = time.perf_counter() - t0
    lp = lorax.combine(trainable, frozen)
    _, after = metric(lp)
    print(f"after LoRA:  {name} {after:.4f}   ({result['lora_seconds']:.0f}s)")
    result.update(metric=name, before=before, after=after)

    # save the adapter alone (lorax.save: orbax), reload it onto a freshly loaded base
    adapter_dir = out / "adapter"
    lorax.save(adapter_dir, lp, force=True)
    result["adapter_bytes"], result["model_bytes"] = dir_bytes(adapter_dir), tree_bytes(params)
    print(
        f"adapter checkpoint: {result['adapter_bytes'] / 1e6:.2f} MB on disk; the full "
        f"model is {result['model_bytes'] / 1e6:.2f} MB "
        f"({result['model_bytes'] / result['adapter_bytes']:.0f}x larger)"
    )
    _, fresh = gpt2.from_pretrained(args.model or out / "base")
    reloaded = lorax.load(adapter_dir, lorax.quantize(fresh, "nf4") if args.qlora else fresh)
    x = jnp.asarray(eval_rows[0][:8, :-1])
    if args.mesh:  # the same placement for both, so that both run the same program
        reloaded, lp = (lorax.shard(t, specs, mesh=mesh) for t in (reloaded, lp))
    same = np.array_equal(
        jax.jit(apply)({"params": reloaded}, x), jax.jit(apply)({"params": lp}, x)
    )
    result["reload_matches"] = bool(same)
    print(f"reloaded adapter reproduces the outputs: {'yes' if same else 'NO'}")

    peft_dir = lorax.export_peft(
        out / "peft_adapter", lp, model=model, base_model_name=args.model or str(out / "base")
    )
    print(f"Hugging Face PEFT copy (PeftModel.from_pretrained reads it): {peft_dir}")

    # merge for deployment and show a few generations
    merged = lorax.merge(lp)
    prompts = (
        [p for p, _ in eval_b[:4]]
        if not args.data
        else [list(r[: args.seq // 2]) for r in eval_rows[0][:2]]
    )
    for p in prompts:
        new = generate(
            model,
            merged,
            jnp.array([p], jnp.int32),
            args.seq - len(p),
            eos_token_id=tok.eos,
            pad_token_id=tok.eos,
        )[0]
        text = (
            tok.decode(list(new)).split(tok.decode([tok.eos]))[0]
            if not args.data
            else tok.decode(list(new))
        )
        print(f"  {tok.decode(p)!r} -> {text!r}")
    result["seconds"] = time.perf_counter() - t_start
    print(f"done in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
