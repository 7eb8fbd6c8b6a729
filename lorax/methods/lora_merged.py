"""LoRA products over many tokens: the update merged into the weight for one product.

``LoraWeight.dot_general`` computes ``x @ W + s (x @ A) @ B`` in three products: the base
one and two skinny ones. In a train step the skinny ones cost more than their FLOPs say:
``t @ B`` (forward) and ``dt @ A^T`` (backward) have ``K = r`` and write an output of the
activations' size, which the base product's output is then read again to be added to
(benchmarks/NOTES.md, attempts 4 and 8). When the product spans many tokens it is cheaper to
form ``W' = W + s A @ B`` for this one product, a weight-sized temporary, and to multiply by
it once:

- forward: ``y = x @ W'``, one GEMM of the base product's shape;
- backward: ``dx = g @ W'^T`` (one GEMM, ``W'`` recomputed rather than kept from the
  forward pass), ``dA = s x^T (g B^T)`` and ``dB = s (x A)^T g``, the factor gradients of
  the low-rank path, so the frozen base's gradient is still never formed.

Per product, with ``N`` tokens, ``n_in`` contracted and ``n_out`` free weight values, the
low-rank path's forward and backward do ``3 N r (n_in + n_out)`` multiply-adds besides the
base product; this one ``2 N r (n_in + n_out) + 2 n_in n_out r``. It is used when that is
less, ``N (n_in + n_out) >= 2 n_in n_out``: at least as many tokens as the harmonic mean of
the weight's input and output sizes (768 for GPT-2 small's 768 x 768 output projection,
1152 for its 768 x 2304 q, k, v projection, so a training batch of 8 x 1024 tokens merges
and decoding a few tokens does not). The temporary
is then no bigger than the activations the product reads and writes.

Two more conditions keep the results those of the low-rank path within float32 rounding:
the weight, the factors and ``x`` are float32 or wider (in bfloat16 an update smaller than
half a unit in the last place of ``W`` would round away in ``W'``), and no LoRA dropout is
active (dropout applies to the low-rank path's input only). Products that name their
sharding (explicit-axes meshes) and batched products (a dot_general with batch axes) keep
the low-rank path.

The rule is a ``jax.custom_jvp`` whose tangent is written in the low-rank form, so forward
mode, reverse mode, ``vmap`` and ``remat`` all work; the merged weight is recomputed in the
backward pass (a ``jax.checkpoint`` that keeps only ``x @ A``, named ``lorax_lowrank_t``),
so the program keeps no weight-sized residual. XLA's CPU backend may still share the
``A @ B`` product between the two passes: +6.8 % temporaries on a d=768 step in
benchmarks/NOTES.md attempt 8, -3 % at d=256.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from lorax.leaf import Array, Bind, LoraxLeaf, materialize

if TYPE_CHECKING:  # lora.py imports this module
    from lorax.methods.lora import LoraWeight

LOWRANK_T = "lorax_lowrank_t"  # the checkpoint name of s x @ A, the low-rank intermediate

# The low-rank path ``(leaf, x) -> s (x @ A) @ B`` for the product at hand (lora.py's).
LowRank = Callable[["LoraWeight", Array], Array]


def _wide(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize >= 4


def merge_pays(
    leaf: LoraWeight, x: Array, dimension_numbers: Any, leaf_is_lhs: bool, *, dropout: bool
) -> bool:
    """Whether ``dot_general(x, leaf)`` is cheaper with the update merged into the weight
    (see the module docstring for the cost model and the conditions).

    Args:
      leaf: the LoRA leaf.
      x: the other operand.
      dimension_numbers: the product's ``((lhs_contract, rhs_contract), (lhs_batch,
        rhs_batch))``.
      leaf_is_lhs: whether the leaf is the left operand.
      dropout: whether LoRA dropout is active in this product.

    Returns:
      True when the merged product is used.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    wc = lc if leaf_is_lhs else rc
    base = leaf.base
    if dropout or lb or rb or (isinstance(base, LoraxLeaf) and base.trainable_fields):
        return False
    if not all(_wide(d) for d in (x.dtype, leaf.dtype, leaf.a.dtype, leaf.b.dtype)):
        return False
    n_in = math.prod(int(leaf.shape[j]) for j in wc)
    n_out = math.prod(int(s) for s in leaf.shape) // max(n_in, 1)
    tokens = math.prod(int(s) for s in x.shape) // max(n_in, 1)
    return tokens * (n_in + n_out) >= 2 * n_in * n_out


def merged_dot_general(
    leaf: LoraWeight, x: Array, *, leaf_is_lhs: bool, bind: Bind, lowrank: LowRank
) -> Array:
    """``dot_general(x, W + s A @ B)`` (operands in the product's order) as one product
    with the merged weight, differentiated in the low-rank form.

    Args:
      leaf: the LoRA leaf; its base is an array or a frozen leaf (e.g. NF4), densified
        here for this product only.
      x: the other operand.
      leaf_is_lhs: whether the leaf is the left operand.
      bind: binds the product's primitive with its parameters to two arrays.
      lowrank: the low-rank path's product, ``s (x @ A) @ B`` for this product; its
        derivative with respect to the factors gives theirs.

    Returns:
      The product, as the low-rank path would compute it up to rounding.
    """

    def product(x: Array, w: Array) -> Array:
        return bind(w, x) if leaf_is_lhs else bind(x, w)

    def merged(base: Any, a: Array, b: Array) -> Array:
        return leaf.replace(base=base, a=a, b=b).materialize()

    @jax.custom_jvp
    def f(x: Array, base: Any, a: Array, b: Array) -> Array:
        return product(x, merged(base, a, b))

    def f_jvp(primals, tangents):
        x, base, a, b = primals
        dx, dbase, da, db = tangents
        w = merged(base, a, b)
        y = product(x, w)
        terms = []
        if not isinstance(dx, SymbolicZero):
            terms.append(product(dx, w))
        if not _all_zero(dbase):  # a base that is differentiated (not LoRA's frozen one)
            dw = jax.jvp(materialize, (base,), (_instantiate(dbase, base),))[1]
            terms.append(product(x, dw.astype(w.dtype)))
        if not (isinstance(da, SymbolicZero) and isinstance(db, SymbolicZero)):
            low = lambda a, b: lowrank(leaf.replace(base=base, a=a, b=b), x)  # noqa: E731
            dlow = jax.jvp(low, (a, b), (_instantiate(da, a), _instantiate(db, b)))[1]
            terms.append(dlow.astype(y.dtype))
        dy = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)
        return y, dy

    f.defjvp(f_jvp, symbolic_zeros=True)
    # Only x @ A is kept for the backward pass, which recomputes the merged weight from the
    # inputs: no weight-sized residual. (XLA's CPU backend may still share the A @ B product
    # between the two passes; benchmarks/NOTES.md, attempt 8.)
    policy = jax.checkpoint_policies.save_only_these_names(LOWRANK_T)
    return jax.checkpoint(f, policy=policy)(x, leaf.base, leaf.a, leaf.b)


def _all_zero(tangent: Any) -> bool:
    return all(
        isinstance(t, SymbolicZero)
        for t in jax.tree.leaves(tangent, is_leaf=lambda t: isinstance(t, SymbolicZero))
    )


def _instantiate(tangent: Any, primal: Any) -> Any:
    """A tangent with its symbolic zeros as arrays (float0 for integer fields)."""

    def one(t: Any, p: Any) -> Any:
        if not isinstance(t, SymbolicZero):
            return t
        if jnp.issubdtype(p.dtype, jnp.inexact):
            return jnp.zeros_like(p)
        return np.zeros(p.shape, jax.dtypes.float0)

    return jax.tree.map(one, tangent, primal, is_leaf=lambda t: isinstance(t, SymbolicZero))
