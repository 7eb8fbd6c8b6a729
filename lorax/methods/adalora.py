"""AdaLoRA (Zhang et al. 2023, "Adaptive budget allocation for parameter-efficient
fine-tuning"), as Hugging Face peft implements it.

Each adapted weight gets an update in SVD form, ``W + s * P diag(lam * mask) Q``, with
``P`` (``a``), ``lam`` (``e``) and ``Q`` (``b``) trainable and a rank ``mask`` that is not.
Training removes the least important triplets (a column of ``P``, a singular value, a row
of ``Q``) until a total budget of ranks is left, by masking: shapes never change, so the
whole loop runs under one ``jax.jit``. The pieces are pure functions, in optax's style::

    tree = lorax.adalora(params, init_rank=12, target_rank=8, targets=["c_attn"])
    state = lorax.AdaLoraState.init(tree)          # EMA sensitivity and uncertainty
    # in the jitted step, after the optimizer's update:
    loss = task_loss + 0.5 * lorax.orthogonal_regularizer(trainable)
    state = lorax.update_importance(state, trainable, grads)
    budget = lorax.budget_at(step, init_budget=state.init_budget,
                             target_budget=state.target_budget, tinit=..., tfinal=...,
                             total_step=...)
    tree = lorax.mask_to_budget(tree, state, budget)

peft's layout (``peft/tuners/adalora/layer.py``) maps onto a Flax kernel ``[in, out]`` as
LoRA's does: ``lora_A`` ``[r, in]`` is ``a.T``, ``lora_E`` ``[r, 1]`` is ``e[:, None]``,
``lora_B`` ``[out, r]`` is ``b.T``; the update is ``scaling / (ranknum + 1e-5) * B (A * E)``
with ``scaling = lora_alpha`` and ``ranknum`` the initial rank (it never changes, masking
or not), so ``scale = alpha / (r + 1e-5)``.

Masking: peft zeroes a pruned singular value in place, keeps training it, and zeroes it
again at the next allocation (or every step once the ranks are final), so a pruned triplet
still gets a gradient and may come back. The mask does the same here: the forward pass
sees ``e * mask``, the gradient of ``e`` is the unmasked one, and :func:`mask_to_budget`
sets the mask and zeroes the pruned entries of ``e``. Called at every step with peft's
schedule, the loop follows peft's ``update_and_allocate`` with ``deltaT = 1``.
"""

from __future__ import annotations

import dataclasses
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
from lorax.leaf import OverBase, is_lorax_leaf, register_leaf, shape_of, static_field, unfit
from lorax.methods.lora import LoraWeight
from lorax.paths import path_str
from lorax.targets import Targets

Array = jax.Array

#: peft's ``ranknum + 1e-5`` in the scaling of every AdaLoRA layer.
RANKNUM_EPS = 1e-5


@register_leaf(kind="adalora", aliases=("AdaLoraWeight",))
class AdaLoraWeight(OverBase):
    """A frozen base ``W`` plus ``scale * a diag(e * mask) b``, the SVD-form update of AdaLoRA.

    The dense weight's axes are ``(*stack, *in_axes, *out_axes)`` as for
    :class:`lorax.LoraWeight`::

        a: (*stack, *in_axes, r)    e: (*stack, r)    b: (*stack, r, *out_axes)
        mask: (*stack, r)           W + scale * einsum(a * (e * mask), b over r)

    Products are computed as LoRA's, ``x @ W + scale * ((x @ a) * e) @ b``, without
    forming the dense update. The forward pass sees ``e * mask``; the gradient of ``e`` is
    the unmasked one (as peft's, whose pruned values are zeros that keep training).

    Attributes:
      base: the frozen weight, an array or another lorax leaf (e.g. an NF4 base).
      a: ``P``, ``(*stack, *in_axes, r)``; peft's ``lora_A.T``.
      e: the singular values ``lam``, ``(*stack, r)``; zero at init.
      b: ``Q``, ``(*stack, r, *out_axes)``; peft's ``lora_B.T``.
      mask: 1.0 where a triplet is kept, 0.0 where pruned, ``(*stack, r)``; frozen.
      alpha: peft's ``lora_alpha``; the scale is ``alpha / (r + 1e-5)``; static.
      target_rank: the average rank the budget schedule ends with, per layer; static.
      dropout: dropout rate on the low-rank path's input, as LoRA's; static.
    """

    base: Any
    a: Any
    e: Any
    b: Any
    mask: Any
    alpha: float = static_field(default=1.0)
    target_rank: int = static_field(default=1)
    dropout: float = static_field(default=0.0)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "e", "b")
    cast_fields: ClassVar[tuple[str, ...]] = ("a", "e", "b", "mask")

    # ----- layout ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The initial rank ``r`` (peft's ``init_r`` and ``ranknum``)."""
        return int(self.e.shape[-1])

    @property
    def scale(self) -> float:
        """``alpha / (r + 1e-5)``, peft's ``scaling / (ranknum + 1e-5)``."""
        return float(self.alpha) / (self.rank + RANKNUM_EPS)

    @property
    def stack_ndim(self) -> int:
        return self.e.ndim - 1

    @property
    def in_ndim(self) -> int:
        return self.a.ndim - 1 - self.stack_ndim

    @property
    def kept_rank(self) -> int | None:
        """Triplets the mask keeps, summed over stacked layers (None without a mask)."""
        if self.mask is None:
            return None
        return int(np.count_nonzero(np.asarray(self.mask)))

    def misfit(self) -> str | None:
        w, e, mask = tuple(self.shape), shape_of(self.e), shape_of(self.mask)
        problem = OverBase.misfit(self) or LoraWeight(self.base, self.a, self.b).misfit()
        if problem or e is None or shape_of(self.a) is None:
            return problem
        want = tuple(self.a.shape[: len(e) - 1]) + (int(self.a.shape[-1]),)
        if e != want or mask not in (None, want):
            return unfit(f"e {e} and mask {mask} (expected {want})", w)
        return None

    def field_axes(self, axes):
        ns = self.stack_ndim
        out = LoraWeight(self.base, self.a, self.b).field_axes(axes)
        out["e"] = out["mask"] = (*axes[:ns], None)
        return out

    def effective_e(self) -> Array:
        """``e * mask`` in the forward pass, with the gradient of ``e`` unmasked."""
        hidden = jnp.where(self.mask > 0, jnp.zeros_like(self.e), self.e)
        return self.e - jax.lax.stop_gradient(hidden)

    @property
    def lora(self) -> LoraWeight:
        """The same update as a LoRA leaf: ``a * (e * mask)`` and ``b``, ``scale``."""
        ns, ni = self.stack_ndim, self.in_ndim
        e = jnp.expand_dims(self.effective_e(), tuple(range(ns, ns + ni)))
        a = self.a * e.astype(self.a.dtype)
        return LoraWeight(self.base, a, self.b, scale=self.scale, dropout=self.dropout)

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
        ops = [op.lora if isinstance(op, AdaLoraWeight) else op for op in operands]
        return self.lora.concatenate(ops, dimension)


# ----- the constructor -----------------------------------------------------------------
def adalora(
    params: Any,
    /,
    *,
    init_rank: int = 12,
    target_rank: int = 8,
    alpha: float | None = None,
    targets: Targets = None,
    key: jax.Array | None = None,
    dropout: float = 0.0,
    dtype: Any = None,
) -> Any:
    """Returns ``params`` with :class:`AdaLoraWeight` leaves on the targeted weights.

    Initialised as peft's: ``e = 0`` (so the model starts unchanged), ``a`` and ``b`` drawn
    from ``N(0, 0.02^2)``, every triplet kept.

    Args:
      params: the base parameters (any tree ``lorax.wrap`` takes, NF4 bases included).
      init_rank: the rank each weight starts with (peft's ``init_r``).
      target_rank: the average rank per weight the budget schedule ends with (peft's
        ``target_r``); ``AdaLoraState.init`` sums it into the target budget.
      alpha: peft's ``lora_alpha``: the update is scaled by ``alpha / (init_rank + 1e-5)``.
        Default ``init_rank`` (a scale of about 1).
      targets: as for ``lorax.wrap`` (e.g. ``["c_attn"]``).
      key: PRNG key for ``a`` and ``b``, split per weight. Default ``jax.random.key(0)``.
      dropout: dropout rate on the low-rank path's input (peft's ``lora_dropout``),
        applied when the transformed function gets ``dropout_rng=``.
      dtype: dtype of ``a``, ``e``, ``b`` and the mask; default the base's promoted to at
        least float32.

    Returns:
      The tree with :class:`AdaLoraWeight` leaves.

    Raises:
      LoraxValueError, LoraxTypeError: a bad argument (the message names it and the path).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> p = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
      >>> t = lorax.adalora(p, init_rank=4, target_rank=2, key=jax.random.key(0))
      >>> leaf = t["dense"]["kernel"]
      >>> leaf.a.shape, leaf.e.shape, leaf.b.shape, leaf.kept_rank
      ((16, 4), (4,), (4, 32), 4)
    """
    from lorax.methods.wrap import check_alpha

    what = "lorax.adalora"
    init_rank = positive_int(init_rank, f"{what}: init_rank")
    target_rank = positive_int(target_rank, f"{what}: target_rank")
    if target_rank > init_rank:
        raise LoraxValueError(
            f"{what}: target_rank {target_rank} exceeds init_rank {init_rank}; the budget "
            "only shrinks"
        )
    alpha = float(init_rank) if alpha is None else check_alpha(alpha, f"{what}: alpha")
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real):
        raise LoraxTypeError(f"{what}: dropout must be a number in [0, 1); got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraxValueError(f"{what}: dropout must be in [0, 1); got {dropout!r}")
    dtype = floating_dtype(dtype, f"{what}: dtype")

    def make(site: Site) -> AdaLoraWeight:
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
                f"{what}: in_axes={ni} for '{site.path}' of shape {shape} (stack axes "
                f"{ns}) must leave at least one input and one output axis"
            )
        stack, ins, outs = shape[:ns], shape[ns : ns + ni], shape[ns + ni :]
        if init_rank > min(math.prod(ins), math.prod(outs)):
            raise LoraxValueError(
                f"{what}: init_rank {init_rank} for '{site.path}' exceeds min(in, out) = "
                f"min({math.prod(ins)}, {math.prod(outs)}) of its weight {shape}"
            )
        dt = dtype if dtype is not None else jnp.promote_types(site.leaf.dtype, jnp.float32)
        a, e, b, mask = _init_arrays(site.key, stack, ins, outs, init_rank, jnp.dtype(dt))
        return AdaLoraWeight(
            site.leaf,
            a,
            e,
            b,
            mask,
            alpha=alpha,
            target_rank=target_rank,
            dropout=float(dropout),
        )

    return build(
        params,
        make,
        targets=targets,
        key=jax.random.key(0) if key is None else key,
        what=what,
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init_arrays(key: Array, stack: tuple, ins: tuple, outs: tuple, r: int, dtype: Any) -> Any:
    """peft's init (``a``, ``b`` from N(0, 0.02^2), ``e`` = 0) and a full mask, in one
    compiled call per layout."""
    ka, kb = jax.random.split(key)
    a = 0.02 * jax.random.normal(ka, stack + ins + (r,), dtype)
    b = 0.02 * jax.random.normal(kb, stack + (r,) + outs, dtype)
    return a, jnp.zeros(stack + (r,), dtype), b, jnp.ones(stack + (r,), dtype)


# ----- training: pure functions ----------------------------------------------------------
def _leaves(tree: Any, what: str) -> dict[str, AdaLoraWeight]:
    """The AdaLoRA leaves of ``tree`` by '/'-joined path (halves of a split included)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]
    out = {path_str(p): x for p, x in flat if isinstance(x, AdaLoraWeight)}
    if not out:
        raise LoraxValueError(
            f"{what}: the tree has no AdaLoraWeight leaves; expected a tree from "
            "lorax.adalora (or its trainable half from lorax.split)"
        )
    return out


def _layers(leaf: AdaLoraWeight) -> int:
    return math.prod(int(s) for s in leaf.e.shape[:-1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaLoraState:
    """The importance of every AdaLoRA parameter, as peft's ``RankAllocator`` keeps it.

    Attributes:
      sensitivity: ``{path: {"a": ..., "e": ..., "b": ...}}``, the EMA of ``|w * grad|``
        (peft's ``exp_avg_ipt``), each of its parameter's shape, float32.
      uncertainty: the same for the EMA of ``|ipt - sensitivity|`` (``exp_avg_unc``).
      init_budget: the triplets of the tree at the start (peft's ``init_bgt``); static.
      target_budget: ``target_rank`` summed over the adapted layers (``target_bgt``);
        static.
    """

    sensitivity: dict[str, dict[str, Array]]
    uncertainty: dict[str, dict[str, Array]]
    init_budget: int = dataclasses.field(metadata={"static": True}, default=0)
    target_budget: int = dataclasses.field(metadata={"static": True}, default=0)

    @classmethod
    def init(cls, tree: Any) -> AdaLoraState:
        """Zero importance for every AdaLoRA leaf of ``tree`` (whole, or trainable half).

        Args:
          tree: a tree from :func:`lorax.adalora`.

        Returns:
          The state, with the budgets counted from the tree.

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> t = lorax.adalora({"w": jnp.ones((8, 8))}, init_rank=4, target_rank=2)
          >>> s = lorax.AdaLoraState.init(t)
          >>> s.init_budget, s.target_budget, s.sensitivity["w"]["e"].shape
          (4, 2, (4,))
        """
        leaves = _leaves(tree, "lorax.AdaLoraState.init")
        zeros = {
            path: {n: jnp.zeros(getattr(x, n).shape, jnp.float32) for n in ("a", "e", "b")}
            for path, x in leaves.items()
        }
        return cls(
            sensitivity=zeros,
            uncertainty=jax.tree.map(jnp.zeros_like, zeros),
            init_budget=sum(x.rank * _layers(x) for x in leaves.values()),
            target_budget=sum(x.target_rank * _layers(x) for x in leaves.values()),
        )


def _check_beta(value: Any, name: str) -> None:
    if isinstance(value, numbers.Real) and not 0.0 < float(value) < 1.0:
        raise LoraxValueError(f"lorax.update_importance: {name} must be in (0, 1); got {value!r}")


def update_importance(
    state: AdaLoraState,
    params: Any,
    grads: Any,
    /,
    *,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> AdaLoraState:
    """One step of peft's ``update_ipt``: the smoothed sensitivity and its uncertainty.

    For each of ``a``, ``e``, ``b``: ``ipt = |w * grad|``,
    ``sensitivity = beta1 * sensitivity + (1 - beta1) * ipt`` and
    ``uncertainty = beta2 * uncertainty + (1 - beta2) * |ipt - sensitivity|`` (the new
    sensitivity). peft calls it after the optimizer's step, with the updated weights and
    the gradients of that step.

    Args:
      state: from :meth:`AdaLoraState.init` or a previous update.
      params: the tree (whole, or its trainable half), typically after the update.
      grads: the gradients, a tree with the AdaLoRA leaves at the same paths (the
        gradient of the trainable half).
      beta1: EMA rate of the sensitivity (peft's ``beta1``), in (0, 1).
      beta2: EMA rate of the uncertainty (peft's ``beta2``), in (0, 1).

    Returns:
      The new state.

    Raises:
      LoraxValueError: a beta outside (0, 1), or a path of the state that ``params`` or
        ``grads`` lacks.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> t = lorax.adalora({"w": jnp.ones((8, 8))}, init_rank=4, target_rank=2)
      >>> s = lorax.AdaLoraState.init(t)
      >>> g = jax.tree.map(jnp.ones_like, lorax.split(t)[0])
      >>> s = lorax.update_importance(s, t, g, beta1=0.5, beta2=0.5)
      >>> s.sensitivity["w"]["a"].shape
      (8, 4)
    """
    _check_beta(beta1, "beta1")
    _check_beta(beta2, "beta2")
    what = "lorax.update_importance"
    ws, gs = _leaves(params, what), _leaves(grads, what)
    sens: dict[str, dict[str, Array]] = {}
    unc: dict[str, dict[str, Array]] = {}
    for path in state.sensitivity:
        if path not in ws or path not in gs:
            where = "params" if path not in ws else "grads"
            raise LoraxValueError(
                f"{what}: the state has '{path}' but {where} has no AdaLoraWeight there; "
                f"expected the tree the state was made for (paths: {sorted(ws)[:8]})"
            )
        sens[path], unc[path] = {}, {}
        for n in ("a", "e", "b"):
            w = getattr(ws[path], n).astype(jnp.float32)
            g = getattr(gs[path], n).astype(jnp.float32)
            ipt = jnp.abs(w * g)
            s = beta1 * state.sensitivity[path][n] + (1 - beta1) * ipt
            u = beta2 * state.uncertainty[path][n] + (1 - beta2) * jnp.abs(ipt - s)
            sens[path][n], unc[path][n] = s, u
    return dataclasses.replace(state, sensitivity=sens, uncertainty=unc)


def _element_score(state: AdaLoraState, path: str, name: str) -> Array:
    """peft's ``_element_score``: sensitivity times uncertainty, per parameter entry."""
    return state.sensitivity[path][name] * state.uncertainty[path][name]


def triplet_scores(state: AdaLoraState, leaf: AdaLoraWeight, path: str) -> Array:
    """The importance of each triplet of ``leaf``, ``(*stack, r)``: peft's score of the
    singular value plus the mean score of its column of ``a`` (over the input axes) and of
    its row of ``b`` (over the output axes), as ``mask_to_budget`` and ``_combine_ipt``."""
    ns, ni = leaf.stack_ndim, leaf.in_ndim
    a = _element_score(state, path, "a").mean(axis=tuple(range(ns, ns + ni)))
    b_score = _element_score(state, path, "b")
    b = b_score.mean(axis=tuple(range(ns + 1, b_score.ndim)))
    return _element_score(state, path, "e") + (a + b)


def mask_to_budget(tree: Any, state: AdaLoraState, budget: Any, /) -> Any:
    """Keeps the ``budget`` most important triplets over all AdaLoRA leaves (peft's
    ``mask_to_budget``): one global threshold, the ``(init_budget - budget)``-th smallest
    score; triplets scoring at or below it get mask 0 and ``e = 0``, the others mask 1.

    Recomputed from the scores each time, so a pruned triplet may come back. Shapes never
    change, and ``budget`` may be traced: it runs under ``jax.jit``.

    Args:
      tree: the whole tree from :func:`lorax.adalora` (it holds the masks).
      state: the importance (:func:`update_importance`).
      budget: the number of triplets to keep (:func:`budget_at`); at or above the number
        there are, every triplet is kept.

    Returns:
      The tree with new masks and the pruned singular values zeroed.

    Raises:
      LoraxValueError: the tree has no AdaLoRA leaves, lacks its masks (a half of
        ``lorax.split``), or its paths are not the state's.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> t = lorax.adalora({"w": jnp.ones((8, 8))}, init_rank=4, target_rank=2)
      >>> s = lorax.AdaLoraState.init(t)
      >>> g = jax.tree.map(jnp.ones_like, lorax.split(t)[0])
      >>> s = lorax.update_importance(s, t, g)
      >>> lorax.mask_to_budget(t, s, 3)["w"].kept_rank
      3
    """
    what = "lorax.mask_to_budget"
    leaves = _leaves(tree, what)
    if set(leaves) != set(state.sensitivity):
        raise LoraxValueError(
            f"{what}: the tree's AdaLoRA paths {sorted(leaves)[:8]} are not the state's "
            f"{sorted(state.sensitivity)[:8]}; make the state with AdaLoraState.init(tree)"
        )
    for path, leaf in leaves.items():
        if leaf.mask is None or leaf.e is None:
            raise LoraxValueError(
                f"{what}: the AdaLoraWeight at '{path}' has no mask or e: pass the whole "
                "tree, lorax.combine(trainable, frozen), not one half of lorax.split"
            )
    scores = {path: triplet_scores(state, leaf, path) for path, leaf in leaves.items()}
    flat = jnp.concatenate([s.reshape(-1) for s in scores.values()])
    n = flat.shape[0]
    k = n - jnp.asarray(budget, jnp.int32)  # how many to prune
    threshold = jnp.sort(flat)[jnp.clip(k - 1, 0, n - 1)]  # torch.kthvalue(flat, k)

    def update(key_path: Any, x: Any) -> Any:
        if not isinstance(x, AdaLoraWeight):
            return x
        keep = (scores[path_str(key_path)] > threshold) | (k <= 0)
        return x.replace(
            mask=keep.astype(x.mask.dtype), e=jnp.where(keep, x.e, jnp.zeros_like(x.e))
        )

    return jax.tree_util.tree_map_with_path(update, tree, is_leaf=is_lorax_leaf)


def _budget(
    step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total: int
) -> int:
    """peft's ``budget_schedule`` (its budget), in Python floats as peft computes it."""
    if step <= tinit:
        return init_budget
    if step > total - tfinal:
        return target_budget
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * (mul_coeff**3) + target_budget)


def budget_at(
    step: Any,
    /,
    *,
    init_budget: int,
    target_budget: int,
    tinit: int,
    tfinal: int,
    total_step: int,
) -> Any:
    """The number of triplets to keep at ``step``: peft's cubic ``budget_schedule``.

    ``init_budget`` through step ``tinit``, then
    ``int((init - target) * (1 - (step - tinit) / (total_step - tfinal - tinit))**3 +
    target)``, and ``target_budget`` after step ``total_step - tfinal``.

    Args:
      step: the step, a Python int (gives an int) or a traced integer (gives an int32
        array, read from a table of every step's budget, so it equals peft's float64
        arithmetic exactly).
      init_budget: the triplets at the start (``AdaLoraState.init_budget``).
      target_budget: the triplets at the end (``AdaLoraState.target_budget``).
      tinit: warm-up steps without pruning.
      tfinal: final steps with the ranks fixed.
      total_step: the steps of the whole run.

    Returns:
      The budget.

    Raises:
      LoraxValueError: steps that leave no budgeting phase (peft's ``AdaLoraConfig``
        refuses them), or negative counts.

    Example:
      >>> import lorax
      >>> [lorax.budget_at(s, init_budget=48, target_budget=32, tinit=2, tfinal=2,
      ...                  total_step=10) for s in range(0, 11, 2)]
      [48, 48, 36, 32, 32, 32]
    """
    what = "lorax.budget_at"
    for name, value in (
        ("init_budget", init_budget),
        ("target_budget", target_budget),
        ("tinit", tinit),
        ("tfinal", tfinal),
    ):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise LoraxTypeError(f"{what}: {name} must be an int; got {value!r}")
        if value < 0:
            raise LoraxValueError(f"{what}: {name} must be >= 0; got {value!r}")
    total_step = positive_int(total_step, f"{what}: total_step")
    if tinit >= total_step - tfinal:
        raise LoraxValueError(
            f"{what}: tinit={tinit}, tfinal={tfinal} and total_step={total_step} leave no "
            "budgeting phase (tinit < total_step - tfinal is needed, as peft's)"
        )
    args = (int(init_budget), int(target_budget), int(tinit), int(tfinal), total_step)
    if isinstance(step, numbers.Integral) and not isinstance(step, (bool, np.bool_)):
        return _budget(int(step), *args)
    table = np.asarray([_budget(s, *args) for s in range(total_step + 1)], np.int32)
    index = jnp.clip(jnp.asarray(step).astype(jnp.int32), 0, total_step)
    return jnp.asarray(table)[index]


def orthogonal_regularizer(tree: Any, /) -> Array:
    """peft's orthogonal regularization of ``P`` and ``Q``:
    ``mean(||a^T a - I||_F, ||b b^T - I||_F)`` over every AdaLoRA weight and stacked layer
    (peft sums the Frobenius norms, not squared, of each ``lora_A`` and ``lora_B`` and
    divides by their count). Add ``orth_reg_weight`` times it to the loss.

    Args:
      tree: the tree, or its trainable half (only ``a`` and ``b`` are read).

    Returns:
      A float32 scalar.

    Raises:
      LoraxValueError: the tree has no AdaLoRA leaves.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> t = lorax.adalora({"w": jnp.ones((8, 8))}, init_rank=4, target_rank=2)
      >>> t = {"w": t["w"].replace(a=jnp.eye(8, 4), b=jnp.eye(4, 8))}
      >>> float(lorax.orthogonal_regularizer(t))
      0.0
    """
    leaves = _leaves(tree, "lorax.orthogonal_regularizer")
    total, count = jnp.zeros((), jnp.float32), 0
    hi = jax.lax.Precision.HIGHEST
    for leaf in leaves.values():
        n, r = _layers(leaf), leaf.rank
        a = leaf.a.astype(jnp.float32).reshape(n, -1, r)
        b = leaf.b.astype(jnp.float32).reshape(n, r, -1)
        eye = jnp.eye(r, dtype=jnp.float32)
        for cov in (
            jnp.einsum("lir,lis->lrs", a, a, precision=hi),
            jnp.einsum("lro,lso->lrs", b, b, precision=hi),
        ):
            sq = jnp.sum(jnp.square(cov - eye[None]), axis=(1, 2))
            safe = jnp.where(sq > 0, sq, 1.0)  # the norm's gradient at 0 is 0, not NaN
            total = total + jnp.sum(jnp.where(sq > 0, jnp.sqrt(safe), 0.0))
            count += n
    return total / count


def kept_ranks(tree: Any, /) -> dict[str, int]:
    """The rank each AdaLoRA weight keeps, by path (summed over stacked layers).

    Example:
      >>> import jax.numpy as jnp
      >>> from lorax.methods.adalora import adalora, kept_ranks
      >>> kept_ranks(adalora({"w": jnp.ones((8, 8))}, init_rank=4, target_rank=2))
      {'w': 4}
    """
    out = {}
    for path, leaf in _leaves(tree, "lorax.methods.adalora.kept_ranks").items():
        kept = leaf.kept_rank
        if kept is not None:
            out[path] = kept
    return out
