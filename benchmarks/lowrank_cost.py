"""What the low-rank path costs in a LoRA train step on the CPU (issue 19), beside the
frozen floor: a 4-layer d=256 linen decoder, batch 8 x 128, r=8 on q, k, v, o, fc1, fc2.

Modes (one process, interleaved timing):

- ``full``: every parameter trains.
- ``floor``: no adapters; only the LayerNorm scales train, and the loss is differentiated
  with respect to them alone (the rest closed over), so the step is forward + dX, no dW.
- ``hand``: LoRA written into the model (``y = x @ W + (x @ A) @ B * s``), A and B train.
- ``lorax``: the plain model under ``lorax.lora`` with ``lorax.wrap`` leaves (same W, A, B).
- ``lorax_lowrank``: ``lorax`` with every product on the low-rank path (the merged-weight
  products of lorax/methods/lora_merged.py switched off while the step is traced): lorax
  as it was before attempt 8.
- variants of the low-rank math, written by hand in JAX (not in lorax):
  ``fused_qkv_a`` (one GEMM ``x @ [A_q|A_k|A_v]`` for q, k, v); ``custom_vjp`` (x flattened
  to ``(N, in)``, a VJP that saves ``t = x @ A``, scales B instead of the output, computes
  no dW; ``_nn``, ``_nn_barrier``, ``_nn_dot``: other orderings of its dA, dB GEMMs, see
  :func:`_vjp_linear`); ``hand_flat`` (``hand`` on x flattened to ``(N, in)``); ``vjp_ew``
  and ``vjp_kcat`` (the K=r products as fused multiply-adds, or folded into the base GEMM
  along K); ``concat_w`` (one GEMM ``x @ [W | A]`` forward and ``[dy | dt] @ [W | A]^T``
  backward); ``fused_vjp`` (``fused_qkv_a`` with a VJP on the B side); ``tscale``
  (autodiff, the scale on ``x @ A``, as lorax does); ``merged_vjp`` (``x @ (W + s A B)``
  with a VJP that computes ``dx`` with the merged weight and dA, dB in the low-rank form,
  no dW); ``merged_cat`` (the same with ``x @ A`` and ``g @ B^T`` folded into the base
  GEMMs: ``[y | t] = x @ [W' | A]``, ``[dx | g B^T] = g @ [W' ; B]^T``).
- prototypes through lorax: ``lorax_flat``, ``lorax_flat_lr``, ``lorax_vjp`` run the plain
  model under ``lorax.lora`` with a ``dot_general`` rule (``lorax.using_rules``) that
  flattens x (``_lr``: for the low-rank path only) or applies the custom VJP; lorax/ itself
  is unchanged (:func:`lorax_rule`); ``lorax_merged`` and ``lorax_merged_cat`` likewise
  apply ``merged_vjp`` / ``merged_cat``.
- ``--model gpt2|llama``: ``floor``, ``lorax``, ``lorax_lowrank``, ``lorax_flat_lr``,
  ``lorax_vjp``, ``lorax_merged``, ``lorax_merged_cat`` on lorax's reference models at these
  sizes.

Where the time goes: ``--hlo MODE`` counts the compiled step's ops by category (what each dot
computes and whether YNNPACK or XLA's Eigen dot runs it, copies / transposes, elementwise
fusions); ``--profile MODE`` traces steps with ``jax.profiler`` and sums the time per op and
per category (benchmarks/profile_summary.py reads the trace). Results: benchmarks/NOTES.md,
attempts 4, 5 and 8.

    python benchmarks/lowrank_cost.py                      # every mode, the table
    python benchmarks/lowrank_cost.py --modes floor,hand,lorax --rounds 7 --steps 5
    python benchmarks/lowrank_cost.py --check              # loss/grads of variants vs hand
    python benchmarks/lowrank_cost.py --profile hand       # time per XLA op of one mode
    python benchmarks/lowrank_cost.py --hlo hand           # ops of the compiled step
    python benchmarks/lowrank_cost.py --model llama        # lorax's Llama at these sizes
    python benchmarks/lowrank_cost.py --small --check      # smoke test

FLOPs are XLA's (``compiled.cost_analysis()``); ms/step is the median over rounds, each
round running every mode ``--steps`` times in turn; "x floor (per round)" is the median over
rounds of the mode's time over the floor's in the same round, "x floor (min)" the ratio of
the fastest rounds.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
BASE_MODES = ("full", "floor", "hand", "lorax")
VARIANTS = (
    "fused_qkv_a",
    "custom_vjp",
    "custom_vjp_nn",
    "custom_vjp_nn_barrier",
    "custom_vjp_nn_dot",
    "hand_flat",
    "vjp_ew",
    "vjp_kcat",
    "concat_w",
    "fused_vjp",
    "tscale",
    "lorax_lowrank",
    "lorax_flat",
    "lorax_flat_lr",
    "lorax_vjp",
    "merged_vjp",
    "merged_cat",
    "merged_ew",
    "lorax_merged",
    "lorax_merged_cat",
)
MODES = BASE_MODES + VARIANTS


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int = 4
    d: int = 256
    heads: int = 4
    ff: int = 1024
    vocab: int = 512
    batch: int = 8
    seq: int = 128
    rank: int = 8
    alpha: float = 16.0


SMALL = Shape(layers=2, d=64, heads=2, ff=128, vocab=64, batch=2, seq=16, rank=4, alpha=8.0)


# ----- the low-rank math, one linear at a time: y = x @ W + s * (x @ A) @ B -------------
def _flat(x):
    return x.reshape(-1, x.shape[-1])


def lin_hand(x, w, a, b, s):
    return x @ w + (x @ a) @ b * s


def lin_flat(x, w, a, b, s):
    """``hand`` on the activations flattened to ``(N, in)``: the factor gradients are then
    2-D dots (autodiff of a 3-D dot_general contracts two axes, and XLA copies to do so)."""
    y = lin_hand(_flat(x), w, a, b, s)
    return y.reshape(*x.shape[:-1], w.shape[1])


def lin_tscale(x, w, a, b, s):
    return x @ w + ((x @ a) * s) @ b


def _vjp_linear(form: str):
    """``x @ W + s * (x @ A) @ B`` with a VJP that saves ``t = x @ A``, folds ``s`` into B
    (an ``r x out`` product) and computes no dW. ``form`` says how the factor gradients
    (contractions over the N tokens) are written:

    - ``tn``: as autodiff writes them, ``dA = x^T dt`` and ``dB = t^T g`` (lhs contracted
      on its major axis; XLA CPU runs these on its Eigen dot, after transposing an operand);
    - ``nn``: ``dA^T = dt^T x`` and ``dB = t^T g`` with the skinny ``(r, N)`` operand
      transposed explicitly (``t.T``, ``dt.T``: r x N values moved), so every GEMM has the
      plain NN / NT form; ``dA`` is the transpose of an ``r x in`` result;
    - ``nn_barrier``: as ``nn``, the transposes behind ``lax.optimization_barrier`` so that
      XLA cannot fold them back into the dots (which turns ``nn`` into ``tn``);
    - ``nn_dot``: as ``nn``, with ``t^T`` and ``dt^T`` computed as their own NT GEMMs
      (``A^T x^T``, ``(sB) g^T``) instead of transposing ``t`` and ``dt``.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    nn_ = (((1,), (0,)), ((), ()))  # plain X @ M
    nt = (((1,), (1,)), ((), ()))  # contract both last axes: g @ M^T
    tn = (((0,), (0,)), ((), ()))  # contract both first axes: X^T @ g

    @jax.custom_vjp
    def f(x, w, a, b, s):
        return x @ w + (x @ a) @ (b * s)

    def fwd(x, w, a, b, s):
        t = x @ a
        return x @ w + t @ (b * s), (x, w, a, b, s, t)

    def bwd(res, g):
        x, w, a, b, s, t = res
        bs = b * s
        dt = lax.dot_general(g, bs, nt)  # (N, r)
        dx = lax.dot_general(g, w, nt) + lax.dot_general(dt, a, nt)
        if form == "tn":
            da = lax.dot_general(x, dt, tn)  # (in, r)
            db = lax.dot_general(t, g, tn) * s  # (r, out)
        else:
            if form == "nn":
                t_t, dt_t = t.T, dt.T  # (r, N): small copies
            elif form == "nn_barrier":  # the same, kept from being folded into the dots
                t_t, dt_t = lax.optimization_barrier((t.T, dt.T))
            else:
                t_t = lax.dot_general(a.T, x, nt)  # (r, N) = A^T x^T
                dt_t = lax.dot_general(bs, g, nt)  # (r, N) = (sB) g^T
            da = lax.dot_general(dt_t, x, nn_).T  # (r, in) -> (in, r)
            db = lax.dot_general(t_t, g, nn_) * s  # (r, out)
        return dx, jnp.zeros_like(w), da, db, jnp.zeros_like(s)

    f.defvjp(fwd, bwd)

    def lin(x, w, a, b, s):
        y = f(_flat(x), w, a, b, jnp.asarray(s, x.dtype))
        return y.reshape(*x.shape[:-1], w.shape[1])

    return lin


def _kr_sum(base, t, m):
    """``base + t @ m`` for a skinny ``t`` (N, r), written as r broadcast multiply-adds so
    that XLA fuses them with the add into one elementwise loop instead of a K=r GEMM whose
    output is then read again by the add."""
    out = base
    for k in range(t.shape[1]):
        out = out + t[:, k : k + 1] * m[k][None, :]
    return out


def _vjp_variant(kind: str):
    """``custom_vjp`` with the K=r products done otherwise: ``ew`` as fused multiply-adds
    (:func:`_kr_sum`), ``kcat`` folded into the base GEMM along K:
    ``y = [x | t] @ [W ; sB]`` and ``dx = [g | dt] @ [W | A]^T``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    nt = (((1,), (1,)), ((), ()))
    tn = (((0,), (0,)), ((), ()))

    def forward(x, w, a, b, s):
        t = x @ a
        if kind == "ew":
            return _kr_sum(x @ w, t, b * s), t
        return jnp.concatenate([x, t], axis=1) @ jnp.concatenate([w, b * s], axis=0), t

    @jax.custom_vjp
    def f(x, w, a, b, s):
        return forward(x, w, a, b, s)[0]

    def fwd(x, w, a, b, s):
        y, t = forward(x, w, a, b, s)
        return y, (x, w, a, b, s, t)

    def bwd(res, g):
        x, w, a, b, s, t = res
        dt = lax.dot_general(g, b * s, nt)
        if kind == "ew":
            dx = _kr_sum(lax.dot_general(g, w, nt), dt, a.T)
        else:
            dx = lax.dot_general(
                jnp.concatenate([g, dt], axis=1), jnp.concatenate([w, a], axis=1), nt
            )
        da = lax.dot_general(x, dt, tn)
        db = lax.dot_general(t, g, tn) * s
        return dx, jnp.zeros_like(w), da, db, jnp.zeros_like(s)

    f.defvjp(fwd, bwd)

    def lin(x, w, a, b, s):
        y = f(_flat(x), w, a, b, jnp.asarray(s, x.dtype))
        return y.reshape(*x.shape[:-1], w.shape[1])

    return lin


def _concat_linear():
    """One GEMM ``[y0 | t] = x @ [W | A]`` forward, one ``dx = [g | dt] @ [W | A]^T`` back."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    nt = (((1,), (1,)), ((), ()))
    tn = (((0,), (0,)), ((), ()))

    def forward(x, w, a, b, s):
        wa = jnp.concatenate([w, a], axis=1)
        z = x @ wa
        out = w.shape[1]
        t = z[:, out:]
        return z[:, :out] + t @ (b * s), (wa, t)

    @jax.custom_vjp
    def f(x, w, a, b, s):
        return forward(x, w, a, b, s)[0]

    def fwd(x, w, a, b, s):
        y, (wa, t) = forward(x, w, a, b, s)
        return y, (x, wa, b, s, t)

    def bwd(res, g):
        x, wa, b, s, t = res
        out = b.shape[1]
        dt = lax.dot_general(g, b * s, nt)
        dx = lax.dot_general(jnp.concatenate([g, dt], axis=1), wa, nt)
        da = lax.dot_general(x, dt, tn)
        db = lax.dot_general(t, g, tn) * s
        w = wa[:, :out]
        return dx, jnp.zeros_like(w), da, db, jnp.zeros_like(s)

    f.defvjp(fwd, bwd)

    def lin(x, w, a, b, s):
        y = f(_flat(x), w, a, b, jnp.asarray(s, x.dtype))
        return y.reshape(*x.shape[:-1], w.shape[1])

    return lin


def linear_impls() -> dict:
    vjp = _vjp_linear("tn")
    return {
        "hand": lin_hand,
        "tscale": lin_tscale,
        "fused_qkv_a": lin_hand,
        "custom_vjp": vjp,
        "custom_vjp_nn": _vjp_linear("nn"),
        "custom_vjp_nn_barrier": _vjp_linear("nn_barrier"),
        "custom_vjp_nn_dot": _vjp_linear("nn_dot"),
        "hand_flat": lin_flat,
        "vjp_ew": _vjp_variant("ew"),
        "vjp_kcat": _vjp_variant("kcat"),
        "concat_w": _concat_linear(),
        "fused_vjp": vjp,
        "merged_vjp": _merged_linear(),
        "merged_cat": _merged_linear(cat=True),
        "merged_ew": _merged_linear(ew=True),
    }


def qkv_fused(x, weights, s, lin):
    """q, k, v of one input with one GEMM for their A factors: ``x @ [A_q|A_k|A_v]``; the
    rest per projection (``lin`` is None: autodiff; else a VJP of the B side)."""
    import jax.numpy as jnp

    r = weights[0][1].shape[1]
    t = x @ jnp.concatenate([a for _, a, _ in weights], axis=1)
    outs = []
    for i, (w, _, b) in enumerate(weights):
        ti = t[..., i * r : (i + 1) * r]
        outs.append(x @ w + ti @ b * s if lin is None else lin(x, ti, w, b, s))
    return outs


def _fused_vjp_part():
    """``x @ W + t @ (s B)`` for a given ``t`` (the shared A GEMM stays autodiff), with a
    VJP that computes no dW: ``dx = g @ W^T``, ``dt = g @ (s B)^T``, ``dB = s t^T g``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    nt = (((1,), (1,)), ((), ()))
    tn = (((0,), (0,)), ((), ()))

    @jax.custom_vjp
    def f(x, t, w, b, s):
        return x @ w + t @ (b * s)

    def fwd(x, t, w, b, s):
        return f(x, t, w, b, s), (w, b, s, t)

    def bwd(res, g):
        w, b, s, t = res
        dx = lax.dot_general(g, w, nt)
        dt = lax.dot_general(g, b * s, nt)
        db = lax.dot_general(t, g, tn) * s
        return dx, dt, jnp.zeros_like(w), db, jnp.zeros_like(s)

    f.defvjp(fwd, bwd)

    def lin(x, t, w, b, s):
        y = f(_flat(x), _flat(t), w, b, jnp.asarray(s, x.dtype))
        return y.reshape(*x.shape[:-1], w.shape[1])

    return lin


def _lowrank_only(mode: str):
    """For ``lorax_lowrank``: lorax with every product on the low-rank path (lorax before
    attempt 8's merged products), by switching off the cost model while the step is traced."""
    import contextlib
    from unittest import mock

    from lorax.methods import lora_merged

    if mode != "lorax_lowrank":
        return contextlib.nullcontext()
    return mock.patch.object(lora_merged, "merge_pays", lambda *a, **k: False)


def lorax_rule(mode: str):
    """A ``dot_general`` rule for ``lorax.using_rules``: the interpreter's low-rank path
    replaced, for ``x @ W`` with a 2-D LoRA leaf on an array base, by ``lorax_flat``
    (lorax's own math, ``x @ W + ((x @ A) * s) @ B``, on x flattened to 2-D),
    ``lorax_flat_lr`` (the same with only the low-rank path flattened) or
    ``lorax_vjp`` (flattened, the custom VJP of ``custom_vjp``); anything else goes to the
    leaf as usual. A prototype of a change to ``LoraWeight.dot_general``, from outside."""
    import lorax

    impl = {
        "lorax_vjp": _vjp_linear("tn"),
        "lorax_merged": _merged_linear(),
        "lorax_merged_cat": _merged_linear(cat=True),
    }.get(mode)

    def flat(x, w, a, b, s):
        low = ((_flat(x) @ a) * s) @ b
        if mode == "lorax_flat_lr":  # only the low-rank path flattened; base as the model has it
            return x @ w + low.reshape(*x.shape[:-1], w.shape[1])
        y = _flat(x) @ w + low
        return y.reshape(*x.shape[:-1], w.shape[1])

    def rule(ctx, invals):
        if len(invals) != 2:
            return NotImplemented
        x, w = invals
        (lc, rc), (lb, rb) = ctx.params["dimension_numbers"]
        if (
            lorax.is_lorax_leaf(x)
            or type(w) is not lorax.LoraWeight
            or lorax.is_lorax_leaf(w.base)
            or len(w.shape) != 2
            or w.a.ndim != 2
            or tuple(lc) != (x.ndim - 1,)
            or tuple(rc) != (0,)
            or lb
            or rb
            or w.dropout
        ):
            return NotImplemented
        a, b = w.a.astype(x.dtype), w.b.astype(x.dtype)
        return (impl or flat)(x, w.base.astype(x.dtype), a, b, w.scale)

    return rule


# ----- the model --------------------------------------------------------------------------
def _merged_linear(cat: bool = False, ew: bool = False):
    """``x @ (W + s A B)``: the update merged into the weight for this product (an ``in x
    out x r`` product, no token axis) and one GEMM of the base's size forward and for dx;
    the factor gradients as autodiff of the low-rank path writes them, ``dA = s x^T (g
    B^T)`` and ``dB = s (x A)^T g``, without dW. The merged weight is recomputed in the
    backward pass rather than saved."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    nt = (((1,), (1,)), ((), ()))
    tn = (((0,), (0,)), ((), ()))

    def merged(w, a, b, s):
        if ew:  # r broadcast multiply-adds in one loop fusion, no K=r GEMM
            return w + jnp.sum((a * s)[:, :, None] * b[None, :, :], axis=1)
        return w + (a * s) @ b

    @jax.custom_vjp
    def f(x, w, a, b, s):
        return x @ merged(w, a, b, s)

    def fwd(x, w, a, b, s):
        if not cat:
            return f(x, w, a, b, s), (x, w, a, b, s, None)
        # ``cat``: ``[y | t] = x @ [W' | A]``, the skinny product inside the base GEMM
        out = w.shape[1]
        z = x @ jnp.concatenate([merged(w, a, b, s), a], axis=1)
        return z[:, :out], (x, w, a, b, s, z[:, out:])

    def bwd(res, g):
        x, w, a, b, s, t = res
        if cat:  # ``[dx | g B^T] = g @ [W' ; B]^T``
            z = lax.dot_general(g, jnp.concatenate([merged(w, a, b, s), b], axis=0), nt)
            dx, dt = z[:, : x.shape[1]], z[:, x.shape[1] :]
        else:
            dx = lax.dot_general(g, merged(w, a, b, s), nt)
            t = x @ a
            dt = lax.dot_general(g, b, nt)
        da = lax.dot_general(x, dt, tn) * s
        db = lax.dot_general(t, g, tn) * s
        return dx, jnp.zeros_like(w), da, db, jnp.zeros_like(s)

    f.defvjp(fwd, bwd)

    def lin(x, w, a, b, s):
        y = f(_flat(x), w, a, b, jnp.asarray(s, x.dtype))
        return y.reshape(*x.shape[:-1], w.shape[1])

    return lin


def make_model(shape: Shape, impl: str | None):
    """The decoder; ``impl`` None: plain ``nn.Dense`` layers (full, floor, lorax), else
    LoRA layers with params ``kernel``, ``lora_a``, ``lora_b`` computed by ``impl``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    lins = linear_impls()
    scale = shape.alpha / shape.rank
    fused = impl in ("fused_qkv_a", "fused_vjp")
    fused_part = _fused_vjp_part() if impl == "fused_vjp" else None

    class LoraDense(nn.Module):
        in_features: int
        features: int

        def setup(self):
            self.kernel = self.param(
                "kernel", nn.initializers.lecun_normal(), (self.in_features, self.features)
            )
            self.lora_a = self.param(
                "lora_a", nn.initializers.he_uniform(), (self.in_features, shape.rank)
            )
            # small random B (not zero) so that no product is degenerate in the benchmark
            self.lora_b = self.param(
                "lora_b", nn.initializers.normal(0.02), (shape.rank, self.features)
            )

        def weights(self):
            return self.kernel, self.lora_a, self.lora_b

        def __call__(self, x):
            return lins[impl](x, self.kernel, self.lora_a, self.lora_b, scale)

    def dense(name, n_in, n_out):
        if impl is None:
            return nn.Dense(n_out, use_bias=False, name=name)
        return LoraDense(n_in, n_out, name=name)

    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            d, h = shape.d, shape.heads
            q_, k_, v_ = (dense(n, d, d) for n in ("q", "k", "v"))
            if fused:
                q, k, v = qkv_fused(x, [m.weights() for m in (q_, k_, v_)], scale, fused_part)
            else:
                q, k, v = q_(x), k_(x), v_(x)
            split = lambda t: t.reshape(*t.shape[:-1], h, d // h)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
            n = x.shape[1]
            causal = jnp.tril(jnp.ones((n, n), bool))
            scores = jnp.where(causal, scores, jnp.finfo(x.dtype).min)
            probs = jax.nn.softmax(scores, axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
            return dense("o", d, d)(out)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + Attention(name="attn")(nn.LayerNorm(name="ln1")(x))
            y = dense("fc1", shape.d, shape.ff)(nn.LayerNorm(name="ln2")(x))
            return x + dense("fc2", shape.ff, shape.d)(nn.gelu(y))

    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(shape.vocab, shape.d, name="embed")(tokens)
            pos = self.param("pos", nn.initializers.normal(0.02), (shape.seq, shape.d))
            x = x + pos[: tokens.shape[1]]
            for i in range(shape.layers):
                x = Block(name=f"block_{i}")(x)
            x = nn.LayerNorm(name="ln_f")(x)
            return nn.Dense(shape.vocab, use_bias=False, name="head")(x)

    return Decoder()


# ----- trees ------------------------------------------------------------------------------
def _partition(params, keep):
    """``(kept, rest)`` flat dicts of a nested dict by ``keep(path)``."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    kept = {k: v for k, v in flat.items() if keep(k)}
    rest = {k: v for k, v in flat.items() if not keep(k)}
    return kept, rest


def _join(a, b):
    from flax import traverse_util

    return traverse_util.unflatten_dict({**a, **b})


def _is_factor(path) -> bool:
    return path[-1] in ("lora_a", "lora_b")


def _is_ln_scale(path) -> bool:
    return path[-1] == "scale" and path[-2].startswith("ln")


def setup_mode(mode: str, shape: Shape, hand_params, tokens):
    """``(loss(trainable, frozen, tokens), trainable, frozen)`` of one mode, on weights
    taken from the hand-LoRA parameters (so every mode computes on the same W, A, B)."""
    import jax
    import optax

    import lorax

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    factors, base_flat = _partition(hand_params, _is_factor)
    if mode.startswith("lorax") or mode in ("full", "floor"):
        model = make_model(shape, None)
        base = _join(base_flat, {})
        if mode == "full":
            return (lambda t, f, tok: ce(model.apply({"params": t}, tok[:, :-1]))), base, {}
        if mode == "floor":
            t, f = _partition(base, _is_ln_scale)

            def loss(t, f, tok):
                return ce(model.apply({"params": _join(t, f)}, tok[:, :-1]))

            return loss, t, f
        # lorax: the plain model, its kernels wrapped, A and B set to the hand values
        lp = lorax.wrap(
            base, rank=shape.rank, alpha=shape.alpha, targets=list(TARGETS), key=jax.random.key(2)
        )

        def put(path, leaf):
            if not isinstance(leaf, lorax.LoraWeight):
                return leaf
            keys = tuple(p.key for p in path[:-1])
            return leaf.replace(a=factors[keys + ("lora_a",)], b=factors[keys + ("lora_b",)])

        lp = jax.tree_util.tree_map_with_path(put, lp, is_leaf=lorax.is_lorax_leaf)
        t, f = lorax.split(lp)
        apply = lorax.lora(model.apply, strict=True)
        rules = {} if mode in ("lorax", "lorax_lowrank") else {"dot_general": lorax_rule(mode)}

        def loss(t, f, tok):
            with lorax.using_rules(rules), _lowrank_only(mode):  # read while traced
                return ce(apply({"params": lorax.combine(t, f)}, tok[:, :-1]))

        return loss, t, f
    model = make_model(shape, mode)

    def loss(t, f, tok):
        return ce(model.apply({"params": _join(t, f)}, tok[:, :-1]))

    return loss, factors, base_flat


REFERENCE_MODES = (
    "floor",
    "lorax",
    "lorax_lowrank",
    "lorax_flat_lr",
    "lorax_vjp",
    "lorax_merged",
    "lorax_merged_cat",
)
REFERENCE_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def reference_model(name: str, shape: Shape):
    """lorax's GPT-2 or Llama at this script's sizes (float32, layers not scanned)."""
    from lorax.models import gpt2, llama

    if name == "gpt2":
        config = gpt2.GPT2Config(
            vocab_size=shape.vocab,
            n_positions=shape.seq,
            n_embd=shape.d,
            n_layer=shape.layers,
            n_head=shape.heads,
        )
        return gpt2.GPT2(config)
    config = llama.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d,
        intermediate_size=shape.ff,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=max(1, shape.heads // 2),
        max_position_embeddings=shape.seq,
    )
    return llama.Llama(config)


def setup_reference(name: str, mode: str, shape: Shape, tokens):
    """``(loss, trainable, frozen)`` of ``mode`` (:data:`REFERENCE_MODES`) on a reference
    model: the floor trains the norm scales only; the LoRA modes wrap the attention and MLP
    projections (r, alpha as the decoder; B small random, not zero)."""
    import jax
    import jax.numpy as jnp
    import optax

    import lorax

    model = reference_model(name, shape)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, shape.seq), jnp.int32))
    params = params["params"]

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    if mode == "floor":
        t, f = _partition(params, lambda path: path[-1] == "scale")

        def loss(t, f, tok):
            return ce(model.apply({"params": _join(t, f)}, tok[:, :-1]))

        return loss, t, f
    lp = lorax.wrap(
        params,
        rank=shape.rank,
        alpha=shape.alpha,
        targets=REFERENCE_TARGETS[name],
        key=jax.random.key(2),
    )
    leaves, treedef = jax.tree.flatten(lp, is_leaf=lorax.is_lorax_leaf)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [
        leaf.replace(b=0.02 * jax.random.normal(key, leaf.b.shape, leaf.b.dtype))
        if isinstance(leaf, lorax.LoraWeight)
        else leaf
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    t, f = lorax.split(jax.tree.unflatten(treedef, leaves))
    apply = lorax.lora(model.apply, strict=True)
    rules = {} if mode in ("lorax", "lorax_lowrank") else {"dot_general": lorax_rule(mode)}

    def loss(t, f, tok):
        with lorax.using_rules(rules), _lowrank_only(mode):
            return ce(apply({"params": lorax.combine(t, f)}, tok[:, :-1]))

    return loss, t, f


def factor_grads(mode: str, grads) -> dict:
    """A mode's gradients as ``{(path..., 'lora_a'|'lora_b'): array}``."""
    import jax

    import lorax

    if not mode.startswith("lorax"):
        return dict(grads)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads, is_leaf=lorax.is_lorax_leaf):
        if isinstance(leaf, lorax.LoraWeight):  # the trainable half: a and b, no base
            keys = tuple(p.key for p in path[:-1])  # drop 'kernel'
            out[keys + ("lora_a",)], out[keys + ("lora_b",)] = leaf.a, leaf.b
    return out


# ----- measuring --------------------------------------------------------------------------
def init(shape: Shape):
    import jax
    import jax.numpy as jnp

    model = make_model(shape, "hand")
    tokens = jax.random.randint(jax.random.key(1), (shape.batch, shape.seq + 1), 0, shape.vocab)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, shape.seq), jnp.int32))
    return params["params"], tokens


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float((cost or {}).get("flops", float("nan")))


def build_step(mode: str, shape: Shape, hand_params, tokens, model: str | None = None):
    """The compiled train step of ``mode`` (on a reference ``model`` if given) and its
    initial arguments."""
    import jax
    import optax

    if model:
        loss, t, f = setup_reference(model, mode, shape, tokens)
    else:
        loss, t, f = setup_mode(mode, shape, hand_params, tokens)
    tx = optax.adamw(1e-4)

    def update(t, s, f, tok):
        value, grads = jax.value_and_grad(loss)(t, f, tok)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    # copies, so that donating one mode's buffers leaves the shared weights alone
    t = jax.tree.map(lambda x: x.copy(), t)
    state = tx.init(t)
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(t, state, f, tokens).compile()
    return compiled, [t, state, f, tokens]


def measure(modes, shape: Shape, rounds: int, steps: int, model: str | None = None) -> list[dict]:
    import jax

    hand_params, tokens = init(shape)
    steps_of, flops, compile_s = {}, {}, {}
    for mode in modes:
        start = time.perf_counter()
        compiled, args = build_step(mode, shape, hand_params, tokens, model)
        compile_s[mode] = time.perf_counter() - start
        flops[mode] = _flops(compiled)
        steps_of[mode] = (compiled, args)
        for _ in range(2):  # warm up
            t, s, value = compiled(*args)
            args[0], args[1] = t, s
        jax.block_until_ready(value)
        print(f"# {mode}: compiled in {compile_s[mode]:.1f} s, {flops[mode]:.3e} FLOPs", flush=True)
    times = collections.defaultdict(list)
    loss = {}
    for r in range(rounds):
        for mode in modes:
            compiled, args = steps_of[mode]
            start = time.perf_counter()
            for _ in range(steps):
                t, s, value = compiled(*args)
                args[0], args[1] = t, s
            jax.block_until_ready((t, s, value))
            times[mode].append((time.perf_counter() - start) / steps * 1e3)
            loss[mode] = float(value)
        print(
            f"# round {r + 1}/{rounds}: " + ", ".join(f"{m} {times[m][-1]:.1f}" for m in modes),
            flush=True,
        )
    rows = []
    for mode in modes:
        # the ratio to the floor within each round, then the median: robust to the machine
        # slowing down for a while (another process, a noisy neighbour)
        ratio = (
            statistics.median(t / f for t, f in zip(times[mode], times["floor"], strict=True))
            if "floor" in times
            else float("nan")
        )
        rows.append(
            dict(
                mode=mode,
                model=model or "decoder",
                ms=round(statistics.median(times[mode]), 2),
                ms_min=round(min(times[mode]), 2),
                x_floor=round(ratio, 4),
                ms_rounds=[round(t, 2) for t in times[mode]],
                flops=flops[mode],
                loss=loss[mode],
                compile_s=round(compile_s[mode], 1),
                shape=dataclasses.asdict(shape),
                rounds=rounds,
                steps=steps,
                backend=jax.default_backend(),
                threads=os.cpu_count(),
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    by = {r["mode"]: r for r in rows}
    floor = by.get("floor")
    lines = [
        "| mode | ms/step (median) | min | x floor (per round) | x floor (min) | FLOPs "
        "| x floor FLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rm = f"{r['ms_min'] / floor['ms_min']:.3f}" if floor else "-"
        rf = f"{r['flops'] / floor['flops']:.3f}" if floor else "-"
        lines.append(
            f"| {r['mode']} | {r['ms']:.1f} | {r['ms_min']:.1f} | {r['x_floor']:.3f} | {rm} "
            f"| {r['flops']:.3e} | {rf} |"
        )
    return "\n".join(lines)


def check(modes, shape: Shape, model: str | None = None) -> list[dict]:
    """Loss and A/B gradients of each LoRA mode against ``hand`` (on a reference model:
    against ``lorax``), as max |diff| / max |ref| over each factor."""
    import jax
    import numpy as np

    hand_params, tokens = init(shape)
    reference = "lorax" if model else "hand"

    def grads_of(mode):
        if model:
            loss, t, f = setup_reference(model, mode, shape, tokens)
        else:
            loss, t, f = setup_mode(mode, shape, hand_params, tokens)
        value, g = jax.jit(jax.value_and_grad(loss))(t, f, tokens)
        return float(value), factor_grads(mode, g)

    ref_loss, ref = grads_of(reference)
    out = []
    for mode in modes:
        if mode in ("full", "floor", reference):
            continue
        value, g = grads_of(mode)
        assert set(g) == set(ref), (mode, sorted(set(g) ^ set(ref))[:4])
        worst = max(
            float(np.max(np.abs(np.asarray(g[k]) - np.asarray(ref[k]))))
            / float(np.max(np.abs(np.asarray(ref[k]))))
            for k in ref
        )
        row = dict(
            mode=mode,
            model=model or "decoder",
            reference=reference,
            loss=value,
            loss_diff=abs(value - ref_loss),
            grad_rel_err=worst,
        )
        row["ok"] = bool(row["loss_diff"] <= 1e-5 * abs(ref_loss) and worst <= 1e-4)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


# ----- where the time goes ----------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


def _dims(ty: str) -> list[int]:
    m = re.match(r"^\w+\[([\d,]*)\]", ty)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _parse_hlo(text: str) -> tuple[dict, str]:
    """``{computation: {instr: (type, opcode, rest)}}`` and the entry's name."""
    comps: dict[str, dict] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and not line.startswith(" "):
            current = comps.setdefault(h.group(1), {})
            entry = h.group(1) if line.startswith("ENTRY") else entry
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, ty, op, rest = m.groups()
            current[name] = (ty, op, rest)
    return comps, entry


def _dot_kind(comp: dict, name: str, rank: int, tokens: int) -> str:
    """What a dot computes, read off its shapes and dimension numbers: attention (batch
    dims), a weight gradient (the token axis contracted: lhs contracting dim 0 of a 2-D
    operand, or JAX's name for dW, ``.../transpose`` under ``transpose(jvp(...))``), and
    whether it is a low-rank product (an axis of size r): ``N=r`` (x@A, g@B^T), ``K=r``
    (t@B, dt@A^T), ``dA/dB`` (the token axis contracted into an r-sized factor)."""
    ty, _, rest = comp[name]
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    shapes = [_dims(comp[o][0]) if o in comp else [] for o in operands[:2]]
    out = _dims(ty)
    lc = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    lc = [int(i) for i in lc.group(1).split(",") if i] if lc else []
    k = [shapes[0][i] for i in lc] if shapes[0] else []
    if "lhs_batch_dims" in rest:
        return "dot:attention"
    meta = re.search(r'op_name="([^"]*)"', rest)
    meta = meta.group(1) if meta else ""
    weight_grad = (len(shapes[0]) == 2 and lc == [0]) or (
        "transpose(jvp" in meta and meta.endswith("/transpose")
    )
    # an NN-form factor gradient (r, N) @ (N, out); fc1's dB is ambiguous with a
    # (sB) g^T product here (ff = N = 1024) and is counted as N=r
    weight_grad |= len(out) == 2 and out[0] <= 3 * rank and k == [tokens] and out[1] != tokens
    two_d = len(out) == 2 and all(len(sh) == 2 for sh in shapes)
    skinny = two_d and any(0 < n <= 3 * rank for n in out + sum(shapes, []))  # r, 3r fused
    if weight_grad:
        return "dot:lowrank dA/dB (K=N)" if skinny else "dot:dW"
    if not skinny:
        return "dot:base"
    if k and k[0] <= 3 * rank:
        return "dot:lowrank K=r (t@B, dt@A^T)"
    return "dot:lowrank N=r (x@A, g@B^T)"


def hlo_index(text: str, rank: int, tokens: int) -> dict:
    """Each op of the compiled step's entry computation: ``{name: (category, type,
    jax op_name)}``. Categories: ``dot:*`` (by :func:`_dot_kind`, with ``+fused`` when
    the fusion holds more than the dot), ``copy`` (copy / transpose), ``elementwise``
    (other fusions), or the opcode. A dot's runtime is named in brackets: ``[ynn]`` a
    YNNPACK fusion, ``[dot]`` XLA CPU's own dot thunk (Eigen), ``[fusion]`` another fusion."""
    comps, entry = _parse_hlo(text)
    out = {}
    for name, (ty, op, rest) in comps.get(entry, {}).items():
        if op in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
            continue
        meta = re.search(r'op_name="([^"]*)"', rest)
        meta = meta.group(1) if meta else ""
        if op == "dot":
            cat = _dot_kind(comps[entry], name, rank, tokens) + " [dot]"
        elif op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", rest)
            inner = comps.get(called.group(1), {}) if called else {}
            dots = [n for n, v in inner.items() if v[1] == "dot"]
            body = {v[1] for v in inner.values()} - {"parameter", "bitcast"}
            if dots:
                cat = _dot_kind(inner, dots[0], rank, tokens)
                cat += "+fused" if body - {"dot"} else ""
                cat += " [ynn]" if "__ynn" in rest else " [fusion]"
            elif body & {"copy", "transpose"} or "transpose" in name or "copy" in name:
                cat = "copy"
            else:
                cat = "elementwise"
        elif op in ("copy", "transpose"):
            cat = "copy"
        else:
            cat = op
        out[name] = (cat, ty, meta)
    return out


def hlo_ops(text: str, rank: int, tokens: int) -> dict:
    """Counts of the entry's ops by category, and the copies / transposes with shapes."""
    index = hlo_index(text, rank, tokens)
    counts = collections.Counter(cat for cat, _, _ in index.values())
    copies = collections.Counter(ty for cat, ty, _ in index.values() if cat == "copy")
    return dict(counts=dict(counts.most_common()), copies=dict(copies.most_common()))


def by_category(summary: dict, index: dict) -> dict:
    """A profile's per-op times summed by the ops' HLO categories (:func:`hlo_index`)."""
    ms: dict = collections.defaultdict(float)
    n: collections.Counter = collections.Counter()
    for op, _, t, _ in summary["top"]:
        cat = index.get(op, ("?",))[0]
        ms[cat] += t
        n[cat] += 1
    return {c: [round(v, 3), n[c]] for c, v in sorted(ms.items(), key=lambda kv: -kv[1])}


def profile(mode: str, shape: Shape, steps: int, trace_dir: str | None) -> dict:
    """Traces ``steps`` steps of ``mode``: time per XLA op (benchmarks/profile_summary.py),
    and per category of op (what each dot computes, copies, elementwise fusions)."""
    import tempfile

    import jax

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_summary import summarize

    hand_params, tokens = init(shape)
    compiled, args = build_step(mode, shape, hand_params, tokens)
    index = hlo_index(compiled.as_text(), shape.rank, shape.batch * shape.seq)
    for _ in range(2):
        t, s, value = compiled(*args)
        args[0], args[1] = t, s
    jax.block_until_ready(value)
    trace_dir = trace_dir or tempfile.mkdtemp(prefix=f"trace-lowrank-{mode}-")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            t, s, value = compiled(*args)
            args[0], args[1] = t, s
        jax.block_until_ready((t, s, value))
    wall = (time.perf_counter() - start) / steps * 1e3
    summary = summarize(trace_dir, steps=steps, top=100_000)
    summary["categories"] = by_category(summary, index)
    summary["top"] = [
        [op, index.get(op, ("?", "", ""))[0], ms, share, *index.get(op, ("?", "", ""))[1:]]
        for op, _, ms, share in summary["top"][:40]
    ]
    summary["wall_ms"] = round(wall, 2)
    summary["trace_dir"] = trace_dir
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--steps", type=int, default=5, help="steps per mode per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--check", action="store_true", help="loss/grads of LoRA modes vs hand")
    p.add_argument("--profile", metavar="MODE", help="trace --steps steps of MODE, time per op")
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--hlo", metavar="MODE", help="op counts of MODE's compiled step")
    p.add_argument(
        "--model",
        choices=sorted(REFERENCE_TARGETS),
        help=f"time lorax's GPT-2 or Llama at these sizes instead (modes {REFERENCE_MODES})",
    )
    p.add_argument("--out", default=None, help="append JSON lines of the results here")
    args = p.parse_args(argv)
    shape = SMALL if args.small else Shape()
    modes = [m for m in args.modes.split(",") if m]
    if args.model and args.modes == p.get_default("modes"):
        modes = list(REFERENCE_MODES)
    unknown = sorted(set(modes) - set(REFERENCE_MODES if args.model else MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; known: {MODES}")
    rows: list[dict] = []
    if args.hlo:
        hand_params, tokens = init(shape)
        compiled, _ = build_step(args.hlo, shape, hand_params, tokens)
        ops = hlo_ops(compiled.as_text(), shape.rank, shape.batch * shape.seq)
        print(json.dumps(ops, indent=1))
        rows.append(dict(kind="hlo", mode=args.hlo, **ops))
    elif args.profile:
        summary = profile(args.profile, shape, args.steps, args.trace_dir)
        print(f"{args.profile}: ops busy {summary['busy_ms']:.2f} ms of {summary['wall_ms']} ms")
        for cat, (ms, n) in summary["categories"].items():
            print(f"  {ms:8.2f} ms  {n:4d} ops  {cat}")
        for op, cat, ms, share, ty, meta in summary["top"]:
            print(f"  {ms:7.3f} ms {100 * share:5.1f}%  {cat:34s} {op} {ty.split('{')[0]} {meta}")
        rows.append(dict(kind="profile", mode=args.profile, **summary))
    elif args.check:
        rows += [dict(kind="check", **r) for r in check(modes, shape, args.model)]
    else:
        rows = measure(modes, shape, args.rounds, args.steps, args.model)
        print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
