"""LoHa and LoKr (the LyCORIS methods), as Hugging Face peft implements them.

Both add a *full-rank* update built from small factors to a frozen weight ``W``:

- LoHa (Hyeon-Woo et al. 2022, FedPara): a Hadamard product of two low-rank products,
  ``delta = scale * (a1 @ b1) * (a2 @ b2)``, of rank up to ``r**2`` from ``4 r (in + out)``
  parameters;
- LoKr (Edalati et al. 2022; Yeh et al. 2023, LyCORIS): a Kronecker product,
  ``delta = scale * kron(w1, w2)``, with ``w1`` full (or ``w1 @ w1_b`` under
  ``decompose_both``) and ``w2`` low-rank ``w2 @ w2_b`` (or full when the rank is large).

``scale = alpha / r``. Each delta is a dense matrix by design, so a product ``x @ W'`` is
computed as peft computes it, ``x @ W + x @ delta``: the leaf forms ``delta`` from its factors
(one matmul of factors per call, weight-sized) inside its ``dot_general`` / conv / gather
rule, and declares it there, instead of the interpreter densifying the leaf with a warning.
A LoKr leaf on a 2-D kernel never forms it: ``x @ kron(w1, w2)`` is two small contractions of
``x`` reshaped to ``[..., in1, in2]``. Other primitives (a transpose, a slice of the weight)
densify with :class:`lorax.LoraxDensifyWarning`, as for any leaf.

Layout. The dense weight is ``(*stack, *in_axes, *out_axes)`` (Flax's ``[in, out]``); the
factors work on the flattened ``I = prod(in_axes)`` and ``O = prod(out_axes)``, and the delta
is reshaped back. peft stores torch's ``[out, in]``; the maps (``lorax/io/peft_lycoris.py``):

==============================  =====================================================
lorax (``[in, out]`` factors)   peft (``[out, in]``)
==============================  =====================================================
LoHa ``a1`` [I, r], ``b1`` [r, O]  ``hada_w1_b = a1.T``, ``hada_w1_a = b1.T``
LoHa ``a2``, ``b2``               ``hada_w2_b = a2.T``, ``hada_w2_a = b2.T``
LoKr ``w1`` [I1, O1] (full)       ``lokr_w1 = w1.T``
LoKr ``w1`` [I1, r], ``w1_b``     ``lokr_w1_b = w1.T``, ``lokr_w1_a = w1_b.T``
LoKr ``w2`` / ``w2_b``            ``lokr_w2`` / ``lokr_w2_b``, ``lokr_w2_a`` likewise
==============================  =====================================================

with ``(I1, I2) = factorization(I, factor)``, ``(O1, O2) = factorization(O, factor)``: peft's
``torch.kron(w1, w2)`` of ``[O1, I1]`` and ``[O2, I2]`` is, transposed, ``kron`` of the lorax
factors. Training-time regularizers are peft's too: ``rank_dropout`` (a random mask over the
output features of the delta, rescaled to mean 1 for LoHa and for LoKr with
``rank_dropout_scale``) and ``module_dropout`` (the whole delta skipped), active only when
``lorax.lora(fn)`` gets a ``dropout_rng``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax._build import Site, build
from lorax._checks import floating_dtype, positive_int
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import (
    Array,
    OverBase,
    input_product,
    materialize,
    register_leaf,
    shape_of,
    static_field,
    unfit,
)
from lorax.targets import Targets

_HI = jax.lax.Precision.HIGHEST


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (and LyCORIS's) split of ``dimension`` into ``m * n`` with ``m <= n``.

    Args:
      dimension: the size to split (a layer's input or output features).
      factor: ``-1``: the divisor pair nearest the square root; a positive divisor of
        ``dimension``: ``(factor, dimension // factor)``; another positive number: the
        nearest pair whose smaller part does not exceed it.

    Returns:
      ``(m, n)`` with ``m * n == dimension`` and ``m <= n``.

    Example:
      >>> from lorax.methods.hadamard_kron import factorization
      >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
      ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class _DeltaLeaf(OverBase):
    """What LoHa and LoKr share: a frozen base plus a dense ``delta`` made of factors.

    Subclasses declare the fields ``n_in``, ``n_out``, ``scale``, ``rank_dropout``,
    ``module_dropout`` and implement :meth:`delta_matrix`.
    """

    n_in: int
    n_out: int
    scale: float
    rank_dropout: float
    module_dropout: float
    rescale_rank_dropout: ClassVar[bool] = True  # LoHa always; LoKr with rank_dropout_scale

    # ----- layout ---------------------------------------------------------------------
    @property
    def stack_ndim(self) -> int:
        return len(self.shape) - self.n_in - self.n_out

    @property
    def fan_in(self) -> int:
        ns = self.stack_ndim
        return math.prod(self.shape[ns : ns + self.n_in])

    @property
    def fan_out(self) -> int:
        return math.prod(self.shape[self.stack_ndim + self.n_in :])

    def delta_matrix(self, dtype: Any) -> Array:
        """``scale * update`` as ``[*stack, I, O]``, computed in ``dtype``."""
        raise NotImplementedError

    def delta(self, dtype: Any) -> Array:
        """The update in the dense weight's shape, computed in ``dtype``."""
        return self.delta_matrix(dtype).reshape(self.shape)

    def materialize(self) -> Array:
        base = materialize(self.base)
        acc = jnp.promote_types(base.dtype, jnp.float32)
        return (base.astype(acc) + self.delta(acc)).astype(base.dtype)

    def astype(self, dtype: Any) -> Any:
        if not jnp.issubdtype(dtype, jnp.floating):
            return NotImplemented
        base = self.base.astype(dtype)
        if base is NotImplemented:
            return NotImplemented
        cast = {n: getattr(self, n) for n in self.trainable_fields}
        return self.replace(
            base=base, **{n: x.astype(dtype) for n, x in cast.items() if x is not None}
        )

    def slices_locally(self, axes):
        return all(a is None for a in axes[self.stack_ndim :])

    # ----- dropout (peft's rank_dropout and module_dropout, training only) ---------------
    def _dropout(self, rng: Any, dtype: Any) -> tuple[Array | None, Array | None]:
        """``(mask over the O output features or None, 0/1 module keep or None)``."""
        if rng is None or (self.rank_dropout <= 0 and self.module_dropout <= 0):
            return None, None
        k_rank, k_module = jax.random.split(rng)
        drop = keep = None
        if self.rank_dropout > 0:
            drop = (jax.random.uniform(k_rank, (self.fan_out,)) > self.rank_dropout).astype(dtype)
            if self.rescale_rank_dropout:
                mean = drop.mean()
                drop = jnp.where(mean > 0, drop / jnp.maximum(mean, 1e-12), drop)
        if self.module_dropout > 0:
            keep = (jax.random.uniform(k_module, ()) > self.module_dropout).astype(dtype)
        return drop, keep

    def _dropped_delta(self, rng: Any) -> Array:
        """The delta in the base's dtype, with dropout applied when ``rng`` is given."""
        acc = jnp.promote_types(self.dtype, jnp.float32)
        drop, keep = self._dropout(rng, acc)
        delta = self.delta_matrix(acc)
        if drop is not None:
            delta = delta * drop.reshape((1,) * (delta.ndim - 1) + drop.shape)
        if keep is not None:
            delta = delta * keep
        return delta.reshape(self.shape).astype(self.dtype)

    # ----- primitives: linear in the weight, so op(x, W) + op(x, delta) -----------------
    def dot_general(
        self,
        other,
        *,
        dimension_numbers,
        leaf_is_lhs,
        precision,
        preferred_element_type,
        bind,
        rng=None,
    ):
        base_out = self.base_dot(
            other,
            dimension_numbers=dimension_numbers,
            leaf_is_lhs=leaf_is_lhs,
            precision=precision,
            preferred_element_type=preferred_element_type,
            bind=bind,
        )
        if base_out is NotImplemented:
            return NotImplemented
        fast = self._factored_dot(other, dimension_numbers, leaf_is_lhs, precision, rng)
        if fast is not None:
            return base_out + fast.astype(base_out.dtype)
        delta = self._dropped_delta(rng)
        low = bind(delta, other) if leaf_is_lhs else bind(other, delta)
        return base_out + low.astype(base_out.dtype)

    def _factored_dot(self, x, dimension_numbers, leaf_is_lhs, precision, rng) -> Any:
        """``x @ delta`` without forming delta, where the kind knows how (else None)."""
        return None

    def conv_general_dilated(
        self, lhs, *, dimension_numbers, feature_group_count, batch_group_count, bind
    ):
        base_out = self.base_apply(lambda w: bind(lhs, w))
        return base_out + bind(lhs, self._dropped_delta(None)).astype(base_out.dtype)

    def gather(self, indices, *, params, bind):
        base_out = self.base_apply(
            lambda w: bind(w, indices),
            lambda leaf: leaf.gather(indices, params=params, bind=bind),  # NF4: rows only
        )
        if base_out is NotImplemented:
            return NotImplemented
        return base_out + bind(self._dropped_delta(None), indices).astype(base_out.dtype)

    def _check_layout(self) -> str | None:
        ns = len(self.shape) - self.n_in - self.n_out
        if self.n_in < 1 or self.n_out < 1 or ns < 0:
            return (
                f"n_in={self.n_in} and n_out={self.n_out} do not split the base "
                f"{tuple(self.shape)} into input and output axes"
            )
        return None


@register_leaf(kind="loha", aliases=("LohaWeight",))
class LohaWeight(_DeltaLeaf):
    """A frozen base ``W`` plus LoHa's ``scale * (a1 @ b1) * (a2 @ b2)`` (Hadamard product).

    Attributes:
      base: the frozen weight ``(*stack, *in_axes, *out_axes)``, an array or lorax leaf.
      a1, a2: ``(*stack, I, r)``, the input-side factors (peft's ``hada_w1_b.T``,
        ``hada_w2_b.T``); ``a2`` is zero at init, so the model starts unchanged.
      b1, b2: ``(*stack, r, O)``, the output-side factors (``hada_w1_a.T``, ``hada_w2_a.T``).
      n_in, n_out: the input and output axis counts of one layer's weight; static.
      scale: ``alpha / r``; static.
      rank_dropout, module_dropout: peft's training-time dropouts; static.
    """

    base: Any
    a1: Any
    b1: Any
    a2: Any
    b2: Any
    n_in: int = static_field(default=1)
    n_out: int = static_field(default=1)
    scale: float = static_field(default=1.0)
    rank_dropout: float = static_field(default=0.0)
    module_dropout: float = static_field(default=0.0)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a1", "b1", "a2", "b2")
    cast_fields: ClassVar[tuple[str, ...]] = ("a1", "b1", "a2", "b2")

    @property
    def rank(self) -> int:
        return int(self.a1.shape[-1])

    def delta_matrix(self, dtype):
        f = lambda a, b: jnp.matmul(a.astype(dtype), b.astype(dtype), precision=_HI)  # noqa: E731
        return jnp.asarray(self.scale, dtype) * f(self.a1, self.b1) * f(self.a2, self.b2)

    def misfit(self) -> str | None:
        problem = super().misfit() or self._check_layout()
        shapes = [shape_of(getattr(self, n)) for n in self.trainable_fields]
        first = shapes[0]
        if problem or first is None or any(s is None for s in shapes):
            return problem
        w, ns = tuple(self.shape), self.stack_ndim
        stack, r = w[:ns], first[-1]
        want_a, want_b = stack + (self.fan_in, r), stack + (r, self.fan_out)
        if shapes != [want_a, want_b, want_a, want_b]:
            return unfit(
                f"a1 {shapes[0]}, b1 {shapes[1]}, a2 {shapes[2]} and b2 {shapes[3]} "
                f"(expected {want_a}, {want_b} twice)",
                w,
            )
        return None

    def field_axes(self, axes):
        ns = self.stack_ndim
        stack = tuple(axes[:ns])
        ins = axes[ns] if self.n_in == 1 else None
        outs = axes[ns + self.n_in] if self.n_out == 1 else None
        a, b = (*stack, ins, None), (*stack, None, outs)
        return {"base": tuple(axes), "a1": a, "b1": b, "a2": a, "b2": b}

    def slices_locally(self, axes):
        # A Hadamard product of row/column slices is the slice of the product.
        ns = self.stack_ndim
        return (self.n_in == 1 or all(a is None for a in axes[ns : ns + self.n_in])) and (
            self.n_out == 1 or all(a is None for a in axes[ns + self.n_in :])
        )


@register_leaf(kind="lokr", aliases=("LokrWeight",))
class LokrWeight(_DeltaLeaf):
    """A frozen base ``W`` plus LoKr's ``scale * kron(w1', w2')`` (Kronecker product).

    ``w1' = w1`` when ``w1_b`` is None, else ``w1 @ w1_b`` (peft's ``decompose_both``);
    likewise ``w2'``, low-rank unless the rank is at least half its larger side.

    Attributes:
      base: the frozen weight ``(*stack, *in_axes, *out_axes)``, an array or lorax leaf.
      w1: ``(*stack, I1, O1)``, or ``(*stack, I1, r)`` with ``w1_b``; zero at init when full.
      w1_b: None, or ``(*stack, r, O1)`` (zero at init).
      w2: ``(*stack, I2, O2)``, or ``(*stack, I2, r)`` with ``w2_b``.
      w2_b: None, or ``(*stack, r, O2)``.
      n_in, n_out: the input and output axis counts of one layer's weight; static.
      scale: ``alpha / r``; static.
      rank: ``r``, which peft's layout rules and export need (a full factor does not
        show it); static.
      factor: the ``decompose_factor`` the factor shapes came from; static.
      rank_dropout, module_dropout, rank_dropout_scale: peft's training-time dropouts.
    """

    base: Any
    w1: Any
    w1_b: Any = None  # defaults: a checkpoint omits the optional factors a layout lacks
    w2: Any = None
    w2_b: Any = None
    n_in: int = static_field(default=1)
    n_out: int = static_field(default=1)
    scale: float = static_field(default=1.0)
    rank: int = static_field(default=8)
    factor: int = static_field(default=-1)
    rank_dropout: float = static_field(default=0.0)
    module_dropout: float = static_field(default=0.0)
    rank_dropout_scale: bool = static_field(default=False)

    trainable_fields: ClassVar[tuple[str, ...]] = ("w1", "w1_b", "w2", "w2_b")
    optional_fields: ClassVar[tuple[str, ...]] = ("w1_b", "w2_b")

    @property
    def rescale_rank_dropout(self) -> bool:  # type: ignore[override]
        return bool(self.rank_dropout_scale)

    def kron_factors(self, dtype: Any) -> tuple[Array, Array]:
        """``(w1', w2')``: ``(*stack, I1, O1)`` and ``(*stack, I2, O2)`` in ``dtype``."""

        def full(w: Any, b: Any) -> Array:
            w = w.astype(dtype)
            return w if b is None else jnp.matmul(w, b.astype(dtype), precision=_HI)

        return full(self.w1, self.w1_b), full(self.w2, self.w2_b)

    def delta_matrix(self, dtype):
        w1, w2 = self.kron_factors(dtype)
        stack = w1.shape[:-2]
        (i1, o1), (i2, o2) = w1.shape[-2:], w2.shape[-2:]
        k = jnp.einsum("...ac,...bd->...abcd", w1, w2, precision=_HI)
        return jnp.asarray(self.scale, dtype) * k.reshape(stack + (i1 * i2, o1 * o2))

    def _factored_dot(self, x, dimension_numbers, leaf_is_lhs, precision, rng):
        if (self.n_in, self.n_out) != (1, 1) or not input_product(
            dimension_numbers, leaf_is_lhs=leaf_is_lhs, stack_ndim=self.stack_ndim, in_ndim=1
        ):
            return None
        (lc, _), _ = dimension_numbers
        w1, w2 = self.kron_factors(x.dtype)
        (i1, o1), (i2, o2) = w1.shape, w2.shape
        x = jnp.moveaxis(x, int(lc[0]), -1)
        x = x.reshape(x.shape[:-1] + (i1, i2))
        y = jnp.einsum("...mn,ml,nk->...lk", x, w1, w2, precision=precision)
        y = y.reshape(y.shape[:-2] + (o1 * o2,)) * jnp.asarray(self.scale, y.dtype)
        drop, keep = self._dropout(rng, y.dtype)
        if drop is not None:
            y = y * drop.reshape((1,) * (y.ndim - 1) + drop.shape)
        return y if keep is None else y * keep

    def misfit(self) -> str | None:
        problem = super().misfit() or self._check_layout()
        w1, w2 = shape_of(self.w1), shape_of(self.w2)
        if problem or w1 is None or w2 is None:
            return problem
        b1, b2 = shape_of(self.w1_b), shape_of(self.w2_b)
        w, ns = tuple(self.shape), self.stack_ndim
        stack = w[:ns]

        def sides(a: tuple, b: tuple | None) -> tuple[int, int] | None:
            if len(a) != ns + 2 or a[:ns] != stack:
                return None
            if b is None:
                return a[-2], a[-1]
            ok = len(b) == ns + 2 and b[:ns] == stack and b[-2] == a[-1]
            return (a[-2], b[-1]) if ok else None

        f1, f2 = sides(w1, b1), sides(w2, b2)
        if (
            f1 is None
            or f2 is None
            or (f1[0] * f2[0], f1[1] * f2[1])
            != (
                self.fan_in,
                self.fan_out,
            )
        ):
            return unfit(
                f"w1 {w1} / w1_b {b1} and w2 {w2} / w2_b {b2} (a Kronecker product of "
                f"{self.fan_in} inputs and {self.fan_out} outputs per layer)",
                w,
            )
        return None

    def field_axes(self, axes):
        stack = tuple(axes[: self.stack_ndim])
        out: dict[str, Any] = {"base": tuple(axes)}
        for name in self.trainable_fields:
            if getattr(self, name) is not None:
                out[name] = (*stack, None, None)
        return out


# ----- the constructors ------------------------------------------------------------------
def _check_dropouts(what: str, **rates: Any) -> dict[str, float]:
    out = {}
    for name, value in rates.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise LoraxTypeError(f"{what}: {name} must be a number in [0, 1); got {value!r}")
        if not 0.0 <= float(value) < 1.0:
            raise LoraxValueError(f"{what}: {name} must be in [0, 1); got {value!r}")
        out[name] = float(value)
    return out


def _layout(site: Site, what: str) -> tuple[int, int, int]:
    """``(stack axes, input axes, output axes)`` of a chosen weight."""
    shape = tuple(site.leaf.shape)
    ns = site.stack_axes()
    if not 0 <= ns <= len(shape) - 2:
        raise LoraxValueError(
            f"{what}: '{site.path}' of shape {shape} cannot have {ns} stack axes "
            "(at least two axes must remain)"
        )
    ni = site.in_axes(ns)
    if not 1 <= ni <= len(shape) - ns - 1:
        raise LoraxValueError(
            f"{what}: in_axes={ni} for '{site.path}' of shape {shape} (stack axes {ns}) "
            "must leave at least one input and one output axis"
        )
    return ns, ni, len(shape) - ns - ni


def _kaiming(key: Array, shape: tuple, fan_in: int, dtype: Any) -> Array:
    """torch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _loha_init(key: Array, stack: tuple, i: int, o: int, r: int, dtype: Any) -> Any:
    """peft's init: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a`` Kaiming-uniform,
    ``hada_w2_b`` zero; i.e. ``b1``, ``a1``, ``b2`` uniform and ``a2`` zero."""
    k1, k2, k3 = jax.random.split(key, 3)
    a1 = _kaiming(k1, stack + (i, r), i, dtype)  # hada_w1_b [r, in]: fan-in `in`
    b1 = _kaiming(k2, stack + (r, o), r, dtype)  # hada_w1_a [out, r]: fan-in r
    b2 = _kaiming(k3, stack + (r, o), r, dtype)
    return a1, b1, jnp.zeros(stack + (i, r), dtype), b2


def loha(
    params: Any,
    /,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = None,
    key: jax.Array | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    dtype: Any = None,
) -> Any:
    """Returns ``params`` with :class:`LohaWeight` leaves (LoHa) on the targeted weights.

    The update is ``(alpha / rank) * (a1 @ b1) * (a2 @ b2)``, a Hadamard product of two
    rank-``rank`` products (peft's ``LoHaConfig``). Initialised as peft's: ``a1``, ``b1``,
    ``b2`` Kaiming-uniform and ``a2`` zero, so the model starts unchanged.

    Args:
      params: the base parameters (any tree ``lorax.wrap`` takes, NF4 bases included).
      rank: ``r`` of each product (peft's ``r``).
      alpha: peft's ``alpha``; the scale is ``alpha / rank``. Default ``rank``.
      targets: as for ``lorax.wrap`` (e.g. ``["q_proj", "v_proj"]``).
      key: PRNG key of the init, split per weight. Default ``jax.random.key(0)``.
      rank_dropout: peft's ``rank_dropout``: during training (``lorax.lora(fn)`` called with
        ``dropout_rng=``) each output feature of the delta is dropped with this rate and
        the rest rescaled to mean 1.
      module_dropout: peft's ``module_dropout``: the whole delta is skipped with this rate.
      dtype: dtype of the factors; default the base's promoted to at least float32.

    Returns:
      The tree with :class:`LohaWeight` leaves.

    Raises:
      LoraxValueError, LoraxTypeError: a bad argument, or a targeted weight whose axes
        cannot be split into inputs and outputs (the message names the path).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> p = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
      >>> t = lorax.loha(p, rank=4, alpha=8, key=jax.random.key(0))
      >>> leaf = t["dense"]["kernel"]
      >>> leaf.a1.shape, leaf.b1.shape, leaf.scale
      ((16, 4), (4, 32), 2.0)
      >>> bool((lorax.merge(t)["dense"]["kernel"] == 1).all())  # the update starts at 0
      True
    """
    what = "lorax.loha"
    rank = positive_int(rank, f"{what}: rank")
    alpha = _alpha(alpha, rank, what)
    drops = _check_dropouts(what, rank_dropout=rank_dropout, module_dropout=module_dropout)
    dtype = floating_dtype(dtype, f"{what}: dtype")

    def make(site: Site) -> LohaWeight:
        ns, ni, no = _layout(site, what)
        shape = tuple(site.leaf.shape)
        i, o = math.prod(shape[ns : ns + ni]), math.prod(shape[ns + ni :])
        dt = dtype if dtype is not None else jnp.promote_types(site.leaf.dtype, jnp.float32)
        a1, b1, a2, b2 = _loha_init(site.key, shape[:ns], i, o, rank, jnp.dtype(dt))
        return LohaWeight(site.leaf, a1, b1, a2, b2, n_in=ni, n_out=no, scale=alpha / rank, **drops)

    return build(
        params, make, targets=targets, key=jax.random.key(0) if key is None else key, what=what
    )


def _alpha(alpha: Any, rank: int, what: str) -> float:
    from lorax.methods.wrap import check_alpha

    return float(rank) if alpha is None else check_alpha(alpha, f"{what}: alpha")


def lokr_layout(
    fan_in: int, fan_out: int, *, rank: int, factor: int = -1, decompose_both: bool = False
) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """peft's LoKr layout of a ``fan_in x fan_out`` Linear weight.

    Args:
      fan_in, fan_out: the weight's input and output features.
      rank: ``r``.
      factor: peft's ``decompose_factor`` (see :func:`factorization`).
      decompose_both: peft's ``decompose_both``: ``w1`` low-rank too when ``r`` is below
        half its larger side.

    Returns:
      ``((I1, I2), (O1, O2), w1_full, w2_full)``: ``w1'`` is ``[I1, O1]`` and ``w2'``
      ``[I2, O2]`` (lorax's ``[in, out]``); ``w2`` is full when ``r >= max(I2, O2) / 2``.

    Example:
      >>> from lorax.methods.hadamard_kron import lokr_layout
      >>> lokr_layout(768, 2304, rank=8)
      ((24, 32), (48, 48), True, False)
    """
    i1, i2 = factorization(fan_in, factor)
    o1, o2 = factorization(fan_out, factor)
    w1_full = not (decompose_both and rank < max(o1, i1) / 2)
    w2_full = not (rank < max(o2, i2) / 2)
    return (i1, i2), (o1, o2), w1_full, w2_full


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _lokr_init(
    key: Array, stack: tuple, ins: tuple, outs: tuple, r: int, w1_full: bool, w2_full: bool, dt
) -> Any:
    """peft's init (``init_weights=True``): ``lokr_w1`` (or ``lokr_w1_a``) zero, the other
    factors Kaiming-uniform, so the update starts at zero."""
    (i1, i2), (o1, o2) = ins, outs
    k1, k2, k3 = jax.random.split(key, 3)
    if w1_full:
        w1, w1_b = jnp.zeros(stack + (i1, o1), dt), None
    else:  # lokr_w1_a [O1, r] zero, lokr_w1_b [r, I1] uniform
        w1, w1_b = _kaiming(k1, stack + (i1, r), i1, dt), jnp.zeros(stack + (r, o1), dt)
    if w2_full:  # lokr_w2 [O2, I2]
        w2, w2_b = _kaiming(k2, stack + (i2, o2), i2, dt), None
    else:  # lokr_w2_a [O2, r], lokr_w2_b [r, I2]
        w2, w2_b = _kaiming(k2, stack + (i2, r), i2, dt), _kaiming(k3, stack + (r, o2), r, dt)
    return w1, w1_b, w2, w2_b


def lokr(
    params: Any,
    /,
    *,
    rank: int = 8,
    alpha: float | None = None,
    factor: int = -1,
    decompose_both: bool = False,
    targets: Targets = None,
    key: jax.Array | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    rank_dropout_scale: bool = False,
    dtype: Any = None,
) -> Any:
    """Returns ``params`` with :class:`LokrWeight` leaves (LoKr) on the targeted weights.

    The update is ``(alpha / rank) * kron(w1', w2')`` over the weight's ``I`` inputs and
    ``O`` outputs split as peft splits them (:func:`lokr_layout`): ``w1'`` ``[I1, O1]`` is
    full (``w1 @ w1_b`` with ``decompose_both`` when the rank is below half its larger
    side), ``w2'`` ``[I2, O2]`` is ``w2 @ w2_b`` of rank ``rank`` (full when the rank is at
    least half its larger side). Initialised as peft's: ``w1`` (or ``w1_b``) zero.

    Args:
      params: the base parameters (any tree ``lorax.wrap`` takes, NF4 bases included).
      rank: peft's ``r``.
      alpha: peft's ``alpha``; the scale is ``alpha / rank``. Default ``rank``.
      factor: peft's ``decompose_factor``: -1 splits each size near its square root, a
        positive divisor ``f`` splits it as ``(f, size // f)``.
      decompose_both: peft's ``decompose_both`` (``w1`` low-rank too).
      targets: as for ``lorax.wrap``.
      key: PRNG key of the init, split per weight. Default ``jax.random.key(0)``.
      rank_dropout: peft's ``rank_dropout`` (training only, with ``dropout_rng=``): each
        output feature of the delta is dropped with this rate.
      module_dropout: peft's ``module_dropout``: the whole delta is skipped with this rate.
      rank_dropout_scale: peft's ``rank_dropout_scale``: rescale the kept features to
        mean 1 (off by default, as in peft).
      dtype: dtype of the factors; default the base's promoted to at least float32.

    Returns:
      The tree with :class:`LokrWeight` leaves.

    Raises:
      LoraxValueError, LoraxTypeError: a bad argument, or a targeted weight whose axes
        cannot be split into inputs and outputs (the message names the path).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> p = {"dense": {"kernel": jnp.ones((16, 32))}}
      >>> leaf = lorax.lokr(p, rank=2, key=jax.random.key(0))["dense"]["kernel"]
      >>> leaf.w1.shape, leaf.w2.shape, leaf.w2_b.shape  # 16 = 4 * 4, 32 = 4 * 8
      ((4, 4), (4, 2), (2, 8))
    """
    what = "lorax.lokr"
    rank = positive_int(rank, f"{what}: rank")
    alpha = _alpha(alpha, rank, what)
    if isinstance(factor, (bool, np.bool_)) or not isinstance(factor, numbers.Integral):
        raise LoraxTypeError(f"{what}: factor must be an int (-1 or positive); got {factor!r}")
    if factor == 0 or factor < -1:
        raise LoraxValueError(f"{what}: factor must be -1 or a positive int; got {factor!r}")
    for name, flag in (
        ("decompose_both", decompose_both),
        ("rank_dropout_scale", rank_dropout_scale),
    ):
        if not isinstance(flag, (bool, np.bool_)):
            raise LoraxTypeError(f"{what}: {name} must be True or False; got {flag!r}")
    drops = _check_dropouts(what, rank_dropout=rank_dropout, module_dropout=module_dropout)
    dtype = floating_dtype(dtype, f"{what}: dtype")

    def make(site: Site) -> LokrWeight:
        ns, ni, no = _layout(site, what)
        shape = tuple(site.leaf.shape)
        i, o = math.prod(shape[ns : ns + ni]), math.prod(shape[ns + ni :])
        ins, outs, w1_full, w2_full = lokr_layout(
            i, o, rank=rank, factor=int(factor), decompose_both=bool(decompose_both)
        )
        dt = dtype if dtype is not None else jnp.promote_types(site.leaf.dtype, jnp.float32)
        w1, w1_b, w2, w2_b = _lokr_init(
            site.key, shape[:ns], ins, outs, rank, w1_full, w2_full, jnp.dtype(dt)
        )
        return LokrWeight(
            site.leaf,
            w1,
            w1_b,
            w2,
            w2_b,
            n_in=ni,
            n_out=no,
            scale=alpha / rank,
            rank=rank,
            factor=int(factor),
            rank_dropout_scale=bool(rank_dropout_scale),
            **drops,
        )

    return build(
        params, make, targets=targets, key=jax.random.key(0) if key is None else key, what=what
    )
