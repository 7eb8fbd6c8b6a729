"""Shims over the JAX internals that moved between releases, kept in one place.

Everything the interpreter needs from JAX that is not plain public API goes through here:
how an equation is re-bound, how a closed jaxpr is opened, and where an equation came from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jex_core  # the public home of these since jax 0.4.30

try:
    from jax._src import source_info_util as _source_info_util
except ImportError:  # pragma: no cover
    _source_info_util = None

Literal = jex_core.Literal
Var = jex_core.Var


def open_jaxpr(closed: Any) -> tuple[Any, Sequence[Any]]:
    """Returns `(jaxpr, consts)` of a closed jaxpr; an open jaxpr gets no consts.

    From jax 0.11 `ClosedJaxpr` is an alias of `Jaxpr`, so test for the wrapper's fields
    rather than for its type.
    """
    inner = getattr(closed, "jaxpr", None)
    if inner is not None and inner is not closed and hasattr(inner, "eqns"):
        return inner, list(getattr(closed, "consts", ()))
    return closed, list(getattr(closed, "consts", ()))


def bind_equation(eqn: Any, invals: Sequence[Any], **overrides: Any) -> list[Any]:
    """Binds `eqn`'s primitive to `invals` with its params (plus `overrides`); returns a list."""
    params = {**eqn.params, **overrides}
    bind_params = eqn.primitive.get_bind_params(params)
    with equation_context(eqn):
        if isinstance(bind_params, tuple):  # jax <= 0.9.1 returned (subfuns, params)
            subfuns, bind_params = bind_params
            out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
        else:
            out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


@contextlib.contextmanager
def equation_context(eqn: Any):
    """Re-enters `eqn`'s source location and name stack, so profiles and errors point home."""
    managers = []
    if _source_info_util is not None:
        try:
            name_stack = _source_info_util.current_name_stack() + eqn.source_info.name_stack
            managers.append(
                _source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack)
            )
        except Exception:  # noqa: BLE001 - purely cosmetic; never let it break evaluation
            pass
    ctx = getattr(eqn, "ctx", None)
    if ctx is not None and hasattr(ctx, "manager"):
        managers.append(ctx.manager)
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def source_line(eqn: Any) -> str:
    """A short 'file:line (function)' for the user code that produced `eqn`, or ''."""
    if _source_info_util is None:
        return ""
    try:
        return _source_info_util.summarize(eqn.source_info).strip()
    except Exception:  # noqa: BLE001
        return ""


def scan_operands(params: dict[str, Any], invals: Sequence[Any]) -> tuple[list, list, list]:
    """Splits a scan equation's inputs into (consts, carry, xs).

    jax <= 0.10 gives counts (`num_consts`, `num_carry`); jax 0.11 gives a tree `ft_in`
    of the three groups.
    """
    if "num_consts" in params:
        nc, ncarry = params["num_consts"], params["num_carry"]
        return list(invals[:nc]), list(invals[nc : nc + ncarry]), list(invals[nc + ncarry :])
    consts, carry, xs = params["ft_in"].update(list(invals)).unpack()
    return list(consts), list(carry), list(xs)


def known_primitives() -> frozenset[str]:
    """Names of the primitives JAX can lower (every one a jaxpr may hold), from its private
    lowering tables; empty if this JAX keeps them elsewhere, which turns
    ``register_rule``'s name check off rather than refusing names."""
    try:
        from jax._src.interpreters import mlir

        names = {p.name for p in mlir._lowerings}
        for table in mlir._platform_specific_lowerings.values():
            names |= {p.name for p in table}
        return frozenset(names)
    except Exception:  # pragma: no cover - private layout of another JAX release
        return frozenset()
