"""Which weights of a parameter tree get adapted, and how their axes split.

Targets (see ``lorax.wrap``) select leaves by their '/'-joined key path
(``params/h_0/attn/c_attn/kernel``): a regex matched in full, a list of names matching any
path component, a callable ``(path, leaf) -> bool | LoraSpec``, the ``{path: Usage}`` answer
of :func:`lorax.find_targets` (matmul and convolution weights, by how the model uses them),
or None for the default by name (every floating weight with two or more axes longer than 1,
except embedding tables, biases and norm scales, in the spellings of common libraries).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax._checks import compile_regex
from lorax.errors import LoraxAmbiguousTargetWarning, LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf

#: Path components that name embedding tables (or the modules holding them), which the
#: default targets leave alone: the spellings of flax / transformers-flax (``embedding``,
#: ``wte``, ``embed_tokens``), gemma (``embedder/input_embedding``), haiku / t5x
#: (``embeddings``, ``token_embedder``) and the like.
EMBEDDING_NAMES = re.compile(
    r"(embedding|embeddings|embedder|embed_tokens|embed_positions|wte|wpe|"
    r"word_embeddings|position_embeddings|token_type_embeddings|token_embedding|"
    r"token_embedder|tok_embeddings|input_embedding|pos_embedding|position_embedding|"
    r"embedding_table)"
)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Per-weight choices a target callable may return instead of ``True``.

    Attributes:
      rank: LoRA rank for this weight (default: ``wrap``'s ``rank`` / ``rank_pattern``).
      alpha: LoRA alpha for this weight (default: ``wrap``'s ``alpha`` / ``alpha_pattern``).
      in_axes: how many of the (per-layer) weight's leading axes are input axes, folded
        into ``A``; the rest are output axes, folded into ``B``. Default: inferred.
      stack_axes: how many leading axes are layer-stack axes (``nn.scan``). Default: inferred.
    """

    rank: int | None = None
    alpha: float | None = None
    in_axes: int | None = None
    stack_axes: int | None = None


Targets = None | str | Sequence[str] | Callable[[str, Any], bool | LoraSpec] | Mapping[str, Any]


#: Leaf names that are never weights, whatever their rank (a DenseGeneral bias is 2-D, and
#: so is every bias or norm scale of an nn.scan'd layer stack): flax's ``bias`` / ``scale``,
#: haiku's and gemma's ``b``, and the usual norm parameter spellings.
NON_WEIGHT_NAMES = frozenset(
    {"bias", "biases", "b", "scale", "scales", "gamma", "beta", "offset", "layer_norm_scale"}
)


def is_weight_path(path: str) -> bool:
    return path.rpartition("/")[2] not in NON_WEIGHT_NAMES


def is_floating_weight(leaf: Any) -> bool:
    """Floating, rank >= 2, not already a LoRA leaf: what LoRA can adapt."""
    if is_lorax_leaf(leaf) and leaf.trainable_fields:  # adapted already
        return False
    if not (is_lorax_leaf(leaf) or isinstance(leaf, (jax.Array, np.ndarray))):
        return False
    return len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def describe(leaf: Any) -> str:
    if is_lorax_leaf(leaf):
        return f"{type(leaf).__name__}{tuple(leaf.shape)}"
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}"
    return type(leaf).__name__


def select(
    targets: Targets,
    paths: Sequence[str],
    leaves: Sequence[Any],
    default_excludes: re.Pattern = EMBEDDING_NAMES,
) -> dict[int, LoraSpec]:
    """Indices of the leaves that ``targets`` selects and can be adapted, with their spec.

    Raises:
      ValueError: if the targets select nothing adaptable (listing the paths that exist),
        a list name matches nothing, or a target explicitly selects a non-floating or
        non-array leaf of rank >= 2.
    """
    chosen: dict[int, LoraSpec] = {}
    if targets is None:
        for i, (p, leaf) in enumerate(zip(paths, leaves, strict=True)):
            if (
                is_floating_weight(leaf)
                and is_weight_path(p)
                and sum(int(n) > 1 for n in leaf.shape) >= 2  # not a vector in disguise
                and not any(default_excludes.fullmatch(c) for c in p.split("/"))
            ):
                chosen[i] = LoraSpec()
        if not chosen:
            raise LoraxValueError(_nothing_matched("the default targets", paths, leaves))
        return chosen

    if isinstance(targets, Mapping):
        return _by_usage(targets, paths, leaves)
    if isinstance(targets, str):
        if targets == "all-linear":
            raise LoraxValueError(
                "lorax: targets='all-linear' chooses the weights by how the model uses them: "
                "pass fn= (e.g. model.apply) and args= (an example input) as well, or "
                "targets=lorax.find_targets(fn, params, *args); targets=None chooses by name"
            )
        pattern = compile_regex(targets, "lorax: targets")
        decide = lambda p, leaf: bool(pattern.fullmatch(p))  # noqa: E731
        what = f"the regex {targets!r}"
    elif callable(targets):
        decide, what = targets, f"the callable {getattr(targets, '__name__', targets)!r}"
    elif isinstance(targets, (list, tuple, set, frozenset)):
        names = list(targets)
        if not all(isinstance(n, str) for n in names):
            raise LoraxTypeError(f"lorax: targets must be module names (str); got {names!r}")
        unmatched = [
            n
            for n in names
            if not any(
                n in p.split("/")
                and is_weight_path(p)
                and (is_floating_weight(leaf) or is_lorax_leaf(leaf))
                for p, leaf in zip(paths, leaves, strict=True)
            )
        ]
        if unmatched:
            raise LoraxValueError(
                _nothing_matched(f"the target names {unmatched!r}", paths, leaves)
            )
        decide = lambda p, leaf: any(n in p.split("/") for n in names)  # noqa: E731
        what = f"the target names {names!r}"
    else:
        raise LoraxTypeError(
            "lorax: targets must be None, a regex string, a list of names or "
            "a callable (path, leaf) -> bool | LoraSpec; got "
            f"{type(targets).__name__}"
        )

    for i, (p, leaf) in enumerate(zip(paths, leaves, strict=True)):
        verdict = decide(p, leaf)
        if verdict is False or verdict is None:
            continue
        if is_lorax_leaf(leaf) and leaf.trainable_fields:
            raise LoraxValueError(
                f"lorax: '{p}' is already a LoRA leaf or another adapter "
                f"(kind {leaf.kind!r}); merge it or target another weight."
            )
        is_array = is_lorax_leaf(leaf) or isinstance(leaf, (jax.Array, np.ndarray))
        if not is_array:
            raise LoraxTypeError(
                f"lorax: {what} selects '{p}', which is a "
                f"{type(leaf).__name__}, not an array; only floating weights "
                "can be adapted."
            )
        if len(leaf.shape) < 2 or not is_weight_path(p):
            continue  # biases, norm scales: left alone by design
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise LoraxTypeError(
                f"lorax: {what} selects '{p}', a {describe(leaf)} array; only "
                "floating weights can be adapted."
            )
        chosen[i] = verdict if isinstance(verdict, LoraSpec) else LoraSpec()
    if not chosen:
        raise LoraxValueError(_nothing_matched(what, paths, leaves))
    return chosen


def from_function(
    targets: Targets, params: Any, fn: Callable | None, args: Sequence[Any], what: str
) -> Targets:
    """``targets`` as given, or, with ``fn``, the usage answer of ``fn(params, *args)``
    (for ``targets=None`` or ``"all-linear"``)."""
    if fn is None:
        if not isinstance(args, (tuple, list)) or args:
            raise LoraxValueError(f"{what}: args= is the example input of fn=; pass fn too")
        return targets
    if targets is not None and not (isinstance(targets, str) and targets == "all-linear"):
        raise LoraxValueError(
            f"{what}: fn= chooses the targets by use; pass targets=None or 'all-linear' "
            "with it, or filter lorax.find_targets(fn, params, *args) and pass that as "
            "targets"
        )
    if not isinstance(args, (tuple, list)):
        raise LoraxTypeError(
            f"{what}: args must be a tuple of fn's arguments after params; got "
            f"{type(args).__name__} (write args=(x,) for one)"
        )
    from lorax.usage import find_targets

    return find_targets(fn, params, *args)


def _by_usage(
    usage: Mapping[str, Any], paths: Sequence[str], leaves: Sequence[Any]
) -> dict[int, LoraSpec]:
    """The weights a :func:`lorax.find_targets` answer marks adaptable (matmul and conv
    weights), laid out as their uses showed; ambiguous ones are left out with a warning."""
    from lorax.usage import Usage

    bad = [p for p, u in usage.items() if not isinstance(u, Usage)]
    if bad:
        raise LoraxTypeError(
            f"lorax: targets given as a mapping must be lorax.find_targets' answer "
            f"{{path: Usage}}; the entry for {bad[0]!r} is a {type(usage[bad[0]]).__name__}"
        )
    index = {p: i for i, p in enumerate(paths)}
    stray = [p for p in usage if p not in index]
    if stray:
        raise LoraxValueError(
            f"lorax: targets name paths that this tree does not have: {stray[:5]} (was "
            "lorax.find_targets run on another tree?). Paths here: "
            f"{list(paths)[:10]}{' ...' if len(paths) > 10 else ''}"
        )
    mixed = [f"'{p}' ({', '.join(u.uses)})" for p, u in usage.items() if u.role == "mixed"]
    if mixed:
        warnings.warn(
            "lorax: these weights are matmul weights that the function also uses otherwise, "
            f"so they are not adapted: {'; '.join(mixed)}. Name them in targets to adapt "
            "them anyway (their other uses then see the dense weight).",
            LoraxAmbiguousTargetWarning,
            stacklevel=4,
        )
    chosen = {}
    for p, u in usage.items():
        leaf = leaves[index[p]]
        if u.adaptable and is_floating_weight(leaf):
            chosen[index[p]] = LoraSpec(in_axes=u.in_axes, stack_axes=u.stack_axes)
    if not chosen:
        roles = sorted({u.role for u in usage.values()})
        raise LoraxValueError(
            _nothing_matched(f"the usage targets (roles found: {roles})", paths, leaves)
        )
    return chosen


def _nothing_matched(what: str, paths: Sequence[str], leaves: Sequence[Any]) -> str:
    ok = [is_floating_weight(l) and is_weight_path(p) for p, l in zip(paths, leaves, strict=True)]
    adaptable = [f"  {p}  {describe(l)}" for p, l, k in zip(paths, leaves, ok, strict=True) if k]
    others = [f"  {p}  {describe(l)}" for p, l, k in zip(paths, leaves, ok, strict=True) if not k]
    lines = [
        f"lorax: {what} matched no adaptable weight (floating, rank >= 2).",
        "Adaptable weights in this tree:",
    ] + (adaptable or ["  (none)"])
    if others:
        lines += ["Other leaves:"] + others[:50] + (["  ..."] if len(others) > 50 else [])
    return "\n".join(lines)


def pattern_matches(key: str, path: str, what: str = "lorax: pattern key") -> bool:
    """Whether a ``rank_pattern`` / ``alpha_pattern`` key names a component of ``path`` or
    matches it in full as a regex."""
    return key in path.split("/") or compile_regex(key, what).fullmatch(path) is not None


def pattern_value(
    patterns: Mapping[str, Any] | None, path: str, default: Any, what: str = "lorax: pattern"
) -> Any:
    """The value of the first key in ``patterns`` that matches ``path`` in full or names one
    of its components (as peft's ``rank_pattern`` / ``alpha_pattern``)."""
    for key, value in (patterns or {}).items():
        if pattern_matches(key, path, f"{what} key"):
            return value
    return default
