"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based random matrix adaptation"), as Hugging
Face peft implements it (``peft/tuners/vera``).

One pair of random matrices is drawn once and shared, frozen, by every adapted weight; each
weight trains only two vectors. In peft's (torch) layout the update of a ``[out, in]``
weight is ``diag(lambda_b) B diag(lambda_d) A``, with ``A`` ``[r, in]`` and ``B``
``[out, r]`` the first ``in`` columns / ``out`` rows of the shared ``vera_A`` ``[r,
max_in]`` and ``vera_B`` ``[max_out, r]`` (kaiming-uniform, drawn at the largest input and
output sizes among the targets). In a Flax kernel's ``[in, out]`` layout that is::

    a: (in, r) = vera_A[:, :in].T      b: (r, out) = vera_B[:out].T
    W + (a * lambda_d) @ (b * lambda_b)

so a :class:`VeraWeight` acts as the LoRA leaf with factors ``a * lambda_d`` and
``b * lambda_b`` and scale 1: products never form the dense update, and it merges.
``lambda_d`` starts at ``d_initial`` (0.1) and ``lambda_b`` at zero, so the model starts
unchanged. Per weight that is ``r + out`` trainable numbers (LoRA: ``r * (in + out)``).

Checkpoints (``lorax.save``) hold each leaf's slices ``a`` and ``b`` beside the vectors
(a kind's own frozen arrays are saved): a reload is exact with no PRNG involved, at the
cost of one copy of the slices per weight. ``lorax.export_peft`` writes peft's format with
one shared ``vera_A`` / ``vera_B`` (``save_projection``), see ``lorax/io/peft_vera.py``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax._build import Site, build
from lorax._checks import check_key, floating_dtype, is_real_scalar, positive_int
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import OverBase, register_leaf, shape_of, static_field, unfit
from lorax.methods.lora import LoraWeight
from lorax.targets import Targets

Array = jax.Array


@register_leaf(kind="vera", aliases=("VeraWeight",))
class VeraWeight(OverBase):
    """A frozen base ``W`` plus ``(a * lambda_d) @ (b * lambda_b)``, a VeRA update.

    The dense weight's axes are ``(*stack, *in_axes, *out_axes)`` as for
    :class:`lorax.LoraWeight`::

        a: (*stack, *in_axes, r)    lambda_d: (*stack, r)      (frozen, trainable)
        b: (*stack, r, *out_axes)   lambda_b: (*stack, *out_axes)

    Attributes:
      base: the frozen weight, an array or another lorax leaf (e.g. an NF4 base).
      a: the shared random ``A`` sliced to this weight's inputs (peft's
        ``vera_A[:, :in].T``); frozen.
      b: the shared random ``B`` sliced to this weight's outputs (peft's
        ``vera_B[:out].T``); frozen.
      lambda_d: peft's ``vera_lambda_d``, scales the rank axis; ``d_initial`` at init.
      lambda_b: peft's ``vera_lambda_b``, scales the outputs; zero at init.
      dropout: dropout rate on the update's input (peft's ``vera_dropout``), applied when
        the transformed function gets ``dropout_rng=``; static.
    """

    base: Any
    a: Any
    b: Any
    lambda_d: Any
    lambda_b: Any
    dropout: float = static_field(default=0.0)

    trainable_fields: ClassVar[tuple[str, ...]] = ("lambda_d", "lambda_b")
    cast_fields: ClassVar[tuple[str, ...]] = ("a", "b", "lambda_d", "lambda_b")

    # ----- layout ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The shared rank ``r`` (peft's ``r``)."""
        return int(self.a.shape[-1])

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim + self.b.ndim - 2 - len(self.shape)

    @property
    def in_ndim(self) -> int:
        return self.a.ndim - 1 - self.stack_ndim

    def misfit(self) -> str | None:
        w, a, b = tuple(self.shape), shape_of(self.a), shape_of(self.b)
        problem = OverBase.misfit(self)
        if problem or a is None or b is None:
            return problem
        problem = LoraWeight(self.base, self.a, self.b).misfit()
        if problem:
            return problem
        ns, ni = len(a) + len(b) - 2 - len(w), len(a) - 1 - (len(a) + len(b) - 2 - len(w))
        want_d, want_b = w[:ns] + (a[-1],), w[:ns] + w[ns + ni :]
        got_d, got_b = shape_of(self.lambda_d), shape_of(self.lambda_b)
        if got_d not in (None, want_d) or got_b not in (None, want_b):
            return unfit(
                f"lambda_d {got_d} and lambda_b {got_b} (expected {want_d} and {want_b})", w
            )
        return None

    def field_axes(self, axes):
        ns, ni = self.stack_ndim, self.in_ndim
        out = LoraWeight(self.base, self.a, self.b).field_axes(axes)
        out["lambda_d"] = (*axes[:ns], None)
        out["lambda_b"] = (*axes[:ns], *axes[ns + ni :])
        return out

    @property
    def lora(self) -> LoraWeight:
        """The same update as a LoRA leaf: ``a * lambda_d``, ``b * lambda_b``, scale 1."""
        ns, ni = self.stack_ndim, self.in_ndim
        d = jnp.expand_dims(self.lambda_d, tuple(range(ns, ns + ni))).astype(self.a.dtype)
        lb = jnp.expand_dims(self.lambda_b, ns).astype(self.b.dtype)
        return LoraWeight(self.base, self.a * d, self.b * lb, scale=1.0, dropout=self.dropout)

    def materialize(self) -> Array:
        return self.lora.materialize()

    # ----- primitives: those of the equivalent LoRA leaf ------------------------------
    def dot_general(self, other, **kwargs):
        return self.lora.dot_general(other, **kwargs)

    def ragged_dot_general(self, lhs, group_sizes, **kwargs):
        return self.lora.ragged_dot_general(lhs, group_sizes, **kwargs)

    def conv_general_dilated(self, lhs, **kwargs):
        return self.lora.conv_general_dilated(lhs, **kwargs)

    def gather(self, indices, *, params, bind):
        return self.lora.gather(indices, params=params, bind=bind)

    def transpose(self, permutation):
        return self.lora.transpose(permutation)

    def reshape(self, new_sizes):
        return self.lora.reshape(new_sizes)

    def slice(self, start_indices, limit_indices, strides):
        return self.lora.slice(start_indices, limit_indices, strides)

    def dynamic_slice(self, start_indices, slice_sizes):
        return self.lora.dynamic_slice(start_indices, slice_sizes)

    def squeeze(self, dimensions):
        return self.lora.squeeze(dimensions)

    def expand_dims(self, dimensions):
        return self.lora.expand_dims(dimensions)

    def concatenate(self, operands, dimension):
        ops = [op.lora if isinstance(op, VeraWeight) else op for op in operands]
        return self.lora.concatenate(ops, dimension)


# ----- the constructor -----------------------------------------------------------------
def shared_projections(key: Array, rank: int, max_in: int, max_out: int, dtype: Any) -> Any:
    """The shared pair ``(a, b)`` in the Flax layout: ``a`` ``(max_in, r)``, ``b``
    ``(r, max_out)``, kaiming-uniform as peft draws ``vera_A`` ``[r, max_in]`` (bound
    ``sqrt(6 / max_in)``) and ``vera_B`` ``[max_out, r]`` (bound ``sqrt(6 / r)``).

    Args:
      key: the PRNG key (split in two, one per matrix).
      rank, max_in, max_out: the sizes.
      dtype: a floating dtype.

    Returns:
      ``(a, b)``.

    Example:
      >>> import jax
      >>> from lorax.methods.vera import shared_projections
      >>> a, b = shared_projections(jax.random.key(0), 4, 8, 6, "float32")
      >>> a.shape, b.shape, bool(abs(a).max() <= (6 / 8) ** 0.5)
      ((8, 4), (4, 6), True)
    """
    ka, kb = jax.random.split(key)
    bound_a, bound_b = math.sqrt(6.0 / max_in), math.sqrt(6.0 / rank)
    a = jax.random.uniform(ka, (max_in, rank), dtype, -bound_a, bound_a)
    b = jax.random.uniform(kb, (rank, max_out), dtype, -bound_b, bound_b)
    return a, b


def vera_leaf(
    base: Any,
    a_shared: Any,
    b_shared: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    stack: tuple[int, ...],
    ins: tuple[int, ...],
    outs: tuple[int, ...],
    dropout: float = 0.0,
) -> VeraWeight:
    """A :class:`VeraWeight` on ``base`` with the shared pair sliced to its sizes (the
    first ``prod(ins)`` rows of ``a_shared``, ``prod(outs)`` columns of ``b_shared``) and
    repeated along the ``stack`` axes; ``lambda_d`` / ``lambda_b`` as given."""
    stack, ins, outs = tuple(stack), tuple(ins), tuple(outs)
    a_shared, b_shared = np.asarray(a_shared), np.asarray(b_shared)  # small: (max_in, r) ...
    n_in, n_out, r = math.prod(ins), math.prod(outs), int(a_shared.shape[-1])
    a = np.broadcast_to(np.reshape(a_shared[:n_in], ins + (r,)), stack + ins + (r,))
    b = np.broadcast_to(np.reshape(b_shared[:, :n_out], (r,) + outs), stack + (r,) + outs)
    return VeraWeight(base, jnp.asarray(a), jnp.asarray(b), lambda_d, lambda_b, dropout=dropout)


def vera(
    params: Any,
    /,
    *,
    rank: int = 256,
    targets: Targets = None,
    key: jax.Array | None = None,
    d_initial: float = 0.1,
    dropout: float = 0.0,
    dtype: Any = None,
) -> Any:
    """Returns ``params`` with :class:`VeraWeight` leaves on the targeted weights.

    One pair of random matrices is drawn from ``key`` at the largest input and output sizes
    among the targets (peft's ``vera_A`` / ``vera_B``); each leaf holds its slice of it,
    frozen, and trains ``lambda_d`` (``(r,)``, set to ``d_initial``) and ``lambda_b``
    (``(out,)``, zero: the model starts unchanged).

    Args:
      params: the base parameters (any tree ``lorax.wrap`` takes, NF4 bases included).
      rank: the shared rank ``r`` (peft's default 256; VeRA takes far larger ranks than
        LoRA, and a rank above a weight's sizes is allowed, as in peft). It may not exceed
        the largest ``in * out`` of the targets: more entries of ``lambda_d`` than a
        weight has could not change any update.
      targets: as for ``lorax.wrap`` (e.g. ``["c_attn"]``); a callable's ``LoraSpec`` may
        give ``in_axes`` / ``stack_axes``, not a rank or alpha of its own (VeRA has one
        rank and no alpha).
      key: PRNG key of the shared pair. Default ``jax.random.key(0)``.
      d_initial: the initial value of every ``lambda_d`` (peft's ``d_initial``).
      dropout: dropout rate on the update's input (peft's ``vera_dropout``), applied when
        the transformed function gets ``dropout_rng=``.
      dtype: dtype of the pair and the vectors; default the base's promoted to at least
        float32.

    Returns:
      The tree with :class:`VeraWeight` leaves.

    Raises:
      LoraxValueError, LoraxTypeError: a bad argument, a rank above the largest
        ``in * out``, or targets that select no weight (the message names the paths).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> p = {"q": {"kernel": jnp.ones((16, 8))}, "up": {"kernel": jnp.ones((8, 32))}}
      >>> t = lorax.vera(p, rank=4, key=jax.random.key(0))
      >>> q, up = t["q"]["kernel"], t["up"]["kernel"]
      >>> q.a.shape, q.b.shape, q.lambda_d.shape, q.lambda_b.shape
      ((16, 4), (4, 8), (4,), (8,))
      >>> bool((up.a == q.a[:8]).all()), bool((q.b == up.b[:, :8]).all())  # one shared pair
      (True, True)
    """
    what = "lorax.vera"
    rank = positive_int(rank, f"{what}: rank")
    if not is_real_scalar(d_initial) or not math.isfinite(float(d_initial)):
        raise LoraxTypeError(f"{what}: d_initial must be a finite real number; got {d_initial!r}")
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real):
        raise LoraxTypeError(f"{what}: dropout must be a number in [0, 1); got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraxValueError(f"{what}: dropout must be in [0, 1); got {dropout!r}")
    dtype = floating_dtype(dtype, f"{what}: dtype")
    key = jax.random.key(0) if key is None else key
    check_key(key, f"{what}: key")
    layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    shared: list[tuple[Array, Array]] = []

    def layout(site: Site) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        shape = tuple(int(s) for s in site.leaf.shape)
        if site.spec.rank is not None or site.spec.alpha is not None:
            raise LoraxValueError(
                f"{what}: the target spec of '{site.path}' gives rank={site.spec.rank} / "
                f"alpha={site.spec.alpha}; VeRA has one rank shared by every weight (rank=) "
                "and no alpha"
            )
        ns = site.stack_axes()
        if not 0 <= ns <= len(shape) - 2:
            raise LoraxValueError(
                f"{what}: '{site.path}' of shape {shape} cannot have {ns} stack axes "
                "(at least two axes must remain)"
            )
        ni = site.in_axes(ns)
        if not 1 <= ni <= len(shape) - ns - 1:
            raise LoraxValueError(
                f"{what}: in_axes={ni} for '{site.path}' of shape {shape} (stack axes "
                f"{ns}) must leave at least one input and one output axis"
            )
        return shape[:ns], shape[ns : ns + ni], shape[ns + ni :]

    def prepare(sites: list[Site]) -> None:
        for site in sites:
            layouts[site.path] = layout(site)
        sizes = [(math.prod(i), math.prod(o)) for _, i, o in layouts.values()]
        largest = max(i * o for i, o in sizes)
        if rank > largest:
            raise LoraxValueError(
                f"{what}: rank {rank} exceeds in * out = {largest} of the largest targeted "
                "weight; lambda_d would have more entries than any update has degrees of "
                "freedom (the targeted paths are: " + ", ".join(s.path for s in sites[:20]) + ")"
            )
        max_in, max_out = max(i for i, _ in sizes), max(o for _, o in sizes)
        draw = jnp.float32 if dtype is None else jnp.promote_types(dtype, jnp.float32)
        shared.append(shared_projections(key, rank, max_in, max_out, draw))  # cast per leaf

    def make(site: Site) -> VeraWeight:
        stack, ins, outs = layouts[site.path]
        dt = jnp.dtype(
            dtype if dtype is not None else jnp.promote_types(site.leaf.dtype, jnp.float32)
        )
        a_shared, b_shared = (np.asarray(x).astype(dt) for x in shared[0])
        lambda_d = jnp.asarray(np.full(stack + (rank,), d_initial, dt))
        lambda_b = jnp.asarray(np.zeros(stack + outs, dt))
        return vera_leaf(
            site.leaf,
            a_shared,
            b_shared,
            lambda_d,
            lambda_b,
            stack=stack,
            ins=ins,
            outs=outs,
            dropout=float(dropout),
        )

    return build(params, make, targets=targets, check=prepare, what=what)
