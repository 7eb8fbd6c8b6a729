"""Task arithmetic for merging adapters: the pruning, sign election and disjoint merge of
TIES (Yadav et al. 2023) and DARE (Yu et al. 2024), as peft's ``utils/merge_utils.py``
defines them, in JAX.

A *task tensor* is one adapter's contribution to one weight (a LoRA factor, or a delta
``s * A @ B``). The merges take ``n`` task tensors of one shape stacked on axis 0 and one
weight per tensor:

- :func:`task_arithmetic`: ``sum_i w_i t_i``.
- :func:`magnitude_prune`: each ``t_i`` keeps its ``density`` fraction of largest
  magnitudes (:func:`prune_magnitude`), then ``sum_i w_i t_i``.
- :func:`ties`: prune by magnitude, elect a sign per entry (:func:`majority_sign_mask`),
  then average the weighted entries that agree with it (:func:`disjoint_merge`).
- :func:`dare_linear` / :func:`dare_ties`: as ``task_arithmetic`` / ``ties``, but each entry
  is kept with probability ``density`` and rescaled by ``1 / density``
  (:func:`prune_random`); random, so they take an explicit ``key``.

Pruning is over the whole of each task tensor (one layer's factor or delta):
``lorax.add_weighted`` maps these functions over the layers of a stacked leaf. Everything is
computed in float32; ``density`` is a Python float in ``[0, 1]`` (``>= 1`` prunes nothing, as
in peft) and must be ``> 0`` for the random prune, which divides by it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from lorax.errors import LoraxValueError

SIGN_METHODS = ("total", "frequency")


def prune_magnitude(x: ArrayLike, density: float) -> jax.Array:
    """Keeps the ``int(density * x.size)`` entries of ``x`` of largest magnitude, zeroes the
    rest (peft's ``magnitude_based_pruning``; ``density >= 1`` returns ``x``).

    Args:
      x: one task tensor, any shape.
      density: the fraction of entries to keep, in ``[0, 1]``.

    Returns:
      ``x`` with all but its largest-magnitude entries set to zero (float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.merging import prune_magnitude
      >>> prune_magnitude(jnp.array([0.5, -3.0, 1.0, 2.0]), 0.5)
      Array([ 0., -3.,  0.,  2.], dtype=float32)
    """
    x = jnp.asarray(x, jnp.float32)
    if density >= 1:
        return x
    _check_density(density, "prune_magnitude", positive=False)
    k = int(density * x.size)  # peft's count, to the same rounding
    return _keep_largest(x, k)


@jax.jit
def _keep_largest(x: jax.Array, k: Any) -> jax.Array:
    """``x`` with all but its ``k`` largest magnitudes zeroed (the first of equal ones kept,
    as ``top_k``). ``k`` is traced: one compilation per shape, whatever the density."""
    flat = x.reshape(-1)
    order = jnp.argsort(-jnp.abs(flat), stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return jnp.where(ranks < k, flat, 0.0).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("shape",))
def random_keep_mask(key: jax.Array, density: float, shape: tuple[int, ...]) -> jax.Array:
    """Which entries DARE keeps: independent Bernoulli(``density``) draws.

    Args:
      key: a PRNG key (``jax.random.key(...)``).
      density: the probability of keeping an entry, in ``(0, 1]``.
      shape: the shape of the mask.

    Returns:
      A bool array of ``shape``; the same key gives the same mask. Jitted with ``density``
      traced: one compilation per shape.

    Example:
      >>> import jax
      >>> from lorax.methods.merging import random_keep_mask
      >>> random_keep_mask(jax.random.key(0), 0.5, (2, 3)).shape
      (2, 3)
    """
    return jax.random.bernoulli(key, density, shape)


def rescale_kept(x: ArrayLike, keep: ArrayLike, density: float) -> jax.Array:
    """``x * keep / density``: the kept entries rescaled so the expectation is ``x``
    (peft's ``random_pruning`` with ``rescale=True``, given its mask).

    Args:
      x: one task tensor (or several stacked), any shape.
      keep: a bool (or 0/1) mask of ``x``'s shape.
      density: the probability with which ``keep`` was drawn, in ``(0, 1]``.

    Returns:
      The pruned and rescaled tensor, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.merging import rescale_kept
      >>> rescale_kept(jnp.array([1.0, 2.0]), jnp.array([True, False]), 0.5)
      Array([2., 0.], dtype=float32)
    """
    x = jnp.asarray(x, jnp.float32)
    return jnp.where(keep, x, 0.0) / jnp.float32(density)


def prune_random(
    x: ArrayLike, density: float, *, key: jax.Array, rescale: bool = True
) -> jax.Array:
    """DARE's drop: keeps each entry with probability ``density`` and (by default) divides
    the kept ones by ``density`` (peft's ``random_pruning``; ``density >= 1`` returns ``x``).

    Args:
      x: one task tensor (or several stacked: each entry is drawn independently), any shape.
      density: the probability of keeping an entry, in ``(0, 1]``.
      key: a PRNG key; the mask is ``random_keep_mask(key, density, x.shape)``.
      rescale: divide the kept entries by ``density``.

    Returns:
      The pruned tensor, float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lorax.methods.merging import prune_random
      >>> y = prune_random(jnp.ones(8), 0.5, key=jax.random.key(0))
      >>> bool(jnp.all((y == 0) | (y == 2)))
      True
    """
    x = jnp.asarray(x, jnp.float32)
    if density >= 1:
        return x
    _check_density(density, "prune_random", positive=True)
    keep = random_keep_mask(key, density, x.shape)
    return rescale_kept(x, keep, density) if rescale else jnp.where(keep, x, 0.0)


def majority_sign_mask(tensors: ArrayLike, method: str = "total") -> jax.Array:
    """TIES' sign election: per entry, the sign of the sum of the task tensors (``"total"``)
    or of their signs (``"frequency"``), ties going to ``+``; the mask says which entries of
    each tensor have the elected sign (peft's ``calculate_majority_sign_mask``).

    Args:
      tensors: ``n`` task tensors stacked on axis 0.
      method: ``"total"`` or ``"frequency"``.

    Returns:
      A bool array of ``tensors``' shape (zeros never agree).

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.merging import majority_sign_mask
      >>> t = jnp.array([[1.0, -1.0], [-3.0, -1.0], [1.0, 0.0]])
      >>> majority_sign_mask(t, "total").tolist(), majority_sign_mask(t, "frequency").tolist()
      ([[False, True], [True, True], [False, False]], [[True, True], [False, True], [True, False]])
    """
    if method not in SIGN_METHODS:
        raise LoraxValueError(
            f"lorax.methods.merging.majority_sign_mask: method must be one of {SIGN_METHODS}; "
            f"got {method!r}"
        )
    return _majority(jnp.asarray(tensors, jnp.float32), frequency=method == "frequency")


@functools.partial(jax.jit, static_argnames=("frequency",))
def _majority(tensors: jax.Array, *, frequency: bool) -> jax.Array:
    sign = jnp.sign(tensors)
    votes = sign.sum(0) if frequency else tensors.sum(0)
    return sign == jnp.where(votes >= 0, 1.0, -1.0)[None]


def disjoint_merge(tensors: ArrayLike, mask: ArrayLike) -> jax.Array:
    """The mean, per entry, of the task tensors where ``mask`` holds (0 where none does)
    (peft's ``disjoint_merge``).

    Args:
      tensors: ``n`` (weighted) task tensors stacked on axis 0.
      mask: bool, ``tensors``' shape (from :func:`majority_sign_mask`).

    Returns:
      One tensor of ``tensors.shape[1:]``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.merging import disjoint_merge
      >>> disjoint_merge(jnp.array([[2.0, 1.0], [4.0, 5.0]]), jnp.array([[1, 0], [1, 0]]) > 0)
      Array([3., 0.], dtype=float32)
    """
    return _disjoint_mean(jnp.asarray(tensors, jnp.float32), jnp.asarray(mask, bool))


@jax.jit
def _disjoint_mean(tensors: jax.Array, mask: jax.Array) -> jax.Array:
    kept = jnp.where(mask, tensors, 0.0).sum(0)
    return kept / jnp.maximum(mask.sum(0).astype(jnp.float32), 1.0)


def _weighted(tensors: jax.Array, weights: Any) -> jax.Array:
    """Each task tensor times its weight (weights reshaped to broadcast without promotion)."""
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != tensors.shape[:1]:
        raise LoraxValueError(
            f"lorax.methods.merging: need one weight per task tensor; got weights of shape "
            f"{w.shape} for {tensors.shape[0]} tensors"
        )
    return tensors * w.reshape(w.shape + (1,) * (tensors.ndim - 1))


def task_arithmetic(tensors: ArrayLike, weights: Any) -> jax.Array:
    """``sum_i weights[i] * tensors[i]`` (peft's ``task_arithmetic``).

    Args:
      tensors: ``n`` task tensors stacked on axis 0.
      weights: ``n`` weights.

    Returns:
      The merged tensor, ``tensors.shape[1:]``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.merging import task_arithmetic
      >>> task_arithmetic(jnp.array([[1.0, 2.0], [3.0, 4.0]]), [0.5, 1.0])
      Array([3.5, 5. ], dtype=float32)
    """
    return _weighted(jnp.asarray(tensors, jnp.float32), weights).sum(0)


def magnitude_prune(tensors: ArrayLike, weights: Any, *, density: float) -> jax.Array:
    """Each task tensor pruned to its ``density`` largest magnitudes, then the weighted sum
    (peft's ``magnitude_prune``).

    Args:
      tensors: ``n`` task tensors stacked on axis 0.
      weights: ``n`` weights.
      density: the fraction of each tensor's entries to keep, in ``[0, 1]``.

    Returns:
      The merged tensor, ``tensors.shape[1:]``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.merging import magnitude_prune
      >>> magnitude_prune(jnp.array([[1.0, 2.0], [4.0, 3.0]]), [1.0, 1.0], density=0.5)
      Array([4., 2.], dtype=float32)
    """
    pruned = jnp.stack([prune_magnitude(t, density) for t in jnp.asarray(tensors)])
    return task_arithmetic(pruned, weights)


def _ties_merge(pruned: jax.Array, weights: Any, majority_sign_method: str) -> jax.Array:
    mask = majority_sign_mask(pruned, majority_sign_method)  # elected on the unweighted
    return disjoint_merge(_weighted(pruned, weights), mask)


def ties(
    tensors: ArrayLike, weights: Any, *, density: float, majority_sign_method: str = "total"
) -> jax.Array:
    """TIES: prune each task tensor by magnitude, elect a sign per entry on the pruned
    tensors, and average the weighted entries of the elected sign (peft's ``ties``).

    Args:
      tensors: ``n`` task tensors stacked on axis 0.
      weights: ``n`` weights (applied after the election, as in peft).
      density: the fraction of each tensor's entries to keep, in ``[0, 1]``.
      majority_sign_method: ``"total"`` or ``"frequency"``.

    Returns:
      The merged tensor, ``tensors.shape[1:]``, float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.merging import ties
      >>> ties(jnp.array([[1.0, -2.0], [3.0, 1.0]]), [1.0, 1.0], density=1.0)
      Array([ 2., -2.], dtype=float32)
    """
    pruned = jnp.stack([prune_magnitude(t, density) for t in jnp.asarray(tensors)])
    return _ties_merge(pruned, weights, majority_sign_method)


def dare_linear(tensors: ArrayLike, weights: Any, *, density: float, key: jax.Array) -> jax.Array:
    """DARE: each entry of each task tensor kept with probability ``density`` and rescaled by
    ``1 / density``, then the weighted sum (peft's ``dare_linear``).

    Args:
      tensors: ``n`` task tensors stacked on axis 0.
      weights: ``n`` weights.
      density: the probability of keeping an entry, in ``(0, 1]``.
      key: a PRNG key; the mask is ``random_keep_mask(key, density, tensors.shape)``.

    Returns:
      The merged tensor, ``tensors.shape[1:]``, float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lorax.methods.merging import dare_linear
      >>> dare_linear(jnp.ones((2, 3)), [0.5, 0.5], density=1.0, key=jax.random.key(0))
      Array([1., 1., 1.], dtype=float32)
    """
    return task_arithmetic(prune_random(tensors, density, key=key), weights)


def dare_ties(
    tensors: ArrayLike,
    weights: Any,
    *,
    density: float,
    key: jax.Array,
    majority_sign_method: str = "total",
) -> jax.Array:
    """DARE's random prune and rescale, then TIES' sign election and disjoint merge (peft's
    ``dare_ties``).

    Args:
      tensors: ``n`` task tensors stacked on axis 0.
      weights: ``n`` weights.
      density: the probability of keeping an entry, in ``(0, 1]``.
      key: a PRNG key; the mask is ``random_keep_mask(key, density, tensors.shape)``.
      majority_sign_method: ``"total"`` or ``"frequency"``.

    Returns:
      The merged tensor, ``tensors.shape[1:]``, float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lorax.methods.merging import dare_ties
      >>> t = jnp.array([[1.0, -2.0], [3.0, 1.0]])
      >>> dare_ties(t, [1.0, 1.0], density=1.0, key=jax.random.key(0))
      Array([ 2., -2.], dtype=float32)
    """
    return _ties_merge(prune_random(tensors, density, key=key), weights, majority_sign_method)


def _check_density(density: float, where: str, *, positive: bool) -> None:
    low_ok = density > 0 if positive else density >= 0
    if not low_ok:
        bound = "(0, 1]" if positive else "[0, 1]"
        raise LoraxValueError(
            f"lorax.methods.merging.{where}: density must be in {bound}; got {density!r}"
        )
