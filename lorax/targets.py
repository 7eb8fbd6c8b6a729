"""Which weights of a parameter tree get adapted, and how their axes split.

Targets (see ``lorax.wrap``) select leaves by their '/'-joined key path
(``params/h_0/attn/c_attn/kernel``): a regex matched in full, a list of names matching any
path component, a callable ``(path, leaf) -> bool | LoraSpec``, or None for the default
(every floating weight of rank >= 2 except embedding tables).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaves import LoraWeight, is_lorax_leaf

#: Path components that name embedding tables, which the default targets leave alone.
EMBEDDING_NAMES = re.compile(
    r"(embedding|embeddings|embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
    r"token_embedding|tok_embeddings)")


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


Targets = Union[None, str, Sequence[str], Callable[[str, Any], Union[bool, LoraSpec]]]


def key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined key path; nnx's trailing ``.value`` attribute is dropped."""
    names = [key_name(k) for k in path]
    if path and hasattr(path[-1], "name") and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


#: Leaf names that are never weights, whatever their rank (a DenseGeneral bias is 2-D, and
#: so is every bias or norm scale of an nn.scan'd layer stack).
NON_WEIGHT_NAMES = frozenset({"bias", "scale"})


def is_weight_path(path: str) -> bool:
    return path.rpartition("/")[2] not in NON_WEIGHT_NAMES


def is_floating_weight(leaf: Any) -> bool:
    """Floating, rank >= 2, not already a LoRA leaf: what LoRA can adapt."""
    if isinstance(leaf, LoraWeight):
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


def select(targets: Targets, paths: Sequence[str], leaves: Sequence[Any],
           default_excludes: re.Pattern = EMBEDDING_NAMES) -> dict[int, LoraSpec]:
    """Indices of the leaves that ``targets`` selects and can be adapted, with their spec.

    Raises:
      ValueError: if the targets select nothing adaptable (listing the paths that exist),
        a list name matches nothing, or a target explicitly selects a non-floating or
        non-array leaf of rank >= 2.
    """
    chosen: dict[int, LoraSpec] = {}
    if targets is None:
        for i, (p, leaf) in enumerate(zip(paths, leaves)):
            if is_floating_weight(leaf) and is_weight_path(p) and not any(
                    default_excludes.fullmatch(c) for c in p.split("/")):
                chosen[i] = LoraSpec()
        if not chosen:
            raise LoraxValueError(_nothing_matched("the default targets", paths, leaves))
        return chosen

    if isinstance(targets, str):
        pattern = compile_regex(targets, "lorax: targets")
        decide = lambda p, leaf: bool(pattern.fullmatch(p))  # noqa: E731
        what = f"the regex {targets!r}"
    elif callable(targets):
        decide, what = targets, f"the callable {getattr(targets, '__name__', targets)!r}"
    elif isinstance(targets, (list, tuple, set, frozenset)):
        names = list(targets)
        if not all(isinstance(n, str) for n in names):
            raise LoraxTypeError(f"lorax: targets must be module names (str); got {names!r}")
        unmatched = [n for n in names if not any(
            n in p.split("/") and is_weight_path(p)
            and (is_floating_weight(leaf) or isinstance(leaf, LoraWeight))
            for p, leaf in zip(paths, leaves))]
        if unmatched:
            raise LoraxValueError(_nothing_matched(f"the target names {unmatched!r}", paths,
                                                   leaves))
        decide = lambda p, leaf: any(n in p.split("/") for n in names)  # noqa: E731
        what = f"the target names {names!r}"
    else:
        raise LoraxTypeError("lorax: targets must be None, a regex string, a list of names or "
                             "a callable (path, leaf) -> bool | LoraSpec; got "
                             f"{type(targets).__name__}")

    for i, (p, leaf) in enumerate(zip(paths, leaves)):
        verdict = decide(p, leaf)
        if verdict is False or verdict is None:
            continue
        if isinstance(leaf, LoraWeight):
            raise LoraxValueError(f"lorax: '{p}' is already a LoRA leaf; merge it or target "
                                  "another weight.")
        is_array = is_lorax_leaf(leaf) or isinstance(leaf, (jax.Array, np.ndarray))
        if not is_array:
            raise LoraxTypeError(f"lorax: {what} selects '{p}', which is a "
                                 f"{type(leaf).__name__}, not an array; only floating weights "
                                 "can be adapted.")
        if len(leaf.shape) < 2 or not is_weight_path(p):
            continue  # biases, norm scales: left alone by design
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise LoraxTypeError(f"lorax: {what} selects '{p}', a {describe(leaf)} array; only "
                                 "floating weights can be adapted.")
        chosen[i] = verdict if isinstance(verdict, LoraSpec) else LoraSpec()
    if not chosen:
        raise LoraxValueError(_nothing_matched(what, paths, leaves))
    return chosen


def _nothing_matched(what: str, paths: Sequence[str], leaves: Sequence[Any]) -> str:
    ok = [is_floating_weight(l) and is_weight_path(p) for p, l in zip(paths, leaves)]
    adaptable = [f"  {p}  {describe(l)}" for p, l, k in zip(paths, leaves, ok) if k]
    others = [f"  {p}  {describe(l)}" for p, l, k in zip(paths, leaves, ok) if not k]
    lines = [f"lorax: {what} matched no adaptable weight (floating, rank >= 2).",
             "Adaptable weights in this tree:"] + (adaptable or ["  (none)"])
    if others:
        lines += ["Other leaves:"] + others[:50] + (["  ..."] if len(others) > 50 else [])
    return "\n".join(lines)


def pattern_matches(key: str, path: str, what: str = "lorax: pattern key") -> bool:
    """Whether a ``rank_pattern`` / ``alpha_pattern`` key names a component of ``path`` or
    matches it in full as a regex."""
    return key in path.split("/") or compile_regex(key, what).fullmatch(path) is not None


def pattern_value(patterns: Mapping[str, Any] | None, path: str, default: Any,
                  what: str = "lorax: pattern") -> Any:
    """The value of the first key in ``patterns`` that matches ``path`` in full or names one
    of its components (as peft's ``rank_pattern`` / ``alpha_pattern``)."""
    for key, value in (patterns or {}).items():
        if pattern_matches(key, path, f"{what} key"):
            return value
    return default


def infer_stack_axes(path: str, shape: Sequence[int], siblings: Mapping[str, Any]) -> int:
    """Leading layer axes of a kernel: one under a module flax named ``Scan*`` (nn.scan),
    else as many as make a sibling ``bias`` line up with the kernel's output axes."""
    if any(c.startswith("Scan") for c in path.split("/")[:-1]):
        return 1
    bias = siblings.get("bias")
    if bias is not None and hasattr(bias, "shape") and len(bias.shape) >= 2:
        bshape, nd = tuple(bias.shape), len(shape)
        for nb in range(0, min(len(bshape), nd - 2) + 1):
            n_out = len(bshape) - nb
            if bshape[:nb] == tuple(shape[:nb]) and bshape[nb:] == tuple(shape[nd - n_out:]):
                return nb
    return 0


def infer_in_axes(shape: Sequence[int], siblings: Mapping[str, Any], stack: int) -> int:
    """Input axes of a (per-layer) kernel: all but the bias's axes when a bias is there,
    else the split into input and output sizes closest to square."""
    per_layer = tuple(shape[stack:])
    if len(per_layer) == 2:
        return 1
    bias = siblings.get("bias")
    if bias is not None and hasattr(bias, "shape"):
        n_out = len(bias.shape) - stack
        if 1 <= n_out < len(per_layer) and tuple(bias.shape[stack:]) == per_layer[-n_out:]:
            return len(per_layer) - n_out
    logs = [math.log(max(s, 1)) for s in per_layer]
    return min(range(1, len(per_layer)),
               key=lambda p: (abs(sum(logs[:p]) - sum(logs[p:])), p))


@dataclasses.dataclass(frozen=True)
class FlatTree:
    """A tree flattened down to arrays and lorax leaves, with '/'-joined paths and, for each
    path, its siblings by name (what layout inference looks at)."""

    treedef: Any
    paths: list[str]
    leaves: list[Any]

    @classmethod
    def of(cls, tree: Any) -> "FlatTree":
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)
        return cls(treedef, [path_str(p) for p, _ in flat], [leaf for _, leaf in flat])

    def siblings(self, path: str) -> dict[str, Any]:
        parent = path.rpartition("/")[0]
        return {p.rpartition("/")[2]: leaf for p, leaf in zip(self.paths, self.leaves)
                if p.rpartition("/")[0] == parent}

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))


def stack_axes_for(stacked: Any, explicit: int | None, path: str) -> int | None:
    """The ``stacked=`` argument of wrap / quantize resolved for one path (None: infer)."""
    if explicit is not None:
        return explicit
    if stacked is None:
        return None
    if isinstance(stacked, (bool, np.bool_)):
        return int(stacked)
    if isinstance(stacked, numbers.Integral):
        return int(stacked)
    if isinstance(stacked, str):
        return 1 if compile_regex(stacked, "lorax: stacked").fullmatch(path) else 0
    raise LoraxTypeError(f"lorax: stacked must be None, an int or a regex; got {stacked!r}")


# --------------------------------------------------------------------------------------
# Argument checks shared by the functions that build wrapped trees
# --------------------------------------------------------------------------------------

def compile_regex(pattern: str, what: str) -> re.Pattern:
    """``re.compile(pattern)``; a bad regex is a lorax error naming the argument ``what``
    (e.g. ``"lorax.wrap: targets"``)."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise LoraxValueError(f"{what} {pattern!r} is not a valid regex: {err}") from None
    except TypeError:
        raise LoraxTypeError(f"{what} must be a regex string; got "
                             f"{type(pattern).__name__} {pattern!r}") from None


def positive_int(value: Any, what: str) -> int:
    """``value`` as an int >= 1: Python and numpy integers pass, bools and floats do not
    (a number of the wrong kind, e.g. 2.5, is a value error, as for any count)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise LoraxTypeError(f"{what} must be a positive int; got "
                             f"{type(value).__name__} {value!r}")
    if not isinstance(value, numbers.Integral) or value < 1:
        raise LoraxValueError(f"{what} must be a positive int; got {value!r}")
    return int(value)


def is_real_scalar(value: Any) -> bool:
    """A real number: Python / numpy ints and floats, or a 0-d int or float array; not a
    bool, a complex or a string."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    dtype = getattr(value, "dtype", None)
    return (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
            and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)))


def check_key(key: Any, what: str) -> None:
    """Refuses anything but one PRNG key: ``jax.random.key(...)``, or a legacy uint32[2]
    ``jax.random.PRNGKey(...)`` (uint32[4] under the rbg implementation)."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and shape is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            if tuple(shape) == ():
                return
        elif str(dtype) == "uint32" and tuple(shape) in ((2,), (4,)):
            return
        got = f"{dtype}{list(shape)}"
    else:
        got = f"{type(key).__name__} {key!r}"
    raise LoraxTypeError(f"{what} must be one PRNG key, jax.random.key(...) (or a legacy "
                         f"uint32[2] key from jax.random.PRNGKey(...)); got {got}")


def floating_dtype(dtype: Any, what: str, optional: bool = True) -> Any:
    """``dtype`` as a numpy dtype if it is a floating one (None passes through when
    ``optional``); anything else is a lorax error naming ``what``."""
    if dtype is None and optional:
        return None
    try:
        dt = None if dtype is None else jnp.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise LoraxTypeError(f"{what} must be a floating dtype (e.g. jnp.float32); "
                             f"got {dtype!r}")
    return dt
