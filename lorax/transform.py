"""``lorax.lora``: run an unmodified JAX function on a tree that holds lorax leaves.

How it works, in one sitting:

1. ``lora(fn)(*args, **kwargs)`` flattens the arguments. Each lorax leaf is stood in for by
   a ``ShapeDtypeStruct`` of the dense weight's shape and dtype, and ``fn`` is traced to a
   jaxpr with ``jax.make_jaxpr``: ``fn`` sees ordinary arrays and needs no change.
2. The jaxpr is evaluated by :func:`_eval_jaxpr`, a plain ``eval_jaxpr`` loop whose values
   are arrays or *lazy* lorax leaves. An equation with no lazy input is bound unchanged.
3. An equation with a lazy input is asked, in order: (a) the rule registered for its
   primitive in the rule table (``register_rule`` / ``using_rules``); (b) each lazy leaf's
   ``handle_primitive`` hook (``lorax/leaf.py``), through which a leaf kind computes
   ``dot_general``, ``conv_general_dilated``, ``gather``, casts, ``transpose`` and
   ``reshape`` (or any primitive it chooses) without forming its dense weight; (c) failing
   both, the leaf is densified. The table's built-in rules are structural: the call rules
   (``jit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``) evaluate the inner
   jaxpr in place; ``remat``, ``scan``, ``cond`` and ``while`` are rebuilt with
   ``jax.checkpoint`` / ``lax.scan`` / ``lax.switch`` / ``lax.while_loop``, the lazy leaves
   passed through as pytrees, so a stacked leaf is sliced per layer and remat keeps its
   policy. A rule or hook may return ``NotImplemented`` to pass to the next.
4. Densifying warns, naming the parameter path, the primitive and the source line
   (``strict=True`` raises instead); a leaf with no dense form raises.

The result is ordinary JAX operations, so ``jit``, ``grad``, ``vmap`` and sharding compose
with it, and the gradient with respect to a frozen base is never formed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax import _compat
from lorax._checks import check_key
from lorax.errors import LoraxError, LoraxTypeError, LoraxValueError, NotMergeableError
from lorax.leaf import LoraxLeaf, PrimitiveCall, is_lorax_leaf
from lorax.tree import holes

__all__ = [
    "lora",
    "register_rule",
    "using_rules",
    "RuleContext",
    "LoraxDensifyWarning",
    "LoraxDensifyError",
]


class LoraxDensifyWarning(UserWarning):
    """A lorax leaf was turned into its dense weight because no rule avoids it."""


class LoraxDensifyError(LoraxError, RuntimeError):
    """Raised instead of :class:`LoraxDensifyWarning` under ``lora(fn, strict=True)``."""


@dataclasses.dataclass(frozen=True)
class RuleContext:
    """What a rule gets besides the input values.

    Attributes:
      eqn: the jaxpr equation being evaluated.
      names: for each input, the parameter path of the lorax leaf it holds (or None).
      strict: whether densifying a leaf is an error.
    """

    eqn: Any
    names: tuple[str | None, ...]
    strict: bool
    outer_location: str = ""
    rng: Any = None  # the dropout key of the enclosing jaxpr (None: no dropout)
    index: int = 0  # this equation's position in it

    def key(self) -> Any:
        """A dropout key for this equation alone (None when no ``dropout_rng`` was given)."""
        return None if self.rng is None else jax.random.fold_in(self.rng, self.index)

    @property
    def location(self) -> str:
        """User source line of the equation, or of the call it sits in (jnp's own jits)."""
        return _compat.source_line(self.eqn) or self.outer_location or "<unknown location>"

    @property
    def params(self) -> dict[str, Any]:
        return self.eqn.params

    def bind(self, *invals: Any, **overrides: Any) -> list[Any]:
        """Applies the equation's primitive to plain arrays (params may be overridden)."""
        return _compat.bind_equation(self.eqn, invals, **overrides)

    def densify(self, invals: Sequence[Any]) -> list[Any]:
        """Materializes every lazy input, warning (or raising, if strict) for each."""
        out = []
        for value, name in zip(invals, self.names, strict=True):
            if is_lorax_leaf(value):
                if not value.has_dense_form:  # e.g. a bottleneck adapter
                    raise LoraxDensifyError(
                        f"lorax: primitive '{self.eqn.primitive.name}' at {self.location} "
                        f"needs the dense weight of the {value.kind} leaf at "
                        f"'{name or '<unknown path>'}', which has none: "
                        f"{_no_dense_reason(value)}"
                    )
                if not value.dense_is_free:  # e.g. lorax.Unfrozen is an array already
                    self._complain(value, name)
                value = value.materialize()
            out.append(value)
        return out

    def _complain(self, leaf: LoraxLeaf, name: str | None) -> None:
        prim = self.eqn.primitive.name
        msg = (
            f"lorax: primitive '{prim}' at {self.location} consumes the "
            f"{type(leaf).__name__} at '{name or '<unknown path>'}' and has no lorax rule "
            f"for it, so the dense weight {tuple(leaf.shape)} {leaf.dtype} is formed. "
            f"If the model means to use this weight so (e.g. elementwise), leave "
            f"'{name or '<unknown path>'}' out of the targets (lorax.wrap(..., targets=...)); "
            f"otherwise register a rule with lorax.register_rule('{prim}', rule)"
        )
        if self.strict:
            raise LoraxDensifyError(msg + ".")
        warnings.warn(
            msg + ", or pass strict=True to lorax.lora to make this an error.",
            LoraxDensifyWarning,
            stacklevel=2,
        )

    def eval_jaxpr(
        self,
        closed_or_open: Any,
        args: Sequence[Any],
        names: Sequence[str | None] | None = None,
        rng: Any = None,
    ) -> list[Any]:
        """Evaluates an inner jaxpr with the lorax interpreter (its dropout keys derive from
        ``rng``, by default this equation's key)."""
        jaxpr, consts = _compat.open_jaxpr(closed_or_open)
        names = tuple(names) if names is not None else (None,) * len(args)
        return _eval_jaxpr(
            jaxpr,
            consts,
            list(args),
            names,
            self.strict,
            self.location,
            self.key() if rng is None else rng,
        )


Rule = Callable[[RuleContext, list], Any]
# Keyed by Primitive object (a rule for a primitive of one's own) or by name (the built-in
# rules, whose primitives have other objects and names in other JAX releases).
_RULES: dict[Any, Rule] = {}


def _no_dense_reason(leaf: LoraxLeaf) -> str:
    try:
        leaf.materialize()
    except NotMergeableError as e:
        return str(e)
    return "its kind declares has_dense_form = False"


def _rule_key(primitive: Any, where: str) -> Any:
    """The table key of ``primitive``: its name (checked against JAX's) or the object."""
    if isinstance(primitive, str):
        known = _compat.known_primitives()
        if known and primitive not in known and primitive not in _RULES:
            close = difflib.get_close_matches(primitive, sorted(known), n=5)
            raise LoraxValueError(
                f"{where}: primitive {primitive!r} is not the name of a JAX "
                f"primitive (close: {close}); pass the Primitive object "
                "itself for a primitive of your own"
            )
        return primitive
    if isinstance(getattr(primitive, "name", None), str) and hasattr(primitive, "bind"):
        return primitive
    raise LoraxTypeError(
        f"{where}: primitive must be a jax.extend.core.Primitive or its name "
        f"(str); got {type(primitive).__name__} {primitive!r}"
    )


def _check_rule(rule: Any, where: str) -> None:
    if not callable(rule):
        raise LoraxTypeError(
            f"{where}: rule must be callable as rule(ctx, invals); got "
            f"{type(rule).__name__} {rule!r}"
        )


def register_rule(primitive: Any, rule: Rule) -> Rule:
    """Registers how ``lorax.lora`` evaluates ``primitive`` when a lorax leaf is an input.

    Args:
      primitive: a ``jax.extend.core.Primitive`` or the name of one that JAX knows
        (``"dot_general"``); pass the object itself for a primitive of your own.
      rule: ``rule(ctx, invals) -> value or list of values``, where ``invals`` mixes plain
        arrays and lorax leaves and ``ctx`` is a :class:`RuleContext`. It is asked before
        the leaves' own ``handle_primitive`` hooks; return ``NotImplemented`` to pass the
        equation on to them, or ``ctx.bind(*ctx.densify(invals))`` for the dense computation.
        The rule stays until the process ends; :func:`using_rules` scopes one to a block.

    Returns:
      ``rule``, so this can be used as a decorator factory's inner call.

    Raises:
      LoraxTypeError: ``rule`` is not callable, or ``primitive`` is neither a primitive nor
        a str. LoraxValueError: ``primitive`` names no primitive JAX knows (a typo would
        otherwise leave the rule unused).

    Example:
      >>> import lorax
      >>> def cumsum_rule(ctx, invals):
      ...     return ctx.bind(*ctx.densify(invals))
      >>> _ = lorax.register_rule("cumsum", cumsum_rule)
    """
    _check_rule(rule, "lorax.register_rule")
    _RULES[_rule_key(primitive, "lorax.register_rule")] = rule
    return rule


@contextlib.contextmanager
def using_rules(rules: Mapping[Any, Rule]) -> Iterator[None]:
    """Registers ``rules`` for the duration of a ``with`` block, then restores the table.

    What is traced inside the block uses them: call (or trace) the ``lorax.lora``-wrapped
    function inside it. Blocks nest; the table is global, so do not overlap blocks from
    several threads.

    Args:
      rules: ``{primitive: rule}``, each as for :func:`register_rule`.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((4, 4))}, rank=2)
      >>> f = lorax.lora(lambda p: jnp.cumsum(p["w"], axis=0))
      >>> seen = []
      >>> def cumsum_rule(ctx, invals):  # the dense weight, on purpose: no warning
      ...     seen.append(ctx.names)
      ...     return ctx.bind(*[lorax.merge(v) for v in invals])
      >>> with lorax.using_rules({"cumsum": cumsum_rule}):
      ...     _ = f(lp)
      >>> seen
      [('w',)]
    """
    entries = {}
    for primitive, rule in dict(rules).items():
        _check_rule(rule, "lorax.using_rules")
        entries[_rule_key(primitive, "lorax.using_rules")] = rule
    saved = {key: _RULES[key] for key in entries if key in _RULES}
    _RULES.update(entries)
    try:
        yield
    finally:
        for key in entries:
            _RULES.pop(key, None)
        _RULES.update(saved)


def lora(fn: Callable, /, *, strict: bool = False) -> Callable:
    """Transforms ``fn`` so that it accepts lorax leaves wherever it accepts arrays.

    Args:
      fn: any JAX-traceable function, e.g. a Flax ``model.apply``.
      strict: if True, a lorax leaf reaching a primitive without a lorax rule raises
        :class:`LoraxDensifyError` instead of being densified with a warning.

    Returns:
      A function with ``fn``'s signature. On arguments without lorax leaves it is ``fn``
      itself; otherwise it computes ``fn`` on the merged weights without merging them.
      It also takes a keyword ``dropout_rng``: a PRNG key (``jax.random.key(...)`` or a
      legacy uint32[2] key) that turns on the LoRA dropout of leaves wrapped with
      ``dropout > 0`` (training); without it there is no dropout.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, lorax
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
      >>> lp = lorax.wrap(params, rank=2, key=jax.random.key(1))
      >>> lorax.lora(model.apply)({"params": lp}, jnp.ones((3, 8))).shape
      (3, 4)
    """
    if not callable(fn):
        raise LoraxTypeError(
            f"lorax.lora: fn must be callable (e.g. model.apply); got {type(fn).__name__} {fn!r}"
        )
    if not isinstance(strict, (bool, np.bool_)):
        raise LoraxTypeError(f"lorax.lora: strict must be a bool; got {strict!r}")

    @functools.wraps(fn)
    def wrapped(*args: Any, dropout_rng: Any = None, **kwargs: Any) -> Any:
        if dropout_rng is not None:
            check_key(dropout_rng, "lorax.lora: dropout_rng")
        flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_lorax_leaf)
        if not any(is_lorax_leaf(leaf) for _, leaf in flat):
            return fn(*args, **kwargs)
        leaves = [_unboxed(leaf) for _, leaf in flat]
        dynamic = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]

        def flat_fn(*dyn_values):
            full = list(leaves)
            for i, v in zip(dynamic, dyn_values, strict=True):
                full[i] = v
            f_args, f_kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return fn(*f_args, **f_kwargs)

        try:
            avals = [
                jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype)
                if is_lorax_leaf(leaves[i])
                else leaves[i]
                for i in dynamic
            ]
        except AttributeError:  # e.g. no base: half of a split; say where, not 'NoneType'
            _refuse_halves(flat)
            raise
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        names = tuple(_path_name(flat[i][0]) if is_lorax_leaf(leaves[i]) else None for i in dynamic)
        jaxpr, consts = _compat.open_jaxpr(closed)
        values = [_freeze(leaves[i]) for i in dynamic]
        outs = _eval_jaxpr(jaxpr, consts, values, names, strict, "", dropout_rng)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def _unboxed(x: Any) -> Any:
    """A leaf whose fields are Flax boxes (``lorax.wrap`` of partitioned params) is
    unboxed as Flax unboxes a weight: with its sharding constraint when a mesh is set."""
    if not is_lorax_leaf(x):
        return x
    from lorax.sharding import unbox_leaf

    return unbox_leaf(x, constrain=True)[0]


def _refuse_halves(flat: Sequence[tuple[Any, Any]]) -> None:
    for path, leaf in flat:
        missing = holes(leaf) if is_lorax_leaf(leaf) else []
        if missing:
            raise LoraxValueError(
                f"lorax.lora: the {type(leaf).__name__} at '{_path_name(path)}' has no "
                f"{', '.join(repr(m) for m in missing)}: pass the whole tree, "
                "lorax.combine(trainable, frozen), not one half of lorax.split"
            )


def _freeze(x: Any) -> Any:
    """Stops gradients into a leaf's frozen fields: frozen means frozen, and a gradient
    taken over the whole wrapped tree is exactly zero there and never computed."""
    if not is_lorax_leaf(x):
        return x
    frozen = {
        name: jax.tree.map(jax.lax.stop_gradient, getattr(x, name)) for name in x.frozen_fields
    }
    return dataclasses.replace(x, **frozen)


def _is_dynamic(x: Any) -> bool:
    return is_lorax_leaf(x) or isinstance(x, (jax.Array, np.ndarray, np.generic))


def _path_name(path: Sequence[Any]) -> str:
    # Drop the (args, kwargs) and positional-index prefix: name what the user passed.
    parts = []
    for k in path[2:]:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(p for p in parts if p != "value")


def _eval_jaxpr(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    names: Sequence[str | None],
    strict: bool,
    where: str = "",
    rng: Any = None,
) -> list[Any]:
    env: dict[Any, Any] = {}
    lazy_names: dict[Any, str | None] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, _compat.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts, strict=True):
        env[v] = val
    for v, val, name in zip(jaxpr.invars, args, names, strict=True):
        env[v] = val
        if is_lorax_leaf(val):
            lazy_names[v] = name

    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        if not any(is_lorax_leaf(x) for x in invals):
            outvals = _compat.bind_equation(eqn, invals)
        else:
            in_names = tuple(
                lazy_names.get(v) if not isinstance(v, _compat.Literal) else None
                for v in eqn.invars
            )
            ctx = RuleContext(eqn, in_names, strict, where, rng, index)
            with _compat.equation_context(eqn):
                outvals = _evaluate(ctx, invals)
            first_name = next((n for n in in_names if n is not None), None)
            for v, out in zip(eqn.outvars, outvals, strict=True):
                if is_lorax_leaf(out):
                    lazy_names[v] = first_name
        for v, out in zip(eqn.outvars, outvals, strict=True):
            env[v] = out
    return [read(v) for v in jaxpr.outvars]


def _evaluate(ctx: RuleContext, invals: list) -> list:
    """One equation with a lazy input: the primitive's rule, then each lazy leaf's hook,
    then the dense computation. Returns the outputs as a list."""
    prim = ctx.eqn.primitive
    rule = _RULES.get(prim) or _RULES.get(prim.name)
    if rule is not None:
        out = rule(ctx, invals)
        if out is not NotImplemented:
            return _as_list(ctx, out, f"the rule for '{prim.name}'")
    avals = tuple(v.aval for v in ctx.eqn.outvars)
    for position, leaf in enumerate(invals):
        if not is_lorax_leaf(leaf):
            continue
        call = PrimitiveCall(
            prim, ctx.params, tuple(invals), position, avals, bind=ctx.bind, key=ctx.key
        )
        out = leaf.handle_primitive(call)
        if out is not NotImplemented:
            who = f"the {leaf.kind} leaf at '{ctx.names[position] or '<unknown path>'}'"
            return _conform(_as_list(ctx, out, who), avals, who, prim.name)
    return _densify_rule(ctx, invals)


def _as_list(ctx: RuleContext, out: Any, who: str) -> list:
    outs = list(out) if ctx.eqn.primitive.multiple_results else [out]
    if len(outs) != len(ctx.eqn.outvars):
        raise LoraxError(
            f"lorax: {who} returned {len(outs)} value(s) for primitive "
            f"'{ctx.eqn.primitive.name}', which has {len(ctx.eqn.outvars)}"
        )
    return outs


def _conform(outs: list, avals: Sequence[Any], who: str, prim: str) -> list:
    """A leaf's results must stand for what the primitive gives: same shapes; arrays are
    cast to the declared dtype (a leaf may compute in a wider one), leaves must match it."""
    fixed = []
    for out, aval in zip(outs, avals, strict=True):
        shape = tuple(getattr(out, "shape", ()))
        if shape != tuple(aval.shape):
            raise LoraxError(
                f"lorax: {who} computed '{prim}' as shape {shape}; the primitive "
                f"gives {tuple(aval.shape)} (a bug in the leaf kind)"
            )
        if is_lorax_leaf(out):
            if jnp.dtype(out.dtype) != jnp.dtype(aval.dtype):
                raise LoraxError(
                    f"lorax: {who} computed '{prim}' as a {out.dtype} leaf; the "
                    f"primitive gives {aval.dtype} (a bug in the leaf kind)"
                )
        elif hasattr(out, "dtype") and out.dtype != aval.dtype:
            out = out.astype(aval.dtype)
        fixed.append(out)
    return fixed


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------


def _densify_rule(ctx: RuleContext, invals: list) -> list:
    return ctx.bind(*ctx.densify(invals))


def _call_rule(jaxpr_param: str) -> Rule:
    """jit / closed_call / custom_jvp_call / custom_vjp_call: evaluate the body in place.

    A custom derivative rule is written for dense inputs, so with a lazy leaf inside the
    call its primal computation is differentiated instead (the same function).
    """

    def rule(ctx: RuleContext, invals: list) -> list:
        return ctx.eval_jaxpr(ctx.params[jaxpr_param], invals, ctx.names)

    return rule


def _remat_rule(ctx: RuleContext, invals: list) -> list:
    body = ctx.params["jaxpr"]
    names = ctx.names

    def inner(*args):
        return _densify_outputs(ctx, ctx.eval_jaxpr(body, args, names))

    return list(
        jax.checkpoint(
            inner, prevent_cse=ctx.params.get("prevent_cse", True), policy=ctx.params.get("policy")
        )(*invals)
    )


def _densify_outputs(ctx: RuleContext, outs: list) -> list:
    """Values leaving a control-flow body must be arrays of the declared type."""
    return [ctx.densify([o])[0] if is_lorax_leaf(o) else o for o in outs]


def _scan_rule(ctx: RuleContext, invals: list) -> list:
    p = ctx.params
    consts, carry, xs = _compat.scan_operands(p, invals)
    n_consts, n_carry = len(consts), len(carry)
    names = ctx.names
    carry = [ctx.densify([c])[0] if is_lorax_leaf(c) else c for c in carry]
    # A leaf scanned over must have a stack axis to slice; otherwise densify it.
    xs = [
        _densify_single(ctx, x, names[n_consts + n_carry + i])
        if is_lorax_leaf(x) and x.stack_ndim < 1
        else x
        for i, x in enumerate(xs)
    ]

    key = ctx.key()
    counted = key is not None  # per-iteration dropout keys need the iteration number

    def body(carry, x):
        step, carry = (carry[0], carry[1:]) if counted else (None, carry)
        rng = None if step is None else jax.random.fold_in(key, step)
        outs = ctx.eval_jaxpr(p["jaxpr"], [*consts, *carry, *x], names, rng=rng)
        outs = _densify_outputs(ctx, outs)
        new = list(outs[:n_carry])
        return (new if step is None else [step + 1, *new]), outs[n_carry:]

    init = [jnp.zeros((), jnp.int32), *carry] if counted else list(carry)
    carry_out, ys = jax.lax.scan(
        body, init, xs, length=p["length"], reverse=p["reverse"], unroll=p.get("unroll", 1)
    )
    return [*carry_out[int(counted) :], *ys]


def _densify_single(ctx: RuleContext, value: Any, name: str | None) -> Any:
    return dataclasses.replace(ctx, names=(name,)).densify([value])[0]


def _cond_rule(ctx: RuleContext, invals: list) -> list:
    index, operands = invals[0], invals[1:]
    if is_lorax_leaf(index):
        return _densify_rule(ctx, invals)
    names = ctx.names[1:]
    branches = [
        functools.partial(
            lambda br, *ops: _densify_outputs(ctx, ctx.eval_jaxpr(br, ops, names)), br
        )
        for br in ctx.params["branches"]
    ]
    return list(jax.lax.switch(index, branches, *operands))


def _while_rule(ctx: RuleContext, invals: list) -> list:
    p = ctx.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    cnames, bnames = ctx.names[:nc], ctx.names[nc : nc + nb]
    init = [ctx.densify([c])[0] if is_lorax_leaf(c) else c for c in init]
    free = (None,) * len(init)

    key = ctx.key()
    counted = key is not None  # per-iteration dropout keys need the iteration number

    def cond_fun(carry):
        carry = carry[1:] if counted else carry
        return ctx.eval_jaxpr(p["cond_jaxpr"], [*cconsts, *carry], cnames + free)[0]

    def body_fun(carry):
        step, carry = (carry[0], carry[1:]) if counted else (None, carry)
        rng = None if step is None else jax.random.fold_in(key, step)
        outs = _densify_outputs(
            ctx, ctx.eval_jaxpr(p["body_jaxpr"], [*bconsts, *carry], bnames + free, rng=rng)
        )
        return outs if step is None else [step + 1, *outs]

    init = [jnp.zeros((), jnp.int32), *init] if counted else list(init)
    return list(jax.lax.while_loop(cond_fun, body_fun, init))[int(counted) :]


# The built-in rules are structural (the leaf kinds handle the rest through their hook) and
# go in directly: some names are those of other JAX releases (pjit, remat2, ...), which
# register_rule's check for known primitive names would refuse.
_RULES.update(
    {
        **{name: _call_rule("jaxpr") for name in ("jit", "pjit")},
        **{name: _call_rule("call_jaxpr") for name in ("closed_call", "core_call")},
        "custom_jvp_call": _call_rule("call_jaxpr"),
        "custom_vjp_call": _call_rule("call_jaxpr"),
        "custom_vjp_call_jaxpr": _call_rule("fun_jaxpr"),
        "remat2": _remat_rule,
        "checkpoint": _remat_rule,
        "scan": _scan_rule,
        "cond": _cond_rule,
        "while": _while_rule,
    }
)
