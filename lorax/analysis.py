"""``lorax.analysis``: how low is the rank of a fine-tuning update?

Pure functions over LoRA leaves and dense updates, after the analyses of the LoRA paper
(Hu et al. 2021, section 7) and the effective rank of Roy & Vetterli (2007):

- :func:`delta_spectrum`: the singular values of a LoRA leaf's update ``scale * A @ B``,
  from the factors alone (QR of ``A`` and of ``B.T``, SVD of the small ``r x r`` core): the
  dense update is never formed.
- :func:`dense_spectrum`: the singular values of a dense update (``W_ft - W_0``), exact or
  the top ``k`` by :func:`randomized_svd` (Halko, Martinsson & Tropp 2011).
- :func:`energy` and :func:`effective_rank`: how concentrated a spectrum is.
- :func:`subspace_similarity` / :func:`similarity_grid`: the paper's normalized Grassmann
  similarity between the subspaces that two ``A`` factors span.
- :func:`amplification`: the paper's amplification factor ``||dW|| / ||U^T W V||``.
- :func:`update_report`: all of the above per parameter path of a wrapped tree (every LoRA
  leaf) or of a dense pair (full fine-tuning), as plain Python numbers.

A dense weight's axes are ``(*stack, *in_axes, *out_axes)``, as for :class:`lorax.LoraWeight`;
stack axes (``nn.scan`` layers) are batch axes of every result, the input and output axes
are flattened into the rows and columns of one matrix per layer. Everything is computed in
float32 or wider, whatever the weights' dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax._checks import check_key, positive_int
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.layout import infer_in_axes, infer_stack_axes
from lorax.leaf import is_lorax_leaf, materialize
from lorax.methods.lora import LoraWeight
from lorax.paths import FlatTree
from lorax.sharding import unbox_leaf
from lorax.targets import is_weight_path

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST
_INT_MAX = 2**31 - 1  # counts passed into the jitted kernels as int32

__all__ = [
    "delta_spectrum",
    "dense_spectrum",
    "randomized_svd",
    "energy",
    "effective_rank",
    "subspace_similarity",
    "similarity_grid",
    "amplification",
    "update_report",
]


# ------------------------------------------------------------------------------ helpers


def _mm(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y, precision=_HIGHEST)


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _acc(dtype: Any) -> Any:
    """The dtype to compute in: float32, or wider if the input is."""
    return jnp.promote_types(dtype, jnp.float32)


def _real_array(x: Any, what: str) -> Array:
    """``x`` as a real (integer or floating) array (cast to :func:`_acc` inside the jitted
    kernels, not here: one compiled program per call, not one per operation)."""
    if is_lorax_leaf(x) or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise LoraxTypeError(f"{what} must be an array; got {type(x).__name__}")
    dtype = x.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise LoraxTypeError(f"{what} must be a real (floating) array; got dtype {dtype}")
    return jnp.asarray(x)


def _count(value: Any, what: str, *, low: int) -> int:
    """``value`` as an int >= ``low`` (no bools, no floats)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise LoraxTypeError(f"{what} must be an int >= {low}; got {type(value).__name__}")
    if value < low:
        raise LoraxValueError(f"{what} must be an int >= {low}; got {value!r}")
    return int(value)


def _spectrum(s: Any, what: str) -> Array:
    s = _real_array(s, what)
    if s.ndim < 1:
        raise LoraxValueError(f"{what} must have at least one axis (singular values); got ()")
    return s


def _lora_leaf(leaf: Any, what: str) -> LoraWeight:
    if not isinstance(leaf, LoraWeight):
        raise LoraxTypeError(
            f"{what} must be a lorax.LoraWeight; got {type(leaf).__name__} (for a dense "
            "update, e.g. W_ft - W_0, use lorax.analysis.dense_spectrum)"
        )
    leaf = unbox_leaf(leaf)[0]  # Flax partitioning boxes: read what they hold
    problem = leaf.misfit()
    if problem:
        raise LoraxValueError(f"{what}: {problem}")
    return leaf


def _factors(leaf: LoraWeight) -> tuple[Array, Array]:
    """``A`` as ``(*stack, m, r)`` and ``B.T`` as ``(*stack, n, r)`` matrices."""
    ns, r = leaf.stack_ndim, leaf.rank
    stack = tuple(leaf.a.shape[:ns])
    m, n = math.prod(leaf.a.shape[ns:-1]), math.prod(leaf.b.shape[ns + 1 :])
    acc = _acc(jnp.result_type(leaf.a.dtype, leaf.b.dtype))
    a = jnp.reshape(leaf.a, (*stack, m, r)).astype(acc)
    return a, _mT(jnp.reshape(leaf.b, (*stack, r, n)).astype(acc))


def _factor_svd(leaf: LoraWeight) -> tuple[Array, Array, Array]:
    """Thin SVD ``(u, s, vt)`` of ``scale * A @ B`` per layer, from the factors:
    ``A = Qa Ra``, ``B.T = Qb Rb``, so ``scale A B = Qa (scale Ra Rb^T) Qb^T`` and the SVD of
    the small core gives the whole. ``s`` has ``min(m, n, r)`` entries."""
    a, bt = _factors(leaf)
    qa, ra = jnp.linalg.qr(a)  # (.., m, p), (.., p, r), p = min(m, r)
    qb, rb = jnp.linalg.qr(bt)  # (.., n, q), (.., q, r), q = min(n, r)
    core = _mm(ra, _mT(rb)) * jnp.asarray(leaf.scale, ra.dtype)
    uc, s, vct = jnp.linalg.svd(core, full_matrices=False)
    return _mm(qa, uc), s, _mm(vct, _mT(qb))


def _factor_svdvals(leaf: LoraWeight) -> Array:
    """The singular values alone: only the R factors and the core's values are needed."""
    a, bt = _factors(leaf)
    ra, rb = jnp.linalg.qr(a, mode="r"), jnp.linalg.qr(bt, mode="r")
    core = _mm(ra, _mT(rb)) * jnp.asarray(leaf.scale, ra.dtype)
    return jnp.linalg.svd(core, compute_uv=False)


def _dense_layout(shape: tuple[int, ...], stack_ndim: Any, in_ndim: Any, what: str):
    ns = _count(stack_ndim, f"{what}: stack_ndim", low=0)
    ni = _count(in_ndim, f"{what}: in_ndim", low=1)
    if ns + ni >= len(shape):
        raise LoraxValueError(
            f"{what}: an update of shape {shape} has no output axis left after "
            f"stack_ndim={ns} stack and in_ndim={ni} input axes; expected "
            f"stack_ndim + in_ndim < {len(shape)}"
        )
    return ns, ni


def _as_matrices(x: Array, ns: int, ni: int) -> Array:
    """``(*stack, *in, *out)`` -> ``(*stack, m, n)``, in the accumulation dtype."""
    stack = tuple(x.shape[:ns])
    m = math.prod(x.shape[ns : ns + ni])
    return jnp.reshape(x, (*stack, m, math.prod(x.shape[ns + ni :]))).astype(_acc(x.dtype))


def _numerical_rank_mask(s: Array, m: int, n: int) -> Array:
    """True for the singular values above numpy's ``matrix_rank`` tolerance."""
    eps = jnp.finfo(s.dtype).eps
    tol = jnp.max(s, axis=-1, keepdims=True) * (max(m, n) * eps)
    return s > tol


def _amplify(u: Array, s: Array, vt: Array, w: Array, r: int | Array) -> Array:
    """``||dW||_F / ||U_r^T W V_r||_F`` from the thin SVD of dW (``r = 0``: its numerical
    rank); 0 for a zero update."""
    m, n = u.shape[-2], vt.shape[-1]
    top_r = jnp.broadcast_to(jnp.arange(s.shape[-1]) < r, s.shape)
    keep = jnp.where(r > 0, top_r, _numerical_rank_mask(s, m, n))
    proj = _mm(_mm(_mT(u), w), _mT(vt))  # (.., t, t)
    both = keep[..., :, None] & keep[..., None, :]
    den = jnp.sqrt(jnp.sum(jnp.where(both, proj * proj, 0), axis=(-2, -1)))
    num = jnp.sqrt(jnp.sum(s * s, axis=-1))
    safe = jnp.where(den > 0, den, 1)
    return jnp.where(num > 0, num / safe, 0)


def _padded(s: Array, r: int) -> Array:
    pad = r - s.shape[-1]
    return jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, pad)]) if pad else s


# Jitted kernels: each public call validates its arguments in Python, then runs one of these.


@jax.jit
def _lora_spectrum(leaf: LoraWeight) -> Array:
    return _padded(_factor_svdvals(leaf), leaf.rank)


@functools.partial(jax.jit, static_argnames=("ns", "ni"))
def _dense_svdvals(delta: Array, *, ns: int, ni: int) -> Array:
    return jnp.linalg.svd(_as_matrices(delta, ns, ni), compute_uv=False)


@jax.jit
def _lora_amplification(leaf: LoraWeight, w: Array, r: int | Array) -> Array:
    u, s, vt = _factor_svd(leaf)
    w = _as_matrices(w, leaf.stack_ndim, leaf.in_ndim)
    acc = jnp.promote_types(s.dtype, w.dtype)
    return _amplify(u.astype(acc), s.astype(acc), vt.astype(acc), w.astype(acc), r)


@functools.partial(jax.jit, static_argnames=("ns", "ni"))
def _dense_amplification(delta: Array, w: Array, r: int | Array, *, ns: int, ni: int) -> Array:
    u, s, vt = jnp.linalg.svd(_as_matrices(delta, ns, ni), full_matrices=False)
    w = _as_matrices(w, ns, ni)
    acc = jnp.promote_types(s.dtype, w.dtype)
    return _amplify(u.astype(acc), s.astype(acc), vt.astype(acc), w.astype(acc), r)


# ------------------------------------------------------------------------------ spectra


def delta_spectrum(leaf: LoraWeight) -> Array:
    """Singular values of a LoRA leaf's update ``scale * A @ B``, without forming it.

    ``A`` ``(*stack, *in_axes, r)`` and ``B`` ``(*stack, r, *out_axes)`` are read as
    matrices ``(m, r)`` and ``(r, n)`` per layer. With ``A = Qa Ra`` and ``B.T = Qb Rb``
    (thin QR), ``scale A B = Qa (scale Ra Rb^T) Qb^T``: the singular values are those of the
    small core, at ``O((m + n) r^2)`` instead of the dense update's ``O(m n r)``.

    Args:
      leaf: a :class:`lorax.LoraWeight` (its base is not read).

    Returns:
      float32 (or wider) singular values in descending order, shape ``(*stack, r)``; when
      ``r > min(m, n)`` the entries past ``min(m, n)`` are zero.

    Raises:
      LoraxTypeError: ``leaf`` is not a LoraWeight.
      LoraxValueError: its factors do not fit its base.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> leaf = lorax.LoraWeight(jnp.zeros((3, 16, 12)), jnp.ones((3, 16, 4)),
      ...                         jnp.ones((3, 4, 12)), scale=0.5)
      >>> s = lorax.analysis.delta_spectrum(leaf)   # 3 stacked layers of rank <= 4
      >>> s.shape, [round(float(x), 3) for x in s[0]]
      ((3, 4), [27.713, 0.0, 0.0, 0.0])
    """
    return _lora_spectrum(_lora_leaf(leaf, "lorax.analysis.delta_spectrum: leaf"))


def randomized_svd(
    m: Array, k: int, *, key: Array, oversample: int = 10, power_iters: int = 2
) -> tuple[Array, Array, Array]:
    """Top-``k`` SVD of a matrix by randomized subspace iteration (Halko et al. 2011, alg. 4.4).

    A Gaussian sketch ``m @ Omega`` of ``k + oversample`` columns, ``power_iters`` rounds of
    re-orthonormalized power iteration (each sharpens a decay ``s_i`` to ``s_i^(2q+1)``),
    then the exact SVD of the small projection ``Q^T m``. Leading axes are batch axes.

    Args:
      m: a real array ``(..., rows, cols)``.
      k: how many singular triplets, ``1 <= k <= min(rows, cols)``.
      key: a PRNG key for the sketch.
      oversample: extra sketch columns beyond ``k`` (Halko et al. suggest 5 to 10).
      power_iters: rounds of power iteration; more for slowly decaying spectra.

    Returns:
      ``(u, s, vt)`` with shapes ``(..., rows, k)``, ``(..., k)`` and ``(..., k, cols)``,
      ``s`` descending, so that ``u * s @ vt`` approximates ``m``.

    Raises:
      LoraxTypeError: ``m`` is not a real array, or ``key`` is not a PRNG key.
      LoraxValueError: ``m`` has fewer than 2 axes, or ``k`` is out of range.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> m = jnp.diag(2.0 ** -jnp.arange(20.0))
      >>> u, s, vt = lorax.analysis.randomized_svd(m, 3, key=jax.random.key(0))
      >>> u.shape, s.shape, vt.shape, [round(float(x), 4) for x in s]
      ((20, 3), (3,), (3, 20), [1.0, 0.5, 0.25])
    """
    what = "lorax.analysis.randomized_svd"
    m = _real_array(m, f"{what}: m")
    if m.ndim < 2:
        raise LoraxValueError(f"{what}: m must be a matrix (..., rows, cols); got {m.shape}")
    rows, cols = m.shape[-2:]
    k = positive_int(k, f"{what}: k")
    if k > min(rows, cols):
        raise LoraxValueError(
            f"{what}: k must be at most min(rows, cols) = {min(rows, cols)} for m of shape "
            f"{m.shape}; got {k}"
        )
    oversample = _count(oversample, f"{what}: oversample", low=0)
    power_iters = _count(power_iters, f"{what}: power_iters", low=0)
    check_key(key, f"{what}: key")
    return _randomized_svd(m, key, k=k, oversample=oversample, power_iters=power_iters)


@functools.partial(jax.jit, static_argnames=("k", "oversample"))
def _randomized_svd(
    m: Array, key: Array, *, k: int, oversample: int, power_iters: int | Array
) -> tuple[Array, Array, Array]:
    m = m.astype(_acc(m.dtype))
    rows, cols = m.shape[-2:]
    width = min(k + oversample, rows, cols)
    omega = jax.random.normal(key, (*m.shape[:-2], cols, width), m.dtype)
    q = jnp.linalg.qr(_mm(m, omega))[0]

    def power(_: Any, q: Array) -> Array:  # re-orthonormalized: no loss to round-off
        return jnp.linalg.qr(_mm(m, jnp.linalg.qr(_mm(_mT(m), q))[0]))[0]

    q = jax.lax.fori_loop(0, power_iters, power, q)
    ub, s, vt = jnp.linalg.svd(_mm(_mT(q), m), full_matrices=False)
    return _mm(q, ub)[..., :k], s[..., :k], vt[..., :k, :]


def dense_spectrum(
    delta: Array,
    *,
    stack_ndim: int = 0,
    in_ndim: int = 1,
    k: int | None = None,
    key: Array | None = None,
) -> Array:
    """Singular values of a dense update (e.g. ``W_ft - W_0``).

    Args:
      delta: the update, axes ``(*stack, *in_axes, *out_axes)``.
      stack_ndim: how many leading axes are layer-stack axes (batch axes of the result).
      in_ndim: how many axes after those are input axes (the matrix's rows); the rest are
        output axes (its columns).
      k: None for the exact SVD (all ``min(m, n)`` values), else only the top ``k`` by
        :func:`randomized_svd`.
      key: the PRNG key of the randomized SVD; required when ``k`` is given.

    Returns:
      float32 (or wider) singular values in descending order, shape ``(*stack, min(m, n))``
      or ``(*stack, k)``.

    Raises:
      LoraxTypeError: ``delta`` is not a real array, or ``key`` is not a PRNG key.
      LoraxValueError: the axis counts leave no output axis, ``k`` is out of range, or
        ``k`` is given without ``key``.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> w0 = jnp.ones((2, 8, 6))
      >>> w_ft = w0.at[:, 0, 0].add(3.0)          # a rank-1 change per layer
      >>> s = lorax.analysis.dense_spectrum(w_ft - w0, stack_ndim=1)
      >>> s.shape, [round(float(x), 3) for x in s[1]]
      ((2, 6), [3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    """
    what = "lorax.analysis.dense_spectrum"
    delta = _real_array(delta, f"{what}: delta")
    ns, ni = _dense_layout(tuple(delta.shape), stack_ndim, in_ndim, what)
    if k is None:
        if key is not None:
            raise LoraxValueError(f"{what}: key is only used with k (the randomized SVD)")
        return _dense_svdvals(delta, ns=ns, ni=ni)
    if key is None:
        raise LoraxValueError(f"{what}: k={k!r} needs key= (a PRNG key for the randomized SVD)")
    return randomized_svd(_as_matrices(delta, ns, ni), k, key=key)[1]


# ----------------------------------------------------------------------- spectrum summaries


def energy(s: Array, k: int) -> Array:
    """Fraction of the squared singular values (the update's squared Frobenius norm) that
    the top ``k`` hold: how well the best rank-``k`` approximation captures the update.

    Args:
      s: singular values ``(..., n)``, in any order (they are sorted here).
      k: how many of the largest to count, ``k >= 0`` (``k >= n`` gives 1).

    Returns:
      ``sum(top-k s^2) / sum(s^2)`` per row, shape ``s.shape[:-1]``, in ``[0, 1]``; 1 for
      an all-zero spectrum (a zero update has rank 0, which every ``k`` captures).

    Raises:
      LoraxTypeError: ``s`` is not a real array, or ``k`` not an int.
      LoraxValueError: ``s`` is a scalar, or ``k < 0``.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> round(float(lorax.analysis.energy(jnp.array([3.0, 4.0, 0.0]), 1)), 4)
      0.64
    """
    what = "lorax.analysis.energy"
    s = _spectrum(s, f"{what}: s")
    return _energy(s, min(_count(k, f"{what}: k", low=0), s.shape[-1]))


@jax.jit
def _energy(s: Array, k: int | Array) -> Array:
    s = s.astype(_acc(s.dtype))
    sq = jnp.sort(s * s, axis=-1)[..., ::-1]
    total = jnp.sum(sq, axis=-1)
    first_k = jnp.broadcast_to(jnp.arange(sq.shape[-1]) < k, sq.shape)
    top = jnp.sum(jnp.where(first_k, sq, 0), axis=-1)
    return jnp.where(total > 0, top / jnp.where(total > 0, total, 1), 1)


def effective_rank(s: Array) -> Array:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p = s / sum(s)``.

    It is between 1 and the number of nonzero values: ``j`` equal singular values give
    ``j``, a sharply decaying spectrum little more than 1.

    Args:
      s: non-negative singular values ``(..., n)``.

    Returns:
      The effective rank per row, shape ``s.shape[:-1]``; 0 for an all-zero spectrum.

    Raises:
      LoraxTypeError: ``s`` is not a real array.
      LoraxValueError: ``s`` is a scalar.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> [round(float(lorax.analysis.effective_rank(jnp.array(v))), 4)
      ...  for v in ([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0])]
      [3.0, 1.0]
    """
    return _effective_rank(_spectrum(s, "lorax.analysis.effective_rank: s"))


@jax.jit
def _effective_rank(s: Array) -> Array:
    s = s.astype(_acc(s.dtype))
    total = jnp.sum(s, axis=-1, keepdims=True)
    p = s / jnp.where(total > 0, total, 1)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0)
    return jnp.where(total[..., 0] > 0, jnp.exp(-jnp.sum(plogp, axis=-1)), 0)


# ------------------------------------------------------------------- subspace similarity


def _a_factor(x: Any, what: str) -> tuple[Array, tuple[int, ...]]:
    """A LoRA down factor and the shape ``(*stack, d, r)`` of its matrices."""
    if isinstance(x, LoraWeight):
        x = _lora_leaf(x, what)
        ns, r = x.stack_ndim, x.rank
        a = _real_array(x.a, f"{what}.a")
        return a, (*a.shape[:ns], math.prod(a.shape[ns:-1]), r)
    a = _real_array(x, what)
    if a.ndim < 2:
        raise LoraxValueError(
            f"{what} must be a LoRA down factor A (*in_axes, r) or a LoraWeight; got "
            f"shape {a.shape}"
        )
    return a, (math.prod(a.shape[:-1]), a.shape[-1])


def _factor_pair(a1: Any, a2: Any, what: str) -> tuple[Array, Array, dict[str, Any]]:
    x1, shape1 = _a_factor(a1, f"{what}: a1")
    x2, shape2 = _a_factor(a2, f"{what}: a2")
    if shape1[:-1] != shape2[:-1]:
        raise LoraxValueError(
            f"{what}: a1 and a2 must act on the same input space (same stack axes and input "
            f"size); got a1 as {shape1} and a2 as {shape2} (*stack, d, r)"
        )
    return x1, x2, {"shape1": shape1, "shape2": shape2}


def _left_bases(x1: Array, x2: Array, shape1: tuple, shape2: tuple) -> tuple[Array, Array]:
    """Left singular vectors of both factors (columns by descending singular value)."""
    m1 = jnp.reshape(x1, shape1).astype(_acc(x1.dtype))
    m2 = jnp.reshape(x2, shape2).astype(_acc(x2.dtype))
    u1 = jnp.linalg.svd(m1, full_matrices=False)[0]
    return u1, jnp.linalg.svd(m2, full_matrices=False)[0]


def subspace_similarity(a1: Any, a2: Any, i: int, j: int) -> Array:
    """The LoRA paper's normalized subspace similarity ``phi(A1, A2, i, j)`` (section 7.2):
    ``||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)``.

    The paper's ``A`` is ``(r, d)`` and it takes its *right* singular vectors; lorax's ``A``
    is ``(d, r)`` (``(*in_axes, r)``), so ``U`` here are the *left* singular vectors of
    lorax's ``A``: orthonormal bases of the input directions the adapter reads, ordered by
    singular value. 1 when the top-``i`` subspace contains the top-``j`` one (or the other
    way round), 0 when they are orthogonal.

    Args:
      a1: a LoRA down factor ``(*in_axes, r1)`` (every axis but the last is an input axis),
        or a :class:`lorax.LoraWeight`, whose stack axes are then batch axes.
      a2: the same for the other adapter, over the same input space.
      i: how many of ``a1``'s top singular directions, ``1 <= i <= min(d, r1)``.
      j: how many of ``a2``'s, ``1 <= j <= min(d, r2)``.

    Returns:
      ``phi`` in ``[0, 1]``, shape ``(*stack,)`` (a scalar for unstacked factors).

    Raises:
      LoraxTypeError: an argument of the wrong type.
      LoraxValueError: the factors act on different input spaces, or ``i``/``j`` are out
        of range.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> a8 = jnp.sin(jnp.arange(512.0) ** 2).reshape(64, 8)
      >>> a4 = a8[:, :4] @ jnp.triu(jnp.ones((4, 4)))   # another basis of part of a8's span
      >>> round(float(lorax.analysis.subspace_similarity(a8, a4, 8, 4)), 4)
      1.0
    """
    what = "lorax.analysis.subspace_similarity"
    x1, x2, shapes = _factor_pair(a1, a2, what)
    i = positive_int(i, f"{what}: i")
    j = positive_int(j, f"{what}: j")
    for name, v, (d, r) in (("i", i, shapes["shape1"][-2:]), ("j", j, shapes["shape2"][-2:])):
        if v > min(d, r):
            raise LoraxValueError(
                f"{what}: {name} must be at most {min(d, r)} (min(d, r) of "
                f"a{1 if name == 'i' else 2}); got {v}"
            )
    return _phi(x1, x2, i, j, **shapes)


@functools.partial(jax.jit, static_argnames=("shape1", "shape2"))
def _phi(x1: Array, x2: Array, i: Any, j: Any, *, shape1: tuple, shape2: tuple) -> Array:
    u1, u2 = _left_bases(x1, x2, shape1, shape2)
    overlap = _mm(_mT(u1), u2)
    rows = jnp.arange(overlap.shape[-2])[:, None] < i
    cols = jnp.arange(overlap.shape[-1])[None, :] < j
    top = jnp.where(jnp.broadcast_to(rows & cols, overlap.shape), overlap * overlap, 0)
    return jnp.sum(top, axis=(-2, -1)) / jnp.minimum(i, j).astype(top.dtype)


def similarity_grid(a1: Any, a2: Any) -> Array:
    """:func:`subspace_similarity` for every ``(i, j)`` at once, for a heatmap.

    Args:
      a1: a LoRA down factor ``(*in_axes, r1)`` or a :class:`lorax.LoraWeight`.
      a2: the same for the other adapter, over the same input space.

    Returns:
      ``grid[..., i - 1, j - 1] = phi(a1, a2, i, j)``, shape ``(*stack, r1, r2)`` (with
      ``min(d, r)`` in place of ``r`` for a factor of more columns than rows).

    Raises:
      LoraxTypeError: an argument of the wrong type.
      LoraxValueError: the factors act on different input spaces.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> a = jnp.sin(jnp.arange(128.0) ** 2).reshape(32, 4)
      >>> g = lorax.analysis.similarity_grid(a, a)
      >>> g.shape, [round(float(x), 4) for x in jnp.diagonal(g)]
      ((4, 4), [1.0, 1.0, 1.0, 1.0])
    """
    x1, x2, shapes = _factor_pair(a1, a2, "lorax.analysis.similarity_grid")
    return _grid(x1, x2, **shapes)


@functools.partial(jax.jit, static_argnames=("shape1", "shape2"))
def _grid(x1: Array, x2: Array, *, shape1: tuple, shape2: tuple) -> Array:
    u1, u2 = _left_bases(x1, x2, shape1, shape2)
    overlap = _mm(_mT(u1), u2)
    sums = jnp.cumsum(jnp.cumsum(overlap * overlap, axis=-2), axis=-1)
    t1, t2 = sums.shape[-2:]
    den = np.minimum.outer(np.arange(1, t1 + 1), np.arange(1, t2 + 1)).astype(np.float32)
    return sums / jnp.broadcast_to(jnp.asarray(den, sums.dtype), sums.shape)


# ------------------------------------------------------------------------- amplification


def amplification(
    delta: Any,
    w: Any,
    *,
    r: int | None = None,
    stack_ndim: int | None = None,
    in_ndim: int | None = None,
) -> Array:
    """The LoRA paper's amplification factor (section 7.3): ``||dW||_F / ||U^T W V||_F``,
    with ``U``, ``V`` the top-``r`` left and right singular vectors of the update ``dW``.

    The denominator is how much of ``W`` lies in the update's subspace; a large factor says
    the update amplifies directions that ``W`` holds only weakly (the paper finds about 21
    for ``r = 4`` on GPT-3's ``W_q``).

    Args:
      delta: the update: a :class:`lorax.LoraWeight` (its ``scale * A @ B``, whose SVD
        comes from the factors) or a dense array ``(*stack, *in_axes, *out_axes)``.
      w: the weight the update is added to (the pretrained ``W``), of the update's shape:
        an array, or a lorax leaf such as an NF4 base (dequantized here).
      r: how many singular directions of ``dW`` span the subspace; None for its numerical
        rank (values above numpy's ``matrix_rank`` tolerance), e.g. the LoRA rank.
      stack_ndim: stack axes of a dense ``delta`` (default 0); a LoraWeight knows its own.
      in_ndim: input axes of a dense ``delta`` (default 1); a LoraWeight knows its own.

    Returns:
      The factor per layer, shape ``(*stack,)``; 0 for a zero update.

    Raises:
      LoraxTypeError: an argument of the wrong type.
      LoraxValueError: ``w`` and ``delta`` differ in shape, or the axis counts do not fit.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> w = jnp.diag(jnp.array([10.0, 1.0, 1.0, 1.0]))
      >>> dw = jnp.zeros((4, 4)).at[3, 3].set(2.0)     # along a weak direction of w
      >>> float(lorax.analysis.amplification(dw, w, r=1))
      2.0
    """
    what = "lorax.analysis.amplification"
    w = _real_array(materialize(w), f"{what}: w")
    if r is not None:
        r = min(positive_int(r, f"{what}: r"), _INT_MAX)  # any r >= min(m, n) keeps all
    if isinstance(delta, LoraWeight):
        leaf = _lora_leaf(delta, f"{what}: delta")
        for name, given, own in (
            ("stack_ndim", stack_ndim, leaf.stack_ndim),
            ("in_ndim", in_ndim, leaf.in_ndim),
        ):
            if given is not None and given != own:
                raise LoraxValueError(
                    f"{what}: {name}={given!r} does not match the LoraWeight's own {own}"
                )
        _same_shape(tuple(leaf.shape), w, what)
        return _lora_amplification(leaf, w, r or 0)
    d = _real_array(delta, f"{what}: delta")
    ns, ni = _dense_layout(
        tuple(d.shape),
        0 if stack_ndim is None else stack_ndim,
        1 if in_ndim is None else in_ndim,
        what,
    )
    _same_shape(tuple(d.shape), w, what)
    return _dense_amplification(d, w, r or 0, ns=ns, ni=ni)


def _same_shape(shape: tuple[int, ...], w: Array, what: str) -> None:
    if tuple(w.shape) != shape:
        raise LoraxValueError(
            f"{what}: w must have the update's shape {shape}; got {tuple(w.shape)}"
        )


# ------------------------------------------------------------------------------ reports


def _stats(
    u: Array, s: Array, vt: Array, w: Array, ks: tuple[int, ...], r: int | Array
) -> dict[str, Array]:
    """One report entry's numbers from the thin SVD of the update (inside a jit)."""
    out = {f"energy@{k}": _energy(s, k) for k in ks}
    out["effective_rank"] = _effective_rank(s)
    acc = jnp.promote_types(s.dtype, w.dtype)
    out["amplification"] = _amplify(u.astype(acc), s.astype(acc), vt.astype(acc), w.astype(acc), r)
    out["norm"] = jnp.sqrt(jnp.sum(s * s, axis=-1))
    return out


@functools.partial(jax.jit, static_argnames="ks")
def _lora_stats(leaf: LoraWeight, r: int | Array, *, ks: tuple[int, ...]) -> dict[str, Array]:
    u, s, vt = _factor_svd(leaf)
    w = _as_matrices(materialize(leaf.base), leaf.stack_ndim, leaf.in_ndim)
    return {"spectrum": _padded(s, leaf.rank), **_stats(u, s, vt, w, ks, r)}


@functools.partial(jax.jit, static_argnames=("ns", "ni", "ks"))
def _dense_stats(
    tuned: Array, w0: Array, r: int | Array, *, ns: int, ni: int, ks: tuple[int, ...]
) -> dict[str, Array]:
    acc = jnp.promote_types(_acc(tuned.dtype), w0.dtype)
    delta = tuned.astype(acc) - w0.astype(acc)
    u, s, vt = jnp.linalg.svd(_as_matrices(delta, ns, ni), full_matrices=False)
    stats = _stats(u, s, vt, _as_matrices(w0.astype(acc), ns, ni), ks, r)
    return {"changed": jnp.any(delta != 0), "spectrum": s, **stats}


def _plain(stats: dict[str, Array]) -> dict[str, Any]:
    """Plain Python numbers (lists for stacked weights), in one transfer from the device."""
    return {name: np.asarray(v).tolist() for name, v in jax.device_get(stats).items()}


def _check_ks(k: Any) -> tuple[int, ...]:
    what = "lorax.analysis.update_report: k"
    if isinstance(k, (str, bytes)) or not isinstance(k, Sequence):
        raise LoraxTypeError(f"{what} must be a sequence of ints, e.g. (1, 2, 4); got {k!r}")
    return tuple(positive_int(x, what) for x in k)


def _is_dense_weight(path: str, x: Any) -> bool:
    return (
        not is_lorax_leaf(x)
        and isinstance(x, (jax.Array, np.ndarray))
        and x.ndim >= 2
        and jnp.issubdtype(x.dtype, jnp.floating)
        and is_weight_path(path)
    )


def update_report(
    tuned: Any,
    base: Any = None,
    *,
    k: Sequence[int] = (1, 2, 4, 8, 16),
    r: int | None = None,
) -> dict[str, dict[str, Any]]:
    """How low-rank each update of a fine-tuned tree is, per parameter path.

    Every :class:`lorax.LoraWeight` of ``tuned`` is analysed from its factors (its update
    ``scale * A @ B`` relative to its frozen base, dequantized for an NF4 base; for PiSSA /
    OLoRA leaves that base is the residual). When ``base`` is given, every dense floating
    weight of ``tuned`` with two or more axes (biases and norm scales aside) whose values
    differ from ``base``'s at the same path is analysed from the dense update
    ``tuned - base`` (full fine-tuning), its stack and input axes inferred as
    :func:`lorax.wrap` infers them. Other lorax leaves (DoRA, IA3, quantized ...) are left
    out. The dense SVDs are exact: cost grows as ``m n min(m, n)`` per weight.

    Args:
      tuned: the fine-tuned tree: a wrapped tree (``lorax.wrap``), a dense tree, or both.
      base: the tree ``tuned`` started from, for dense updates; None to analyse LoRA
        leaves only.
      k: the ranks at which to report :func:`energy`.
      r: the rank of :func:`amplification`'s subspace; None for each update's numerical
        rank (a trained LoRA leaf's rank).

    Returns:
      ``{path: entry}`` with paths as :func:`lorax.summary` writes them and each entry a
      dict of plain Python numbers: ``"spectrum"`` (a list, descending), ``"energy@k"`` for
      each ``k``, ``"effective_rank"``, ``"amplification"`` and ``"norm"`` (the update's
      Frobenius norm). For stacked weights (``nn.scan`` layers) each value is a list over
      the layers (the spectrum a list of lists).

    Raises:
      LoraxTypeError: ``k`` is not a sequence of ints.
      LoraxValueError: a weight of ``tuned`` is missing from ``base`` or has another shape
        there (the message names the path).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> a = jnp.sin(jnp.arange(64.0) ** 2).reshape(16, 4)
      >>> b = jnp.zeros((4, 8)).at[0].set(1.0)             # trained so far: a rank-1 update
      >>> lp = {"dense": {"kernel": lorax.LoraWeight(jnp.ones((16, 8)), a, b, scale=2.0)}}
      >>> entry = lorax.analysis.update_report(lp, k=(1, 2))["dense/kernel"]
      >>> sorted(entry), len(entry["spectrum"]), round(entry["energy@1"], 4)
      (['amplification', 'effective_rank', 'energy@1', 'energy@2', 'norm', 'spectrum'], 4, 1.0)
    """
    what = "lorax.analysis.update_report"
    ks = _check_ks(k)
    if r is not None:
        r = min(positive_int(r, f"{what}: r"), _INT_MAX)
    flat = FlatTree.of(tuned)
    base_leaves: dict[str, Any] | None = None
    if base is not None:
        bflat = FlatTree.of(base)
        base_leaves = dict(zip(bflat.paths, bflat.leaves, strict=True))
    siblings: dict[str, dict[str, Any]] = {}
    for path, leaf in zip(flat.paths, flat.leaves, strict=True):
        parent, _, name = path.rpartition("/")
        siblings.setdefault(parent, {})[name] = leaf

    report: dict[str, dict[str, Any]] = {}
    for path, leaf in zip(flat.paths, flat.leaves, strict=True):
        if isinstance(leaf, LoraWeight):
            leaf = _lora_leaf(leaf, f"{what}: the LoraWeight at {path!r}")
            report[path] = _plain(_lora_stats(leaf, r or 0, ks=ks))
            continue
        if base_leaves is None or not _is_dense_weight(path, leaf):
            continue
        if path not in base_leaves:
            raise LoraxValueError(
                f"{what}: tuned has a weight at {path!r} that base lacks; expected base to "
                "be the tree tuned started from"
            )
        w0 = materialize(base_leaves[path])
        if not hasattr(w0, "shape") or tuple(w0.shape) != tuple(leaf.shape):
            got = tuple(w0.shape) if hasattr(w0, "shape") else type(w0).__name__
            raise LoraxValueError(
                f"{what}: the weight at {path!r} is {tuple(leaf.shape)} in tuned but {got} "
                "in base; expected the same shape"
            )
        sib = siblings[path.rpartition("/")[0]]
        ns = infer_stack_axes(path, tuple(leaf.shape), sib)
        ni = infer_in_axes(tuple(leaf.shape), sib, ns)
        stats = _plain(
            _dense_stats(jnp.asarray(leaf), jnp.asarray(w0), r or 0, ns=ns, ni=ni, ks=ks)
        )
        if stats.pop("changed"):
            report[path] = stats
    return report
