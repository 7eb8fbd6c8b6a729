"""Which weights of a parameter tree get adapted, and how their axes split.

Targets (see ``lorax.wrap``) select leaves by their '/'-joined key path
(``params/h_0/attn/c_attn/kernel``): a regex matched in full, a list of names matching any
path component, a callable ``(path, leaf) -> bool | LoraSpec``, or None for the default
(every floating weight of rank >= 2 except embedding tables).
"""

from __future__ import annotations

import numbers
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxTypeError, LoraxValueError, NonFiniteError


def compile_regex(pattern: str, what: str) -> re.Pattern:
    """``re.compile(pattern)``; a bad regex is a lorax error naming the argument ``what``
    (e.g. ``"lorax.wrap: targets"``)."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise LoraxValueError(f"{what} {pattern!r} is not a valid regex: {err}") from None
    except TypeError:
        raise LoraxTypeError(
            f"{what} must be a regex string; got {type(pattern).__name__} {pattern!r}"
        ) from None


def positive_int(value: Any, what: str) -> int:
    """``value`` as an int >= 1: Python and numpy integers pass, bools and floats do not
    (a number of the wrong kind, e.g. 2.5, is a value error, as for any count)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise LoraxTypeError(f"{what} must be a positive int; got {type(value).__name__} {value!r}")
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
    if not isinstance(value, (np.ndarray, jax.Array)) or np.ndim(value) != 0:
        return False
    return jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)


def check_key(key: Any, what: str) -> None:
    """Refuses anything but one PRNG key: ``jax.random.key(...)``, or a legacy uint32[2]
    ``jax.random.PRNGKey(...)`` (uint32[4] under the rbg implementation)."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and shape is not None:
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            if tuple(shape) == ():
                return
        elif str(dtype) == "uint32" and tuple(shape) in ((2,), (4,)):
            return
        got = f"{dtype}{list(shape)}"
    else:
        got = f"{type(key).__name__} {key!r}"
    raise LoraxTypeError(
        f"{what} must be one PRNG key, jax.random.key(...) (or a legacy "
        f"uint32[2] key from jax.random.PRNGKey(...)); got {got}"
    )


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
        raise LoraxTypeError(f"{what} must be a floating dtype (e.g. jnp.float32); got {dtype!r}")
    return dt


def require_finite(w: Any, what: str) -> None:
    """Raises :class:`NonFiniteError` (``what`` names the weight) if the concrete array ``w``
    holds inf or NaN. Under tracing (jit, vmap, lax.map) the values are unknown: no check."""
    if isinstance(w, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
        return
    finite = jnp.isfinite(w)
    if bool(jnp.all(finite)):
        return
    # Count per row then in int64: one int32 count overflows on stacked 65B-size kernels.
    bad = int(np.sum(np.asarray(jnp.sum(~finite, axis=-1)), dtype=np.int64)) if finite.ndim else 1
    raise NonFiniteError(
        f"{what}: the weight {tuple(finite.shape)} holds {bad} inf/NaN "
        "value(s); expected a finite weight"
    )
