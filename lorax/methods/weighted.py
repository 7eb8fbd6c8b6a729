"""Combining several LoRA adapters of one base into one, as peft's
``add_weighted_adapter``: "linear", "cat", "svd", and the task-arithmetic merges of
``lorax.methods.merging`` (TIES, DARE, magnitude pruning), on the factors or, in their
"_svd" forms, on the deltas."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorax._checks import check_key, is_real_scalar, positive_int
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.methods import merging
from lorax.methods.lora import LoraWeight
from lorax.paths import path_str

METHODS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # need density
_SIGNED = ("ties", "dare_ties")  # elect a sign: majority_sign_method
_RANDOM = ("dare_linear", "dare_ties")  # need key


def _task_method(method: str) -> str:
    """The task-arithmetic merge of a combination: "ties_svd" -> "ties", "svd" -> "linear"."""
    if method == "svd":
        return "linear"
    return method.removesuffix("_svd")


def _merge_fn(task: str, density: float | None, sign: str) -> Callable[..., jax.Array]:
    """``(tensors [n, ...], weights [n]) -> merged`` for a deterministic merge."""
    d = 1.0 if density is None else float(density)
    if task == "magnitude_prune":
        return lambda t, w: merging.magnitude_prune(t, w, density=d)
    if task == "ties":
        return lambda t, w: merging.ties(t, w, density=d, majority_sign_method=sign)
    return merging.task_arithmetic  # "linear", "svd" (and "cat", which merges nothing)


def _per_layer(
    tensors: jax.Array,
    weights: jax.Array,
    keep: jax.Array | None,
    *,
    task: str,
    density: float | None,
    sign: str,
) -> jax.Array:
    """One task-arithmetic merge on each layer: ``tensors`` is ``[n, layers, size]``;
    returns ``[layers, size]``. Magnitude pruning is per layer (vmapped), as peft's
    per-module merge. DARE is ``merging.dare_linear`` / ``dare_ties`` with its mask ``keep``
    drawn outside (``None`` at density 1): the entries kept and rescaled, then the linear
    sum or TIES without pruning."""
    if task in _RANDOM:
        if keep is not None:
            tensors = merging.rescale_kept(tensors, keep, 1.0 if density is None else density)
        task, density = ("linear" if task == "dare_linear" else "ties"), 1.0
    merge = _merge_fn(task, density, sign)
    return jax.vmap(lambda t: merge(t, weights), in_axes=1)(tensors)


_STATIC = ("task", "density", "sign")  # _per_layer's configuration


@functools.partial(jax.jit, static_argnames=("layers", *_STATIC))
def _merge_factors(
    factors: list[jax.Array],
    weights: jax.Array,
    keep: jax.Array | None,
    *,
    layers: int,
    **merge: Any,
) -> jax.Array:
    """One factor (all A's, or all B's, of one layout) merged per layer; in float32, cast
    back to the first factor's dtype. Jitted: one compilation per merge and shape."""
    t = jnp.stack([f.astype(jnp.float32) for f in factors]).reshape(len(factors), layers, -1)
    merged = _per_layer(t, weights, keep, **merge)
    return merged.reshape(factors[0].shape).astype(factors[0].dtype)


@functools.partial(
    jax.jit, static_argnames=("a_shape", "b_shape", "fan_in", "fan_out", "rank", *_STATIC)
)
def _merge_deltas(
    a: list[jax.Array],
    b: list[jax.Array],
    scales: jax.Array,
    weights: jax.Array,
    keep: jax.Array | None,
    *,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    rank: int,
    **merge: Any,
) -> tuple[jax.Array, jax.Array]:
    """The deltas ``s_i A_i B_i`` merged per layer, then each layer's best rank-``rank``
    approximation split evenly between the factors (shapes ``a_shape``, ``b_shape``)."""
    layers = math.prod(a_shape) // (fan_in * rank)
    deltas = jnp.stack(
        [
            scales[i]
            * jnp.matmul(
                ai.reshape((layers, fan_in, -1)).astype(jnp.float32),
                bi.reshape((layers, -1, fan_out)).astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
            for i, (ai, bi) in enumerate(zip(a, b, strict=True))
        ]
    )
    delta = _per_layer(deltas.reshape(len(a), layers, -1), weights, keep, **merge)
    u, s, vt = jnp.linalg.svd(delta.reshape(layers, fan_in, fan_out), full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    new_a = (u[..., :rank] * root[..., None, :]).reshape(a_shape)
    new_b = (root[..., :, None] * vt[..., :rank, :]).reshape(b_shape)
    return new_a.astype(a[0].dtype), new_b.astype(b[0].dtype)


def _keep(
    key: jax.Array | None, density: float | None, index: int, salt: int, shape: tuple[int, ...]
) -> jax.Array | None:
    """DARE's mask ``[n, layers, size]`` for one leaf (``index``) and tensor (``salt``: 0 for
    A, 1 for B, 2 for the deltas), from ``key`` folded with both; None without a key or at
    density 1 (nothing dropped, as peft). Drawn outside the merge's jit so that its
    compilation is shared by every merge of that shape."""
    if key is None or density is None or density >= 1:
        return None
    folded = jax.random.fold_in(jax.random.fold_in(key, index), salt)
    return merging.random_keep_mask(folded, density, shape)


def _layout(leaf: LoraWeight) -> tuple[int, int]:
    """(stack axes, input axes) of a LoRA leaf, read off its shapes."""
    stack = (leaf.a.ndim - 1) + (leaf.b.ndim - 1) - len(leaf.shape)
    return stack, leaf.a.ndim - 1 - stack


def _combine_leaf(
    path: str,
    leaves: Sequence[LoraWeight],
    weights: Sequence[float],
    method: str,
    rank: int | None,
    merge: dict[str, Any],
    key: jax.Array | None,
    index: int,
) -> LoraWeight:
    first = leaves[0]
    ns, ni = _layout(first)
    stack, ins = first.a.shape[:ns], first.a.shape[ns : ns + ni]
    outs = first.b.shape[ns + 1 :]
    layers = math.prod(stack)
    if method in ("linear", *_PRUNING):  # on A and B separately, as peft
        if len({leaf.rank for leaf in leaves}) != 1:
            raise LoraxValueError(
                f"lorax.add_weighted: {method!r} needs equal ranks; '{path}' has "
                f"{[leaf.rank for leaf in leaves]} (use 'cat' or 'svd')"
            )
        for field in ("a", "b"):
            shapes = {getattr(leaf, field).shape for leaf in leaves}
            if len(shapes) != 1:
                raise LoraxValueError(
                    f"lorax.add_weighted: '{path}' has {field} factors of shapes "
                    f"{sorted(shapes)}; {method!r} needs one layout"
                )
        # peft: c = sqrt(|w s|) on both factors, the sign of w s on A only
        ws = [w * leaf.scale for w, leaf in zip(weights, leaves, strict=True)]
        wb = [math.sqrt(abs(x)) for x in ws]
        wa = [c if x >= 0 else -c for c, x in zip(wb, ws, strict=True)]
        out = [
            _merge_factors(
                [getattr(leaf, field) for leaf in leaves],
                jnp.asarray(w, jnp.float32),
                _keep(key, merge["density"], index, salt, (len(leaves), layers, size // layers)),
                layers=layers,
                **merge,
            )
            for salt, field, w, size in ((0, "a", wa, first.a.size), (1, "b", wb, first.b.size))
        ]
        # peft casts both factors to A's dtype; we keep each factor's own
        return LoraWeight(first.base, out[0], out[1], scale=1.0)
    if method == "cat":  # exact: the ranks side by side, the weights folded into A
        a = jnp.concatenate(
            [w * leaf.scale * leaf.a for w, leaf in zip(weights, leaves, strict=True)], -1
        )
        b = jnp.concatenate([leaf.b for leaf in leaves], axis=ns)
        return LoraWeight(first.base, a.astype(first.a.dtype), b, scale=1.0)
    # svd family: merge the deltas s_i A_i B_i per layer, then the best rank-r approximation
    r = rank if rank is not None else max(leaf.rank for leaf in leaves)
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if not 1 <= r <= min(fan_in, fan_out):
        raise LoraxValueError(
            f"lorax.add_weighted: rank {r} for '{path}' must be in [1, {min(fan_in, fan_out)}]"
        )
    a, b = _merge_deltas(
        [leaf.a for leaf in leaves],
        [leaf.b for leaf in leaves],
        jnp.asarray([leaf.scale for leaf in leaves], jnp.float32),
        jnp.asarray(weights, jnp.float32),
        _keep(key, merge["density"], index, 2, (len(leaves), layers, fan_in * fan_out)),
        a_shape=stack + ins + (r,),
        b_shape=stack + (r,) + outs,
        fan_in=fan_in,
        fan_out=fan_out,
        rank=r,
        **merge,
    )
    return LoraWeight(first.base, a, b, scale=1.0)


def add_weighted(
    trees: Sequence[Any],
    weights: Sequence[float],
    /,
    *,
    combination: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str | None = None,
    key: jax.Array | None = None,
    method: str | None = None,
) -> Any:
    """One adapter from several LoRA adapters of the same base, as peft's
    ``add_weighted_adapter``.

    The combinations (peft's ``combination_type``, same names and semantics):

    - ``"cat"``: the factors side by side along the rank, the weights folded into A: exactly
      ``sum_i weights[i] * delta_i``, at the sum of the ranks.
    - ``"svd"``: the best rank-``rank`` approximation of that sum, per layer.
    - ``"linear"``: ``A = sum_i c_i A_i``, ``B = sum_i |c_i| B_i`` with
      ``c_i = sign(w_i s_i) sqrt(|w_i s_i|)`` (``s_i`` the scale; equal ranks). The delta
      ``A B`` has cross terms, so it is the weighted sum only for a single adapter.
    - ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as
      ``"linear"`` (the same ``c_i``, on A and on B separately), with the task-arithmetic
      merge of ``lorax.methods.merging`` in place of the sum: TIES prunes each factor to its
      ``density`` largest magnitudes, elects a sign per entry and averages the agreeing
      entries; DARE keeps each entry with probability ``density`` and rescales by
      ``1 / density``; ``magnitude_prune`` prunes, then sums.
    - ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
      ``"magnitude_prune_svd"``: that merge applied to the deltas ``s_i A_i B_i`` (weights
      ``w_i``) per layer, then the best rank-``rank`` approximation, as ``"svd"``.

    Pruning is per layer (each slice of a stacked leaf, as peft's per-module merge). The
    DARE combinations are random and need ``key``: each LoRA leaf, factor and layer draws
    from its own key folded from it, so the same key gives the same result. The pruning
    combinations need at least two trees (peft merges a single adapter with ``"linear"``,
    ignoring ``density``: ask for ``"linear"`` then). Only LoRA leaves are combined: a DoRA
    leaf (its magnitudes have no weighted combination; peft keeps a fresh adapter's
    magnitudes and drops the inputs'), IA3, bottleneck or unfrozen leaf is refused.

    Args:
      trees: wrapped trees over the same base, with LoRA leaves at the same paths.
      weights: one weight per tree (negative ones subtract).
      combination: one of ``lorax.methods.weighted.METHODS`` (above).
      rank: the rank for ``"svd"`` and the ``*_svd`` combinations (a positive int; default:
        the largest input rank).
      density: for the pruning combinations (and only them): the fraction of entries kept,
        in ``[0, 1]`` (``(0, 1]`` for DARE, which divides by it); 1 prunes nothing.
      majority_sign_method: for the TIES combinations (``ties``, ``dare_ties`` and their
        ``_svd`` forms): ``"total"`` (the default) or ``"frequency"``.
      key: for the DARE combinations (and only them): a PRNG key, ``jax.random.key(...)``.
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
      >>> t3 = lorax.wrap(w, rank=2, key=jax.random.key(3))
      >>> out = lorax.add_weighted(
      ...     [t1, t3], [1.0, 1.0], combination="dare_ties", density=0.5, key=jax.random.key(0)
      ... )
      >>> out["w"].a.shape, out["w"].b.shape
      ((8, 2), (2, 8))
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
    weights = [float(w) for w in weights]
    task = _task_method(method)
    svd = method == "svd" or method.endswith("_svd")
    if rank is not None:
        if not svd:  # would be ignored: say so rather than return another rank
            raise LoraxValueError(
                f"lorax.add_weighted: rank is only for combination='svd' and the '*_svd' "
                f"combinations; got rank={rank!r} with combination={method!r}"
            )
        rank = positive_int(rank, "lorax.add_weighted: rank")
    density = _check_density(density, method, task)
    sign = _check_sign_method(majority_sign_method, method, task)
    if task in _RANDOM:
        if key is None:
            raise LoraxValueError(
                f"lorax.add_weighted: combination={method!r} drops entries at random; pass "
                "key=jax.random.key(...) (the same key gives the same result)"
            )
        check_key(key, "lorax.add_weighted: key")
    elif key is not None:
        raise LoraxValueError(
            f"lorax.add_weighted: key is only for the DARE combinations {_RANDOM} and their "
            f"'_svd' forms; got a key with combination={method!r}"
        )
    if task in _PRUNING and len(trees) < 2:
        raise LoraxValueError(
            f"lorax.add_weighted: combination={method!r} merges two or more trees; got one "
            "(peft merges a single adapter with 'linear', ignoring density: pass "
            "combination='linear')"
        )
    if task in _RANDOM and density is not None and density >= 1:  # drops nothing, as peft
        task, density, key = (
            ("linear", None, None) if task == "dare_linear" else ("ties", 1.0, None)
        )
    merge = dict(task=task, density=density, sign=sign)  # _per_layer's static arguments
    flats = [jax.tree_util.tree_flatten_with_path(t, is_leaf=is_lorax_leaf) for t in trees]
    treedef = flats[0][1]
    for i, (_, other) in enumerate(flats[1:], 1):
        if other != treedef:
            raise LoraxValueError(
                f"lorax.add_weighted: tree {i} has another structure than tree 0 "
                "(LoRA leaves at other paths, or another base)"
            )
    out = []
    for index, column in enumerate(zip(*(flat for flat, _ in flats), strict=True)):
        path = path_str(column[0][0])
        leaves = [leaf for _, leaf in column]
        for i, leaf in enumerate(leaves):
            if is_lorax_leaf(leaf) and leaf.trainable_fields and type(leaf) is not LoraWeight:
                raise LoraxTypeError(
                    f"lorax.add_weighted: '{path}' is a {leaf.kind} leaf in tree {i}; only "
                    f"LoRA leaves are combined{_WHY_NOT.get(leaf.kind, '')} (lorax.merge "
                    "such trees and combine the dense weights instead)"
                )
        kinds = {type(leaf) for leaf in leaves}
        if kinds == {LoraWeight}:
            shapes = {tuple(leaf.shape) for leaf in leaves}
            if len(shapes) != 1:
                raise LoraxValueError(f"lorax.add_weighted: '{path}' has bases of shapes {shapes}")
            out.append(_combine_leaf(path, leaves, weights, method, rank, merge, key, index))
        elif LoraWeight in kinds:
            raise LoraxValueError(f"lorax.add_weighted: '{path}' is a LoRA leaf in some trees only")
        else:
            out.append(leaves[0])
    return jax.tree_util.tree_unflatten(treedef, out)


_WHY_NOT = {
    "dora": (
        ": a DoRA leaf's magnitudes have no weighted combination (peft's "
        "add_weighted_adapter keeps a fresh adapter's magnitudes and drops the inputs')"
    ),
}


def _check_density(density: Any, method: str, task: str) -> float | None:
    """``density`` as a float for the pruning combinations; refused elsewhere."""
    if task not in _PRUNING:
        if density is not None:  # would be ignored
            raise LoraxValueError(
                f"lorax.add_weighted: density is only for the pruning combinations (ties, "
                f"dare_*, magnitude_prune and their '_svd' forms); got density={density!r} "
                f"with combination={method!r}"
            )
        return None
    if density is None:
        raise LoraxValueError(
            f"lorax.add_weighted: combination={method!r} needs density= (the fraction of "
            "entries kept, in [0, 1])"
        )
    if not is_real_scalar(density):
        raise LoraxTypeError(
            f"lorax.add_weighted: density must be a real number; got "
            f"{type(density).__name__} {density!r}"
        )
    d = float(density)
    bound = "(0, 1]" if task in _RANDOM else "[0, 1]"
    if not (0.0 < d <= 1.0 if task in _RANDOM else 0.0 <= d <= 1.0):
        raise LoraxValueError(
            f"lorax.add_weighted: density for combination={method!r} must be in {bound}; "
            f"got {density!r}"
        )
    return d


def _check_sign_method(value: Any, method: str, task: str) -> str:
    """``majority_sign_method`` for the TIES combinations ("total" by default)."""
    if task not in _SIGNED:
        if value is not None:  # would be ignored
            raise LoraxValueError(
                f"lorax.add_weighted: majority_sign_method is only for the TIES combinations "
                f"(ties, dare_ties and their '_svd' forms); got {value!r} with "
                f"combination={method!r}"
            )
        return "total"
    if value is None:
        return "total"
    if value not in merging.SIGN_METHODS:
        raise LoraxValueError(
            f"lorax.add_weighted: majority_sign_method must be one of "
            f"{merging.SIGN_METHODS}; got {value!r}"
        )
    return value
