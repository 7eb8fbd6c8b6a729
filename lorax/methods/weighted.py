"""Combining several LoRA adapters of one base into one, as peft's
``add_weighted_adapter``: "linear", "cat" and "svd"."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorax._checks import is_real_scalar, positive_int
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.methods.lora import LoraWeight
from lorax.paths import path_str

METHODS = ("linear", "cat", "svd")


def _layout(leaf: LoraWeight) -> tuple[int, int]:
    """(stack axes, input axes) of a LoRA leaf, read off its shapes."""
    stack = (leaf.a.ndim - 1) + (leaf.b.ndim - 1) - len(leaf.shape)
    return stack, leaf.a.ndim - 1 - stack


def _combine_leaf(
    path: str, leaves: Sequence[LoraWeight], weights: Sequence[float], method: str, rank: int | None
) -> LoraWeight:
    first = leaves[0]
    ns, ni = _layout(first)
    if method == "linear":
        if len({leaf.rank for leaf in leaves}) != 1:
            raise LoraxValueError(
                f"lorax.add_weighted: 'linear' needs equal ranks; '{path}' has "
                f"{[leaf.rank for leaf in leaves]} (use 'cat' or 'svd')"
            )
        if any(w * leaf.scale < 0 for w, leaf in zip(weights, leaves, strict=True)):
            raise LoraxValueError(
                "lorax.add_weighted: 'linear' scales both factors by "
                "sqrt(weight * scale); negative weights need 'cat' or 'svd'"
            )
        c = [math.sqrt(w * leaf.scale) for w, leaf in zip(weights, leaves, strict=True)]
        a = sum(ci * leaf.a for ci, leaf in zip(c, leaves, strict=True))
        b = sum(ci * leaf.b for ci, leaf in zip(c, leaves, strict=True))
        return LoraWeight(first.base, a, b, scale=1.0)
    if method == "cat":  # exact: the ranks side by side, the weights folded into A
        a = jnp.concatenate(
            [w * leaf.scale * leaf.a for w, leaf in zip(weights, leaves, strict=True)], -1
        )
        b = jnp.concatenate([leaf.b for leaf in leaves], axis=ns)
        return LoraWeight(first.base, a.astype(first.a.dtype), b, scale=1.0)
    # svd: the best rank-r approximation of the weighted sum of the deltas, per layer
    r = rank if rank is not None else max(leaf.rank for leaf in leaves)
    stack, ins = first.a.shape[:ns], first.a.shape[ns : ns + ni]
    outs = first.b.shape[ns + 1 :]
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if not 1 <= r <= min(fan_in, fan_out):
        raise LoraxValueError(
            f"lorax.add_weighted: rank {r} for '{path}' must be in [1, {min(fan_in, fan_out)}]"
        )
    delta = sum(
        w
        * leaf.scale
        * jnp.matmul(
            leaf.a.reshape(stack + (fan_in, leaf.rank)).astype(jnp.float32),
            leaf.b.reshape(stack + (leaf.rank, fan_out)).astype(jnp.float32),
        )
        for w, leaf in zip(weights, leaves, strict=True)
    )
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[..., :r])
    a = (u[..., :r] * root[..., None, :]).reshape(stack + ins + (r,))
    b = (root[..., :, None] * vt[..., :r, :]).reshape(stack + (r,) + outs)
    return LoraWeight(first.base, a.astype(first.a.dtype), b.astype(first.b.dtype), scale=1.0)


def add_weighted(
    trees: Sequence[Any],
    weights: Sequence[float],
    /,
    *,
    combination: str = "linear",
    rank: int | None = None,
    method: str | None = None,
) -> Any:
    """One adapter from several of the same base: ``sum_i weights[i] * delta_i``.

    Args:
      trees: wrapped trees over the same base, with LoRA leaves at the same paths.
      weights: one weight per tree.
      combination: (peft's ``combination_type``) ``"cat"`` concatenates the factors along
        the rank (exact, rank = sum of ranks); ``"svd"`` takes the best rank-``rank``
        approximation of the weighted sum of the deltas per layer (default rank: the
        largest input rank); ``"linear"`` adds the factors scaled by
        ``sqrt(weight * scale)`` (equal ranks), peft's definition: the delta is
        ``(sum c_i A_i)(sum c_i B_i)``, which has cross terms, so it equals the weighted sum
        of the deltas for a single adapter only; use "cat" for exactness.
      rank: the rank for ``"svd"`` (a positive int; only with ``"svd"``).
      method: the deprecated name of ``combination``; warns.

    Returns:
      A tree with the first tree's base and the combined LoRA leaves (scale 1).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> w = {"w": jnp.ones((8, 8))}
      >>> t1 = lorax.wrap(w, rank=2, key=jax.random.key(1))
      >>> t2 = lorax.wrap(w, rank=3, key=jax.random.key(2))
      >>> lorax.add_weighted([t1, t2], [0.5, 0.5], combination="cat")["w"].rank
      5
    """
    if method is not None:
        warnings.warn(
            "lorax.add_weighted: method= is deprecated; pass combination=",
            DeprecationWarning,
            stacklevel=2,
        )
        combination = method
    method = combination
    if method not in METHODS:
        raise LoraxValueError(
            f"lorax.add_weighted: combination must be one of {METHODS}; got {method!r}"
        )
    if not isinstance(trees, (list, tuple)):  # one tree (a dict) would combine its keys
        raise LoraxTypeError(
            f"lorax.add_weighted: trees must be a list of wrapped trees; got {type(trees).__name__}"
        )
    if not hasattr(weights, "__len__") or isinstance(weights, (str, bytes)):
        raise LoraxTypeError(
            f"lorax.add_weighted: weights must be a list of numbers, one per tree; got {weights!r}"
        )
    if len(trees) == 0 or len(trees) != len(weights):
        raise LoraxValueError(
            f"lorax.add_weighted: need one weight per tree; got {len(trees)} "
            f"trees and {len(weights)} weights"
        )
    for i, w in enumerate(weights):
        if not is_real_scalar(w):
            raise LoraxTypeError(
                f"lorax.add_weighted: weights[{i}] must be a real number; got "
                f"{type(w).__name__} {w!r}"
            )
        if not math.isfinite(float(w)):
            raise LoraxValueError(f"lorax.add_weighted: weights[{i}] must be finite; got {w!r}")
    if rank is not None:
        if method != "svd":  # would be ignored: say so rather than return another rank
            raise LoraxValueError(
                f"lorax.add_weighted: rank is only for combination='svd'; "
                f"got rank={rank!r} with combination={method!r}"
            )
        rank = positive_int(rank, "lorax.add_weighted: rank")
    flats = [jax.tree_util.tree_flatten_with_path(t, is_leaf=is_lorax_leaf) for t in trees]
    treedef = flats[0][1]
    for i, (_, other) in enumerate(flats[1:], 1):
        if other != treedef:
            raise LoraxValueError(
                f"lorax.add_weighted: tree {i} has another structure than tree 0 "
                "(LoRA leaves at other paths, or another base)"
            )
    out = []
    for column in zip(*(flat for flat, _ in flats), strict=True):
        path = path_str(column[0][0])
        leaves = [leaf for _, leaf in column]
        kinds = {type(leaf) for leaf in leaves}
        if kinds == {LoraWeight}:
            shapes = {tuple(leaf.shape) for leaf in leaves}
            if len(shapes) != 1:
                raise LoraxValueError(f"lorax.add_weighted: '{path}' has bases of shapes {shapes}")
            out.append(_combine_leaf(path, leaves, list(weights), method, rank))
        elif LoraWeight in kinds:
            raise LoraxValueError(f"lorax.add_weighted: '{path}' is a LoRA leaf in some trees only")
        elif any(is_lorax_leaf(leaf) and leaf.trainable_fields for leaf in leaves):
            kind = next(leaf.kind for leaf in leaves if is_lorax_leaf(leaf))
            raise LoraxValueError(
                f"lorax.add_weighted: '{path}' is a {kind} leaf; only LoRA "
                "leaves are combined (merge the others first)"
            )
        else:
            out.append(leaves[0])
    return jax.tree_util.tree_unflatten(treedef, out)
