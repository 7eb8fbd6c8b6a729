"""Initialisations of LoRA factors from the weight itself, as peft's ``init_lora_weights``:

- PiSSA (Meng et al. 2024): ``s A B`` = the top-r SVD part of ``W``; the base becomes the
  residual ``W - s A B``, so the model starts unchanged and trains the principal directions.
- OLoRA (Büyükakyüz 2024): ``A``, ``B`` from the QR decomposition of ``W``; residual base.
- LoftQ (Li et al. 2023): for an NF4 base, alternate ``Q = nf4(W - s A B)`` and
  ``s A B = top-r SVD of (W - dequant(Q))``, so that ``dequant(Q) + s A B`` is closer to
  ``W`` than ``dequant(nf4(W))`` is.

Each works per layer on the ``(*stack, fan_in, fan_out)`` view of a kernel; the residual is
a new array (these inits cannot keep the original base). They need a finite weight (an SVD of
inf/NaN returns NaN factors or, on some backends, never returns): ``lorax.wrap`` checks
concrete weights with :func:`require_finite` first.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax.methods.lora import LoraWeight


def _matrix_view(w: jax.Array, ns: int, ni: int) -> jax.Array:
    shape = w.shape
    return w.reshape(shape[:ns] + (math.prod(shape[ns : ns + ni]), -1)).astype(jnp.float32)


def _factors_to_leaf_shapes(a, b, shape, ns, ni, dtype):
    r = a.shape[-1]
    a = a.reshape(shape[: ns + ni] + (r,)).astype(dtype)
    b = b.reshape(shape[:ns] + (r,) + shape[ns + ni :]).astype(dtype)
    return a, b


def _top_svd(m: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """A, B with ``scale * A @ B`` the best rank-``rank`` approximation of ``m``."""
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def pissa(w: jax.Array, rank: int, scale: float, ns: int, ni: int, dtype: Any) -> LoraWeight:
    m = _matrix_view(w, ns, ni)
    a, b = _top_svd(m, rank, scale)
    residual = (m - scale * a @ b).reshape(w.shape).astype(w.dtype)
    a, b = _factors_to_leaf_shapes(a, b, w.shape, ns, ni, dtype)
    return LoraWeight(residual, a, b, scale=scale)


def olora(w: jax.Array, rank: int, scale: float, ns: int, ni: int, dtype: Any) -> LoraWeight:
    m = _matrix_view(w, ns, ni)
    q, r = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))  # torch layout [out, in] = Q R, as peft
    a = jnp.swapaxes(r[..., :rank, :], -1, -2)  # lora_A = R_r [r, in]  -> A = R_r^T
    b = jnp.swapaxes(q[..., :, :rank], -1, -2)  # lora_B = Q_r [out, r] -> B = Q_r^T
    residual = (m - scale * a @ b).reshape(w.shape).astype(w.dtype)
    a, b = _factors_to_leaf_shapes(a, b, w.shape, ns, ni, dtype)
    return LoraWeight(residual, a, b, scale=scale)


def loftq(
    w: jax.Array,
    rank: int,
    scale: float,
    ns: int,
    ni: int,
    dtype: Any,
    iterations: int = 1,
    **nf4_options: Any,
) -> LoraWeight:
    from lorax.quant.quantizers import (
        quantize_nf4,  # quant imports the leaves, not the reverse
    )

    m = _matrix_view(w, ns, ni)
    q = quantize_nf4(m.reshape(w.shape), stack=ns, **nf4_options)
    a, b = _top_svd(m - _matrix_view(q.materialize(), ns, ni), rank, scale)
    for _ in range(max(iterations, 1) - 1):  # alternate: quantize the residual, refit
        q = quantize_nf4((m - scale * a @ b).reshape(w.shape), stack=ns, **nf4_options)
        a, b = _top_svd(m - _matrix_view(q.materialize(), ns, ni), rank, scale)
    a, b = _factors_to_leaf_shapes(a, b, w.shape, ns, ni, dtype)
    return LoraWeight(q, a, b, scale=scale)
