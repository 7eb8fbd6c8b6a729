"""How a function uses each weight: trace it once and classify every parameter.

Names are a guess at what a weight is for (a library may call its biases ``b`` and its token
table ``input_embedding``); the function says for sure. :func:`find_targets` traces
``fn(params, *args)`` to a jaxpr, follows each parameter through the operations that only
move or view it (casts, transposes, slices, indexing, ``lax.scan`` over a layer stack,
``jit`` and ``remat`` bodies) and looks at what finally consumes it:

===============  ====================================================================
``linear``       an operand of ``dot_general`` (matmul, einsum, ``DenseGeneral``) or of
                 ``ragged_dot_general`` (grouped expert matmuls): what LoRA adapts
``conv``         the kernel of ``conv_general_dilated``: adapted too
``embedding``    rows gathered from it (a token table), even when it is also used as a
                 matmul weight (a tied output head): left alone, as peft does
``elementwise``  added or multiplied elementwise (a bias, a norm scale)
``other``        consumed by anything else (a reduction, a custom primitive)
``mixed``        a matmul weight that is also used otherwise: ambiguous, left out with a
                 warning naming the path and its uses
``unused``       never read by the function
===============  ====================================================================

The answer is a ``{path: Usage}`` mapping over the tree's arrays, in the paths ``lorax.wrap``
uses; pass it as ``targets=`` to any constructor (only ``linear`` and ``conv`` weights are
adapted, with the input and layer-stack axes the use showed), or filter it first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from lorax import _compat
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.paths import FlatTree

__all__ = ["Usage", "find_targets"]

ADAPTABLE_ROLES = ("linear", "conv")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Usage:
    """How a traced function uses one parameter.

    Attributes:
      role: ``"linear"``, ``"conv"``, ``"embedding"``, ``"elementwise"``, ``"other"``,
        ``"mixed"`` or ``"unused"`` (see ``lorax/usage.py``).
      uses: the primitives that consume it (after views), in the order first seen.
      in_axes: for a linear weight whose every product contracts the same leading (or
        trailing) group of its per-layer axes, the size of the group ``lorax.wrap`` folds
        into ``A``; None when the uses do not say (the layout is then inferred).
      stack_axes: leading axes sliced off before every use (``lax.scan`` over a layer stack,
        ``params[i]`` in a layer loop) or mapped over by it (per-head weights of a batched
        einsum, per-expert weights of ``ragged_dot``): one pair of LoRA factors per slice;
        None when the uses disagree.
    """

    role: str
    uses: tuple[str, ...] = ()
    in_axes: int | None = None
    stack_axes: int | None = None

    @property
    def adaptable(self) -> bool:
        """Whether LoRA adapts this weight by default (a matmul or convolution weight)."""
        return self.role in ADAPTABLE_ROLES


@dataclasses.dataclass(frozen=True)
class _View:
    """A value that is parameter ``index`` seen through views: for each of its axes, the
    parameter axis it runs along (None: unknown, e.g. after a reshape or a new axis), and
    the parameter axes consumed by indexing (scanned over or indexed away)."""

    index: int
    axes: tuple[int | None, ...]
    indexed: frozenset[int] = frozenset()

    def with_axes(self, axes: Iterable[int | None], indexed: Iterable[int] = ()) -> _View:
        return _View(self.index, tuple(axes), self.indexed | frozenset(indexed))


@dataclasses.dataclass(frozen=True)
class _Use:
    primitive: str
    kind: str  # linear | conv | gather | elementwise | other
    contracted: frozenset[int] | None = None  # parameter axes a product sums over
    indexed: frozenset[int] = frozenset()  # sliced off before, or batch axes of the product


# Consumers that keep every axis where it is (the value is the weight, seen otherwise).
_SAME_AXES = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "sharding_constraint",
        "reshard",
        "mesh_cast",
        "pvary",
        "reduce_precision",
        "optimization_barrier",
        "slice",
        "dynamic_slice",
        "rev",
    }
)
_ELEMENTWISE = frozenset(
    {
        "add",
        "add_any",
        "sub",
        "mul",
        "div",
        "max",
        "min",
        "neg",
        "pow",
        "integer_pow",
        "select_n",
        "exp",
        "tanh",
        "logistic",
        "abs",
        "sign",
        "sqrt",
        "rsqrt",
        "square",
    }
)


def find_targets(fn: Callable, params: Any, /, *args: Any, **kwargs: Any) -> dict[str, Usage]:
    """Classifies every array of ``params`` by how ``fn(params, *args, **kwargs)`` uses it.

    ``fn`` is traced once to a jaxpr (nothing is computed): peft's ``"all-linear"``, decided
    by use rather than by name, so a bias called ``b`` or a token table called
    ``input_embedding`` is never taken for a weight.

    Args:
      fn: called as ``fn(params, *args, **kwargs)``; e.g. ``model.apply`` with ``params``
        the variables ``{"params": ...}``, or ``lambda p, x: model.apply({"params": p}, x)``.
      params: the parameter tree (arrays, Flax boxes, lorax leaves such as NF4 bases).
      *args: the rest of ``fn``'s positional arguments (arrays or shape-dtype structs).
      **kwargs: its keyword arguments.

    Returns:
      ``{path: Usage}`` for every array and lorax leaf of ``params``, with the '/'-joined
      paths ``lorax.wrap`` uses. Pass it (or a filtered copy) as ``targets=`` to
      ``lorax.wrap`` / ``lorax.quantize`` / ``lorax.ia3`` / ...: the ``linear`` and
      ``conv`` weights are chosen.

    Raises:
      LoraxTypeError: ``fn`` is not callable. LoraxValueError: ``params`` holds no array.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> p = {"ffw": {"w": jnp.ones((8, 16)), "b": jnp.zeros((1, 1, 16))},
      ...      "input_embedding": jnp.ones((10, 8))}
      >>> def fn(p, ids):
      ...     h = p["input_embedding"][ids]
      ...     return h @ p["ffw"]["w"] + p["ffw"]["b"]
      >>> usage = lorax.find_targets(fn, p, jnp.zeros((2, 3), jnp.int32))
      >>> {path: u.role for path, u in usage.items()}
      {'ffw/b': 'elementwise', 'ffw/w': 'linear', 'input_embedding': 'embedding'}
      >>> lp = lorax.wrap(p, rank=2, targets=usage)
      >>> sorted(path for path, u in usage.items() if u.adaptable)
      ['ffw/w']
    """
    if not callable(fn):
        raise LoraxTypeError(
            f"lorax.find_targets: fn must be callable (e.g. model.apply); got "
            f"{type(fn).__name__} {fn!r}"
        )
    tree = FlatTree.of(params)
    inputs = [i for i, leaf in enumerate(tree.leaves) if _is_array(leaf)]
    if not inputs:
        raise LoraxValueError("lorax.find_targets: params holds no array to classify")

    def traced(*values: Any) -> Any:
        leaves = list(tree.leaves)
        for i, v in zip(inputs, values, strict=True):
            leaves[i] = v
        return fn(tree.rebuild(leaves), *args, **kwargs)

    avals = [jax.ShapeDtypeStruct(tree.leaves[i].shape, tree.leaves[i].dtype) for i in inputs]
    closed = jax.make_jaxpr(traced)(*avals)
    jaxpr, _ = _compat.open_jaxpr(closed)
    uses: dict[int, list[_Use]] = {i: [] for i in inputs}
    env = {
        v: [_View(i, tuple(range(len(tree.leaves[i].shape))))]
        for v, i in zip(jaxpr.invars, inputs, strict=True)
    }
    _walk(jaxpr, env, uses)
    return {
        tree.paths[i]: _classify(uses[i], len(tree.leaves[i].shape))
        for i in sorted(inputs, key=lambda i: tree.paths[i])
    }


def _is_array(x: Any) -> bool:
    if is_lorax_leaf(x):
        return x.has_dense_form
    return isinstance(x, (jax.Array, np.ndarray)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, np.generic)
    )


def _walk(jaxpr: Any, env: dict[Any, list[_View]], uses: dict[int, list[_Use]]) -> list:
    """Follows the views in ``env`` through ``jaxpr``, recording each consumer in ``uses``;
    returns the views that leave through its outputs."""

    def views(v: Any) -> list[_View]:
        return [] if isinstance(v, _compat.Literal) else env.get(v, [])

    for eqn in jaxpr.eqns:
        ins = [views(v) for v in eqn.invars]
        if not any(ins):
            continue
        outs = _through(eqn, ins, uses)
        for v, out in zip(eqn.outvars, outs, strict=True):
            if out:
                env[v] = out
    return [views(v) for v in jaxpr.outvars]


def _record(uses: dict[int, list[_Use]], vs: Sequence[_View], use: Callable[[_View], _Use]):
    for view in vs:
        uses[view.index].append(use(view))


def _through(eqn: Any, ins: list[list[_View]], uses: dict[int, list[_Use]]) -> list:
    """The views each output of ``eqn`` carries, recording the uses it makes of its inputs."""
    name, params = eqn.primitive.name, eqn.params
    n_out = len(eqn.outvars)
    none: list = [[] for _ in range(n_out)]

    if name in _SAME_AXES:
        return [list(ins[0])] + [[] for _ in range(n_out - 1)]
    if name == "transpose":
        perm = params["permutation"]
        return [[v.with_axes(v.axes[p] for p in perm) for v in ins[0]]]
    if name == "squeeze":
        dims = set(params["dimensions"])
        return [
            [
                v.with_axes(
                    (a for k, a in enumerate(v.axes) if k not in dims),
                    (v.axes[k] for k in dims if v.axes[k] is not None),
                )
                for v in ins[0]
            ]
        ]
    if name == "broadcast_in_dim":
        out_nd = len(params["shape"])
        placed = {d: k for k, d in enumerate(params["broadcast_dimensions"])}
        return [
            [
                v.with_axes(v.axes[placed[k]] if k in placed else None for k in range(out_nd))
                for v in ins[0]
            ]
        ]
    if name == "reshape":
        return [[_reshaped(v, eqn.invars[0].aval.shape, params["new_sizes"]) for v in ins[0]]]
    if name == "concatenate":
        return [[v for vs in ins for v in vs]]
    if name == "split":
        return [list(ins[0]) for _ in range(n_out)]
    if name == "gather":
        return _gather(eqn, ins, uses)
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        for vs, contract, batch in ((ins[0], lc, lb), (ins[1], rc, rb)):
            _record(uses, vs, lambda v, c=contract, b=batch: _product(v, name, "linear", c, b))
        return none
    if name == "ragged_dot_general":  # rhs: one weight per group (expert), as a layer stack
        rdn = params["ragged_dot_dimension_numbers"]
        (_, rc), (_, rb) = rdn.dot_dimension_numbers
        groups = (*rb, *rdn.rhs_group_dimensions)
        _record(uses, ins[0], lambda v: _Use(name, "other"))
        _record(uses, ins[1], lambda v: _product(v, name, "linear", rc, groups))
        _record(uses, ins[2], lambda v: _Use(name, "other"))
        return none
    if name == "conv_general_dilated":
        _record(uses, ins[0], lambda v: _Use(name, "other"))
        spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
        _record(uses, ins[1], lambda v: _product(v, name, "conv", spec[1:]))
        return none
    if name == "scan":
        return _scan(eqn, ins, uses)
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        carry = ins[nc + nb :]
        _sub(params["cond_jaxpr"], ins[:nc] + carry, uses)
        _sub(params["body_jaxpr"], ins[nc : nc + nb] + carry, uses)
        return none
    if name == "cond":
        for branch in params["branches"]:
            _sub(branch, ins[1:], uses)
        return none
    inner = _inner_jaxpr(eqn)
    if inner is not None:  # jit, remat, custom_jvp / custom_vjp calls, shard_map
        outs = _sub(inner, ins, uses)
        return outs if len(outs) == n_out else none
    kind = "elementwise" if name in _ELEMENTWISE else "other"
    for vs in ins:
        _record(uses, vs, lambda v: _Use(name, kind))
    return none


def _product(
    view: _View, name: str, kind: str, contract: Sequence[int], batch: Sequence[int] = ()
) -> _Use:
    """A product's use of a weight: the weight axes it contracts, and those it slices off
    before (or maps over as batch axes: per-head or per-expert weights, a layer stack)."""
    axes = [view.axes[int(c)] for c in contract]
    known = frozenset(a for a in axes if a is not None)
    known = known if len(known) == len(axes) else None
    mapped = frozenset(a for a in (view.axes[int(b)] for b in batch) if a is not None)
    return _Use(name, kind, known, view.indexed | mapped)


def _reshaped(view: _View, old: Sequence[int], new: Sequence[int]) -> _View:
    """A reshape that only adds or drops size-1 axes keeps the others' meaning."""
    kept = [a for a, s in zip(view.axes, old, strict=True) if s != 1]
    if [s for s in old if s != 1] != [s for s in new if s != 1]:
        return view.with_axes([None] * len(new))
    it = iter(kept)
    dropped = [a for a, s in zip(view.axes, old, strict=True) if s == 1 and a is not None]
    return view.with_axes((None if s == 1 else next(it) for s in new), dropped)


def _gather(eqn: Any, ins: list[list[_View]], uses: dict[int, list[_Use]]) -> list:
    """Rows looked up by an array of ids are an embedding use; a single index taken from a
    weight (``w[k]`` with a traced ``k``, indices of one entry) is a view of it."""
    dnums = eqn.params["dimension_numbers"]
    indices = eqn.invars[1].aval
    _record(uses, ins[1], lambda v: _Use("gather", "other"))
    if tuple(indices.shape[:-1]) == () or all(s == 1 for s in indices.shape[:-1]):
        collapsed = set(dnums.collapsed_slice_dims)
        out = []
        for v in ins[0]:
            kept = [a for k, a in enumerate(v.axes) if k not in collapsed]
            extra = len(eqn.outvars[0].aval.shape) - len(kept)
            if extra < 0:
                return [[]]
            out.append(
                v.with_axes([None] * extra + kept, (v.axes[k] for k in collapsed if v.axes[k]))
            )
        return [out]
    _record(uses, ins[0], lambda v: _Use("gather", "gather"))
    return [[]]


def _scan(eqn: Any, ins: list[list[_View]], uses: dict[int, list[_Use]]) -> list:
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    inner = list(ins[: n_consts + n_carry])
    for vs in ins[n_consts + n_carry :]:  # scanned over: the leading axis is a layer axis
        inner.append(
            [v.with_axes(v.axes[1:], [a for a in v.axes[:1] if a is not None]) for v in vs]
        )
    _sub(p["jaxpr"], inner, uses)
    return [[] for _ in eqn.outvars]


def _sub(closed_or_open: Any, ins: Sequence[list[_View]], uses: dict[int, list[_Use]]) -> list:
    jaxpr, _ = _compat.open_jaxpr(closed_or_open)
    if len(jaxpr.invars) != len(ins):
        raise LoraxValueError(  # a JAX change we do not know; better loud than wrong
            f"lorax.find_targets: an inner jaxpr has {len(jaxpr.invars)} inputs for "
            f"{len(ins)} operands"
        )
    env = {v: list(vs) for v, vs in zip(jaxpr.invars, ins, strict=True) if vs}
    return _walk(jaxpr, env, uses)


def _inner_jaxpr(eqn: Any) -> Any:
    """The body of a call-like equation whose inputs are the equation's own, or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if inner is None:
            continue
        jaxpr, _ = _compat.open_jaxpr(inner)
        if len(jaxpr.invars) == len(eqn.invars):
            return inner
    return None


def _classify(uses: list[_Use], ndim: int) -> Usage:
    names = tuple(dict.fromkeys(u.primitive for u in uses))
    kinds = {u.kind for u in uses}
    if not uses:
        return Usage(role="unused")
    if "gather" in kinds:
        return Usage(role="embedding", uses=names)
    products = [u for u in uses if u.kind in ADAPTABLE_ROLES]
    if not products:
        return Usage(role="elementwise" if kinds == {"elementwise"} else "other", uses=names)
    if len(products) < len(uses):
        return Usage(role="mixed", uses=names)
    role = "conv" if any(u.kind == "conv" for u in products) else "linear"
    stacks = {_leading(u.indexed) for u in products}
    stack = stacks.pop() if len(stacks) == 1 else None
    return Usage(role=role, uses=names, stack_axes=stack, in_axes=_in_axes(products, ndim, stack))


def _leading(axes: frozenset[int]) -> int | None:
    """How many leading axes ``axes`` are (None: not a leading group)."""
    return len(axes) if axes == frozenset(range(len(axes))) else None


def _in_axes(products: list[_Use], ndim: int, stack: int | None) -> int | None:
    if stack is None:
        return None
    per_layer = list(range(stack, ndim))
    answers = set()
    for u in products:
        if u.kind == "conv":  # LoRA's convolution: every axis but the output features
            answers.add(len(per_layer) - 1)
            continue
        c = u.contracted
        if c is None or not c or len(c) >= len(per_layer):
            return None
        if c == frozenset(per_layer[: len(c)]):
            answers.add(len(c))
        elif c == frozenset(per_layer[-len(c) :]):  # x @ W.T: the other group comes first
            answers.add(len(per_layer) - len(c))
        else:
            return None
    return answers.pop() if len(answers) == 1 else None
