"""``lorax.wrap``: replace the targeted weights of a parameter tree by LoRA leaves."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax._build import Site, build
from lorax._checks import (
    compile_regex,
    floating_dtype,
    is_real_scalar,
    positive_int,
    require_finite,
)
from lorax.errors import LoraxTiedWeightWarning, LoraxTypeError, LoraxValueError
from lorax.layout import infer_in_axes, infer_stack_axes, stack_axes_for
from lorax.leaf import is_lorax_leaf
from lorax.methods import lora_init
from lorax.methods.dora import dora_from_lora
from lorax.methods.lora import LoraWeight
from lorax.targets import Targets, from_function, pattern_matches

_INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")


def wrap(
    params: Any,
    /,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = None,
    key: jax.Array | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    rslora: bool = False,
    dtype: Any = None,
    init: str = "kaiming",
    stacked: Any = None,
    dora: bool = False,
    dropout: float = 0.0,
    method: str | None = None,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    loftq_iterations: int = 1,
) -> Any:
    """Returns ``params`` with the targeted weights replaced by :class:`LoraWeight` leaves.

    Each LoRA leaf keeps the original weight as its frozen base (never copied) and adds
    factors ``A`` (random) and ``B`` (zero), so the wrapped model starts equal to the base.

    Args:
      params: any pytree of arrays: linen ``params`` or ``{"params": ...}``, an
        ``nnx.State`` from ``nnx.split``, a plain dict; NF4 leaves from ``lorax.quantize``
        are adapted like dense weights (QLoRA).
      rank: LoRA rank ``r`` (>= 1 and <= min(in, out) of every adapted weight); a Python
        or numpy int.
      alpha: scaling numerator, a finite non-zero real number; the update is scaled by
        ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``). Default: ``rank``, i.e. a
        scale of 1 (rsLoRA: ``sqrt(r)``).
      targets: a regex matched in full against the '/'-joined path, a list of module names
        (path components), a callable ``(path, leaf) -> bool | LoraSpec``, the answer of
        :func:`lorax.find_targets` (its matmul and convolution weights), ``"all-linear"``
        with ``fn``, or None: with ``fn`` the weights it uses as matmul or convolution
        weights, else every floating weight of rank >= 2 except embedding tables, biases
        and norm scales (by name: ``bias``, ``b``, ``scale``, ``embedding``,
        ``input_embedding``, ``wte``, ...).
      key: PRNG key for the random ``A`` (``jax.random.key(...)`` or a legacy uint32[2]
        key), split per adapted weight. Default ``jax.random.key(0)``: two calls without a
        key give the same factors; pass one per run or per adapter you want to differ.
      rank_pattern: per-path rank overrides ``{name_or_regex: rank}``: a key applies to the
        adapted weights one of whose path components it is, or whose whole path it matches
        as a regex; the first key that applies wins, and a key that applies to no adapted
        weight is an error (a typo would otherwise go unnoticed).
      alpha_pattern: per-path alpha overrides ``{name_or_regex: alpha}``, as ``rank_pattern``.
      rslora: use rank-stabilized scaling ``alpha / sqrt(r)``.
      dtype: dtype of the factors; default the base's dtype promoted to at least float32.
      init: ``"kaiming"`` (``A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as peft),
        ``"gaussian"`` (``A ~ N(0, 1/r^2)``), or from the weight (see
        ``lorax/methods/lora_init.py``):
        ``"pissa"`` (top-r SVD, residual base), ``"olora"`` (QR, residual base),
        ``"loftq"`` (an NF4 base plus factors that cancel most of its quantization error).
      stacked: leading layer axes of the targeted kernels: an int for all, a regex of the
        paths that carry one, or None to infer (modules flax names ``Scan*``, or a bias
        with the same leading axis).
      dropout: LoRA dropout rate on the low-rank path's input (as peft's ``lora_dropout``);
        it is applied when the transformed function gets ``dropout_rng=key``.
      dora: :class:`lorax.DoraWeight` leaves (LoRA plus a magnitude per output feature,
        initialised to the base's norms), as peft's ``use_dora``.
      method: deprecated spelling of ``dora`` (``"lora"`` / ``"dora"``); warns.
      fn: the model, called as ``fn(params, *args)`` (e.g. ``model.apply`` when ``params``
        is ``{"params": ...}``): traced once, it chooses the targets by how it uses each
        weight (:func:`lorax.find_targets`), peft's ``"all-linear"`` decided by use.
      args: ``fn``'s example arguments after ``params`` (arrays or shape-dtype structs).
      loftq_iterations: with ``init="loftq"``, how many times LoftQ alternates quantizing
        the residual ``W - s A B`` and refitting ``A B`` to the quantization error (peft's
        ``LoftQConfig(loftq_iter=...)``; 1 by default, as peft).

    Returns:
      A tree of the same structure with :class:`LoraWeight` leaves where targeted.

    Raises:
      LoraxValueError, LoraxTypeError: on a bad argument (the message names it, and the path
        or pattern key it concerns).

    Tied weights: when the very same array object sits at several targeted paths (e.g.
    ``{"a": {"kernel": w}, "b": {"kernel": w}}``), each path gets its own independent
    adapter over the shared base, so the paths stop being tied as soon as the adapters
    train; a :class:`lorax.errors.LoraxTiedWeightWarning` names both paths. To keep them
    tied, target one of the paths and have the model reuse it.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
      >>> lp = lorax.wrap(params, rank=4, alpha=8, key=jax.random.key(0))
      >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
      ((16, 4), (4, 32))
    """
    if init not in _INITS:
        raise LoraxValueError(f"lorax.wrap: init must be one of {_INITS}; got {init!r}")
    loftq_iterations = positive_int(loftq_iterations, "lorax.wrap: loftq_iterations")
    if loftq_iterations != 1 and init != "loftq":
        raise LoraxValueError(
            f"lorax.wrap: loftq_iterations={loftq_iterations} applies to init='loftq' only; "
            f"got init={init!r}"
        )
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real):
        raise LoraxTypeError(f"lorax.wrap: dropout must be a number in [0, 1); got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraxValueError(f"lorax.wrap: dropout must be in [0, 1); got {dropout!r}")
    if method is not None:
        if method not in ("lora", "dora"):
            raise LoraxValueError(f"lorax.wrap: method must be 'lora' or 'dora'; got {method!r}")
        warnings.warn(
            "lorax.wrap: method= is deprecated; pass dora=True for DoRA (method="
            "'lora' is the default)",
            DeprecationWarning,
            stacklevel=2,
        )
        dora = dora or method == "dora"
    if not isinstance(dora, (bool, np.bool_)):
        raise LoraxTypeError(f"lorax.wrap: dora must be a bool; got {dora!r}")
    if not isinstance(rslora, (bool, np.bool_)):
        raise LoraxTypeError(f"lorax.wrap: rslora must be a bool; got {rslora!r}")
    dtype = floating_dtype(dtype, "lorax.wrap: dtype")
    if alpha is not None:
        check_alpha(alpha, "lorax.wrap: alpha")
    rank_pattern = _patterns(rank_pattern, "rank_pattern")
    alpha_pattern = _patterns(alpha_pattern, "alpha_pattern")

    def check(sites: list[Site]) -> None:
        adapted = [s.path for s in sites]
        for name, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            _check_pattern_keys(name, patterns, adapted)
        _warn_tied(sites)

    def make(site: Site) -> Any:
        path, spec = site.path, site.spec
        r = _resolve(spec.rank, rank_pattern, "rank", rank, path, positive_int)
        a_ = _resolve(spec.alpha, alpha_pattern, "alpha", alpha, path, check_alpha)
        leaf = make_lora_leaf(
            path,
            site.leaf,
            r,
            a_,
            site.key,
            siblings=site.siblings,
            rslora=rslora,
            dtype=dtype,
            init=init,
            loftq_iterations=loftq_iterations,
            in_axes=spec.in_axes,
            stack_axes=stack_axes_for(stacked, spec.stack_axes, path),
        )
        if dora:
            leaf = dora_from_lora(leaf)
        return leaf.replace(dropout=float(dropout)) if dropout else leaf

    targets = from_function(targets, params, fn, args, "lorax.wrap")
    return build(
        params,
        make,
        targets=targets,
        key=jax.random.key(0) if key is None else key,
        check=check,
        what="lorax.wrap",
    )


def check_alpha(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite, non-zero real number (an alpha of 0 would
    switch the adapter off for good: its gradients are zero too)."""
    if not is_real_scalar(value):
        raise LoraxTypeError(f"{what} must be a real number; got {type(value).__name__} {value!r}")
    alpha = float(value)
    if not math.isfinite(alpha) or alpha == 0:
        raise LoraxValueError(f"{what} must be finite and non-zero; got {value!r}")
    return alpha


def _patterns(patterns: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """A ``rank_pattern`` / ``alpha_pattern`` checked for type and valid regex keys."""
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise LoraxTypeError(
            f"lorax.wrap: {what} must be a dict {{name_or_regex: value}}; "
            f"got {type(patterns).__name__}"
        )
    for key in patterns:
        if not isinstance(key, str):
            raise LoraxTypeError(
                f"lorax.wrap: {what} keys must be names or regexes (str); got {key!r}"
            )
        compile_regex(key, f"lorax.wrap: {what} key")
    return dict(patterns)


def _check_pattern_keys(what: str, patterns: Mapping[str, Any], adapted: list[str]) -> None:
    for key in patterns:
        if not any(pattern_matches(key, p) for p in adapted):
            shown = ", ".join(f"'{p}'" for p in adapted[:20]) + (
                ", ..." if len(adapted) > 20 else ""
            )
            raise LoraxValueError(
                f"lorax.wrap: {what} key {key!r} matches none of the adapted weights (as a "
                f"path component or a regex matched in full); they are: {shown}"
            )


def _resolve(
    explicit: Any,
    patterns: Mapping[str, Any],
    what: str,
    default: Any,
    path: str,
    check: Callable[[Any, str], Any],
) -> Any:
    """A per-path rank / alpha (LoraSpec, else first matching pattern key, else the
    argument), checked with an error naming where it came from and the path."""
    if explicit is not None:
        return check(explicit, f"lorax.wrap: the LoraSpec {what} for '{path}'")
    for key, value in patterns.items():
        if pattern_matches(key, path):
            return check(value, f"lorax.wrap: {what}_pattern[{key!r}] for '{path}'")
    return default if default is None else check(default, f"lorax.wrap: {what} for '{path}'")


def _warn_tied(sites: list[Site]) -> None:
    """Warns when one array object is at several targeted paths (tied weights)."""
    first: dict[int, str] = {}
    for site in sites:
        path = site.path
        other = first.setdefault(id(site.leaf), path)
        if other != path:
            warnings.warn(
                f"lorax.wrap: '{other}' and '{path}' are the same array (tied "
                "weights); each gets its own adapter over the shared base, so they "
                "are no longer tied once trained. Target only one of them to keep "
                "them tied.",
                LoraxTiedWeightWarning,
                stacklevel=5,
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def make_lora_leaf(
    path: str,
    base: Any,
    rank: int,
    alpha: float | None,
    key: jax.Array,
    *,
    siblings: Mapping[str, Any] | None = None,
    rslora: bool = False,
    dtype: Any = None,
    init: str = "kaiming",
    loftq_iterations: int = 1,
    in_axes: int | None = None,
    stack_axes: int | None = None,
) -> LoraWeight:
    """One :class:`LoraWeight` over ``base`` (validated; errors name ``path``)."""
    siblings = siblings or {}
    shape = tuple(base.shape)
    rank = positive_int(rank, f"lorax.wrap: rank for '{path}'")
    ns = infer_stack_axes(path, shape, siblings) if stack_axes is None else stack_axes
    if not _is_int(ns) or not 0 <= ns <= len(shape) - 2:
        raise LoraxValueError(
            f"lorax.wrap: '{path}' of shape {shape} cannot have {ns} stack axes "
            "(at least two axes must remain)"
        )
    ni = infer_in_axes(shape, siblings, ns) if in_axes is None else in_axes
    if not _is_int(ni) or not 1 <= ni <= len(shape) - ns - 1:
        raise LoraxValueError(
            f"lorax.wrap: in_axes={ni} for '{path}' of shape {shape} (stack "
            f"axes {ns}) must leave at least one input and one output axis"
        )
    stack, ins, outs = shape[:ns], shape[ns : ns + ni], shape[ns + ni :]
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if rank > min(fan_in, fan_out):
        raise LoraxValueError(
            f"lorax.wrap: rank {rank} for '{path}' exceeds min(in, out) = "
            f"min({fan_in}, {fan_out}) of its weight {shape}"
        )
    alpha = float(rank) if alpha is None else check_alpha(alpha, f"lorax.wrap: alpha for '{path}'")
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    if dtype is None:
        dtype = jnp.promote_types(base.dtype, jnp.float32)
    if init in ("pissa", "olora", "loftq"):
        if is_lorax_leaf(base):
            raise LoraxTypeError(
                f"lorax.wrap: init={init!r} for '{path}' needs a dense base (it "
                "rewrites it); LoftQ quantizes a dense base itself"
            )
        # An SVD / QR of inf or NaN gives NaN factors, or never returns on some backends.
        require_finite(base, f"lorax.wrap: init={init!r} for '{path}'")
        if init == "loftq":
            return lora_init.loftq(base, rank, scale, ns, ni, dtype, loftq_iterations)
        make = {"pissa": lora_init.pissa, "olora": lora_init.olora}[init]
        return make(base, rank, scale, ns, ni, dtype)
    a_shape = stack + ins + (rank,)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    else:
        a = jax.random.normal(key, a_shape, dtype) / rank
    b = jnp.zeros(stack + (rank,) + outs, dtype)
    return LoraWeight(base=base, a=a, b=b, scale=scale)
