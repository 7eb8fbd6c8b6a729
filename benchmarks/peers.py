"""lorax beside its peers (issue 18, CPU part): one Flax linen model, one LoRA train step,
three ways of writing the LoRA.

The model is benchmarks/lowrank_cost.py's 4-layer d=256 decoder (batch 8 x 128, r=8,
alpha=16 on q, k, v, o, fc1, fc2, float32, AdamW, donated trainable state):

- ``hand``: LoRA written into the model, ``y = x @ W + (x @ A) @ B * s`` (lowrank_cost's
  ``hand`` mode): the ideal, what a user who owns the model would write;
- ``lorax``: the plain model under ``lorax.lora``, its kernels ``lorax.wrap``-ed;
- ``qwix``: the plain model under ``qwix.apply_lora_to_model(model, qwix.LoraProvider(...))``,
  which intercepts the model's ``dot_general`` calls and adds ``kernel_lora_a`` /
  ``kernel_lora_b`` params beside each targeted ``kernel``; only those train.

All three start from the same W, A, B (qwix's and lorax's factors set to the hand model's;
B small random, not zero, so that no product is degenerate). The parametrisations agree:
A is ``[in, r]``, B ``[r, out]``, ``s = alpha / r`` (both libraries default to A random,
B = 0); ``hand`` and qwix scale the low-rank output ``(x @ A) @ B``, lorax scales ``x @ A``
(equal in exact arithmetic). Each compiled step's first call (step 0) is checked against the
merged model (the plain decoder on ``W + s A B``, differentiated through the merge: no
low-rank product anywhere): its loss, and its A/B gradients, read off AdamW's first moment
after that step (``(1 - b1) g``), so the check sees what the timed program computes.

Reported per method: step time (one process, methods interleaved round by round; "x hand" is
the median over rounds of the method's time over ``hand``'s in the same round), XLA's FLOPs
(``compiled.cost_analysis()``) and temporary memory (``compiled.memory_analysis()``
``.temp_size_in_bytes``) of the compiled step.

qwix is optional (``pip install -e '.[bench]'`` or ``python -m pip install qwix``)::

    python benchmarks/peers.py                          # the table (7 rounds of 5 steps)
    python benchmarks/peers.py --rounds 5 --steps 5 --out results/peers.jsonl
    python benchmarks/peers.py --smoke                  # tiny shapes, 1 round (a test)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowrank_cost as lc  # noqa: E402 - the decoder, its hand LoRA and lorax setup

METHODS = ("hand", "lorax", "qwix")
QWIX_SUFFIXES = ("_lora_a", "_lora_b")
INSTALL_QWIX = (
    "benchmarks/peers.py compares lorax with qwix's LoRA, and qwix is not installed.\n"
    "Install it with:  python -m pip install -e '.[bench]'   (or: python -m pip install qwix)"
)
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # float32, sums over ~1e5 terms ordered differently
ADAM_B1 = 0.9
SMOKE = dataclasses.replace(lc.SMALL, layers=1)  # --smoke: a few seconds of compiles
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}  # same HLO, FLOPs; faster


def require_qwix() -> None:
    """Exits with the install command when qwix is not importable."""
    if importlib.util.find_spec("qwix") is None:
        raise SystemExit(INSTALL_QWIX)


def qwix_model(shape: lc.Shape) -> Any:
    """The plain decoder with qwix's LoRA on the targeted ``Dense`` layers."""
    import qwix

    provider = qwix.LoraProvider(
        module_path=r".*/(" + "|".join(lc.TARGETS) + ")", rank=shape.rank, alpha=shape.alpha
    )
    return qwix.apply_lora_to_model(lc.make_model(shape, None), provider)


def init(shape: lc.Shape, seed: int = 0):
    """The hand model's parameters and the tokens, drawn with numpy at about the scales of
    lowrank_cost.init's Flax initializers (kernels and A ``N(0, 1/in)``; B, the embeddings
    ``N(0, 0.02^2)``; LayerNorms 1 and 0): no XLA compile of random-number kernels, which
    on the CPU costs as much as a step's compile at the smoke test's sizes."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    model = lc.make_model(shape, "hand")
    tokens0 = jnp.zeros((1, shape.seq), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens0)["params"]
    flat: dict[tuple, Any] = {}
    leaves: dict[tuple, Any] = traverse_util.flatten_dict(abstract)
    for path, leaf in leaves.items():
        name = path[-1]
        if name == "scale":
            value = np.ones(leaf.shape)
        elif name == "bias":
            value = np.zeros(leaf.shape)
        elif name in ("kernel", "lora_a"):
            value = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])
        else:  # lora_b (small, not zero: no product is degenerate), embed, pos
            value = 0.02 * rng.standard_normal(leaf.shape)
        flat[path] = jnp.asarray(value, leaf.dtype)
    tokens = jnp.asarray(rng.integers(0, shape.vocab, (shape.batch, shape.seq + 1)), jnp.int32)
    return traverse_util.unflatten_dict(flat), tokens


def _is_qwix_factor(path) -> bool:
    return path[-1].endswith(QWIX_SUFFIXES)


def qwix_params(shape: lc.Shape, hand_params) -> dict:
    """qwix's parameter tree holding the hand model's W, A and B: ``{..., 'q': {'kernel': W,
    'kernel_lora_a': A, 'kernel_lora_b': B}}``; checked against the tree ``init`` makes."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    flat = {}
    for path, value in traverse_util.flatten_dict(hand_params).items():
        name = {"lora_a": "kernel_lora_a", "lora_b": "kernel_lora_b"}.get(path[-1], path[-1])
        flat[path[:-1] + (name,)] = value
    params = traverse_util.unflatten_dict(flat)
    made = jax.eval_shape(
        qwix_model(shape).init, jax.random.key(0), jnp.zeros((1, shape.seq), jnp.int32)
    )["params"]
    spec = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    if spec(made) != spec(params):
        raise AssertionError(f"qwix made another tree: {spec(made)} != {spec(params)}")
    return params


def setup(method: str, shape: lc.Shape, hand_params, tokens):
    """``(loss(trainable, frozen, tokens), trainable, frozen)`` of one method, on the hand
    model's W, A, B."""
    import optax

    if method in ("hand", "lorax"):
        return lc.setup_mode(method, shape, hand_params, tokens)
    if method != "qwix":
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    model = qwix_model(shape)
    trainable, frozen = lc._partition(qwix_params(shape, hand_params), _is_qwix_factor)

    def loss(t, f, tok):
        logits = model.apply({"params": lc._join(t, f)}, tok[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

    return loss, trainable, frozen


def factor_grads(method: str, grads) -> dict:
    """A method's gradients as ``{(path..., 'lora_a'|'lora_b'): array}``."""
    if method != "qwix":
        return lc.factor_grads(method, grads)
    return {path[:-1] + (path[-1].removeprefix("kernel_"),): g for path, g in grads.items()}


def merged_reference(
    shape: lc.Shape, hand_params, tokens, compiler_options: dict | None = None
) -> tuple[float, dict]:
    """The loss and A/B gradients of the plain decoder on ``W + s A B``: autodiff through
    the merge, no low-rank product anywhere."""
    import jax
    import optax
    from flax import traverse_util

    model: Any = lc.make_model(shape, None)
    flat = traverse_util.flatten_dict(hand_params)
    factors = {k: v for k, v in flat.items() if lc._is_factor(k)}
    rest = {k: v for k, v in flat.items() if not lc._is_factor(k)}
    scale = shape.alpha / shape.rank

    def loss(factors):
        merged = dict(rest)
        for path in {k[:-1] for k in factors}:
            a, b = factors[path + ("lora_a",)], factors[path + ("lora_b",)]
            merged[path + ("kernel",)] = rest[path + ("kernel",)] + scale * (a @ b)
        logits = model.apply({"params": traverse_util.unflatten_dict(merged)}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(factors).compile(compiler_options)
    value, grads = compiled(factors)
    return float(value), grads


def _rel_err(got: dict, ref: dict) -> float:
    if set(got) != set(ref):
        raise AssertionError(f"other factors: {sorted(set(got) ^ set(ref))[:4]}")
    return max(
        float(np.max(np.abs(np.asarray(got[k]) - np.asarray(ref[k]))))
        / float(np.max(np.abs(np.asarray(ref[k]))))
        for k in ref
    )


def step0_grads(state, b1: float = ADAM_B1):
    """The gradient of step 0, read off AdamW's state after that step: its first moment is
    ``(1 - b1) * g`` (the moments start at zero), so the check sees the gradients that the
    compiled, donated step itself computed, at no extra compile."""
    import jax
    import optax

    (adam,) = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)
    ]
    return jax.tree.map(lambda m: np.asarray(m) / (1 - b1), adam.mu)


def compile_step(loss, trainable, frozen, tokens, compiler_options: dict | None = None):
    """The jitted AdamW step (trainable state donated), compiled, and its arguments."""
    import jax
    import optax

    tx = optax.adamw(1e-4, b1=ADAM_B1)

    def update(t, s, f, tok):
        value, grads = jax.value_and_grad(loss)(t, f, tok)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    t = jax.tree.map(lambda x: x.copy(), trainable)  # donated: leave the shared arrays alone
    state = tx.init(t)
    lowered = jax.jit(update, donate_argnums=(0, 1)).lower(t, state, frozen, tokens)
    compiled = lowered.compile(compiler_options)
    return compiled, [t, state, frozen, tokens]


def _temp_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes) if stats is not None else -1


def _count(tree) -> int:
    import jax

    return sum(x.size for x in jax.tree.leaves(tree))


def measure(
    methods, shape: lc.Shape, rounds: int, steps: int, compiler_options: dict | None = None
) -> list[dict]:
    """Compiles each method's step, checks its step 0 against the merged model, and times
    the steps interleaved. ``compiler_options`` go to XLA (``--smoke``: optimisation off)."""
    import jax

    hand_params, tokens = init(shape)
    ref_loss, ref_grads = merged_reference(shape, hand_params, tokens, compiler_options)
    runs, info, grads = {}, {}, {}
    for method in methods:
        start = time.perf_counter()
        loss, t, f = setup(method, shape, hand_params, tokens)
        compiled, args = compile_step(loss, t, f, tokens, compiler_options)
        info[method] = dict(
            compile_s=round(time.perf_counter() - start, 1),
            flops=lc._flops(compiled),
            temp_bytes=_temp_bytes(compiled),
            trainable=_count(t),
        )
        # step 0 (the loss and, through AdamW's first moment, the gradients at the initial
        # values), then one more step of warm-up
        t, s, value = compiled(*args)
        grads[method] = factor_grads(method, step0_grads(s))
        info[method].update(
            loss_step0=float(value),
            ref_loss=ref_loss,
            loss_diff=abs(float(value) - ref_loss),
            grad_rel_err=_rel_err(grads[method], ref_grads),
        )
        args[0], args[1] = t, s
        t, s, value = compiled(*args)
        args[0], args[1] = t, s
        jax.block_until_ready(value)
        runs[method] = (compiled, args)
        print(
            f"# {method}: compiled in {info[method]['compile_s']} s, "
            f"{info[method]['flops']:.3e} FLOPs, temp {info[method]['temp_bytes'] / 2**20:.1f} "
            f"MiB; step 0: loss {info[method]['loss_step0']:.6f} (merged {ref_loss:.6f}), "
            f"grads rel. err {info[method]['grad_rel_err']:.1e}",
            flush=True,
        )
    for method in methods:
        row = info[method]
        row["grad_rel_err_hand"] = (
            _rel_err(grads[method], grads["hand"]) if "hand" in grads else float("nan")
        )
        row["ok"] = bool(
            row["loss_diff"] <= LOSS_RTOL * abs(ref_loss) and row["grad_rel_err"] <= GRAD_RTOL
        )
    times = collections.defaultdict(list)
    for r in range(rounds):
        for method in methods:
            compiled, args = runs[method]
            start = time.perf_counter()
            out = None
            for _ in range(steps):
                out = compiled(*args)
                args[0], args[1] = out[0], out[1]
            jax.block_until_ready(out)
            times[method].append((time.perf_counter() - start) / steps * 1e3)
        print(
            f"# round {r + 1}/{rounds}: " + ", ".join(f"{m} {times[m][-1]:.1f}" for m in methods),
            flush=True,
        )
    rows = []
    for method in methods:
        ratio = (
            statistics.median(t / h for t, h in zip(times[method], times["hand"], strict=True))
            if "hand" in times
            else float("nan")
        )
        rows.append(
            dict(
                method=method,
                ms=round(statistics.median(times[method]), 2),
                ms_min=round(min(times[method]), 2),
                x_hand=round(ratio, 4),
                ms_rounds=[round(t, 2) for t in times[method]],
                **info[method],
                shape=dataclasses.asdict(shape),
                rounds=rounds,
                steps=steps,
                compiler_options=compiler_options,
                backend=jax.default_backend(),
                threads=os.cpu_count(),
                versions=_versions(),
            )
        )
    return rows


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("jax", "flax", "optax", "qwix"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`measure`'s rows (ratios to ``hand`` where it ran)."""
    hand = next((r for r in rows if r["method"] == "hand"), None)
    lines = [
        "| method | ms/step (median) | x hand (per round) | GFLOPs | x hand FLOPs "
        "| temp MiB | x hand temp | loss step 0 | grads vs merged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rf = f"{r['flops'] / hand['flops']:.3f}" if hand else "-"
        rt = f"{r['temp_bytes'] / hand['temp_bytes']:.2f}" if hand and hand["temp_bytes"] else "-"
        lines.append(
            f"| {r['method']} | {r['ms']:.1f} | {r['x_hand']:.3f} | {r['flops'] / 1e9:.2f} "
            f"| {rf} | {r['temp_bytes'] / 2**20:.1f} | {rt} | {r['loss_step0']:.6f} "
            f"| {r['grad_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    p.add_argument("--rounds", type=int, default=7, help="rounds (each runs every method)")
    p.add_argument("--steps", type=int, default=5, help="steps per method per round")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a test: tiny shapes, 1 round of 1 step, XLA's backend optimisation off "
        "(compiles ~2.5x faster; the times mean nothing)",
    )
    p.add_argument("--out", default=None, help="append JSON lines of the results here")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {METHODS}")
    if "qwix" in methods:
        require_qwix()
    shape, rounds, steps, options = lc.Shape(), args.rounds, args.steps, None
    if args.smoke:
        shape, rounds, steps, options = SMOKE, 1, 1, SMOKE_COMPILER_OPTIONS
    rows = measure(methods, shape, rounds, steps, options)
    print(table(rows))
    bad = [r["method"] for r in rows if not r["ok"]]
    if bad:
        print(f"# WARNING: {bad} disagree with the merged model (see loss_diff, grad_rel_err)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    main()
