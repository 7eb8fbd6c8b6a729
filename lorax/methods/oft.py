"""OFT (orthogonal fine-tuning, Qiu et al. 2023; Hugging Face peft's ``OFTConfig``): the
input of a frozen layer is rotated, block by block, before the layer,

    y = (x · R) · W,     R = diag(R_1, ..., R_n)     (n blocks of ``block_size`` inputs)

so the merged weight is ``R · W`` (lorax's ``[in, out]`` layout: the rotation acts on the
input axis). Each ``R_i`` is the Cayley transform of a skew-symmetric matrix ``Q_i`` whose
``b (b - 1) / 2`` upper-triangular entries are the trainable parameters, peft's layout
``oft_R.weight`` ``[n, b (b - 1) / 2]`` (``[1, ...]`` with ``block_share``), exactly as
peft 0.21's ``OFTRotationModule`` computes it:

- exact Cayley (``use_cayley_neumann=False``): ``R = (I - Q)(I + Q)^-1``, orthogonal;
- Cayley-Neumann (peft's default): ``R = I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1)`` with
  ``k = num_cayley_neumann_terms`` (peft's loop, whose ``k = 3`` and ``k = 4`` both stop at
  ``Q^3``); this is the series of ``(I + Q)(I - Q)^-1``, the *transpose* of the exact form's
  matrix, so the two options are different rotations for the same ``Q``, orthogonal only up
  to the truncation. lorax reproduces both as peft computes them.
- ``coft``: before the transform, each block's ``Q`` is projected into the Frobenius ball of
  radius ``eps / sqrt(n)``. peft writes the projection back into the parameter at each
  forward; a functional leaf cannot, so lorax projects inside the computation with a
  straight-through gradient (peft's gradient, taken at the projected values) and exports the
  projected values.
- ``module_dropout``: while training (``lorax.lora(fn)(..., dropout_rng=key)``), a random
  ``int(p · n)`` of the blocks are the identity, as peft's ``MultiplicativeDropoutLayer``
  (which peft 0.21 builds but its ``Linear.forward`` never calls: there it has no effect).

The product is computed as peft does, without the ``[in, in]`` matrix: ``x`` is reshaped to
``(..., n, b)`` and multiplied by the ``n`` small rotations, then the base layer runs. The
parameters start at zero, so ``R = I`` and the model starts unchanged. BOFT (butterfly
factors) is not implemented.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax._build import Site, build
from lorax._checks import floating_dtype, positive_int
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import OverBase, materialize, register_leaf, shape_of, static_field, unfit
from lorax.targets import Targets


def n_elements(block_size: int) -> int:
    """The trainable entries of one block: ``b (b - 1) / 2`` (a skew matrix's upper half)."""
    return block_size * (block_size - 1) // 2


def block_size_of(n: int) -> int | None:
    """The block size ``b`` with ``b (b - 1) / 2 == n``, or None if there is none."""
    b = (1 + math.isqrt(1 + 8 * int(n))) // 2
    return b if b >= 2 and n_elements(b) == n else None


def skew(vec: jax.Array, block_size: int) -> jax.Array:
    """``(..., n_elements)`` upper-triangular entries -> ``(..., b, b)`` skew matrices
    ``Q = U - U^T`` (entries in ``torch.triu_indices(b, b, 1)``'s row-major order)."""
    rows, cols = np.triu_indices(block_size, 1)
    upper = jnp.zeros((*vec.shape[:-1], block_size, block_size), vec.dtype)
    upper = upper.at[..., rows, cols].set(vec)
    return upper - jnp.swapaxes(upper, -1, -2)


def project(vec: jax.Array, eps: float) -> jax.Array:
    """COFT's projection (peft's ``_project_batch``): each block's ``Q`` scaled into the
    Frobenius ball of radius ``eps / sqrt(n)``, ``n`` the number of parameter blocks."""
    radius = eps / math.sqrt(vec.shape[-2])
    sq = 2.0 * jnp.sum(vec * vec, axis=-1, keepdims=True)  # ||Q||_F^2 = 2 ||vec||^2
    norm = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    return jnp.where(norm <= radius, vec, vec * (radius / norm)).astype(vec.dtype)


def cayley(vec: jax.Array, block_size: int, *, neumann: bool, terms: int) -> jax.Array:
    """peft's ``_cayley_batch``: the ``(..., b, b)`` rotations of ``(..., n_elements)``."""
    q = skew(vec, block_size)
    eye = jnp.broadcast_to(jnp.eye(block_size, dtype=q.dtype), q.shape)
    hi = jax.lax.Precision.HIGHEST
    if not neumann:  # (I - Q)(I + Q)^-1 = (I + Q)^-1 (I - Q): the factors commute
        return jnp.linalg.solve(eye + q, eye - q)
    r = eye
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            sq = jnp.matmul(q, q, precision=hi)
            r = r + 2.0 * sq
            power = sq
            for _ in range(3, terms - 1):
                power = jnp.matmul(power, q, precision=hi)
                r = r + 2.0 * power
            power = jnp.matmul(power, q, precision=hi)
            r = r + power
    return r


@register_leaf(kind="oft", aliases=("OftWeight",))
class OftWeight(OverBase):
    """A frozen base ``W`` ``(*stack, in, out)`` whose input is rotated by block-diagonal
    orthogonal matrices, peft's OFT.

    Attributes:
      base: the frozen weight, an array or lorax leaf (e.g. NF4).
      weight: the trainable ``(*stack, n, b (b - 1) / 2)``, peft's ``oft_R.weight``: ``n`` the
        number of blocks ``in / b``, or 1 with ``block_share``; zero at init.
      block_size: ``b``; static.
      coft, eps: constrained OFT and its radius; static.
      block_share: one rotation for every block; static.
      use_cayley_neumann, num_cayley_neumann_terms: the series in place of the exact Cayley
        transform; static.
      module_dropout: the fraction of blocks made the identity while training; static.
    """

    base: Any
    weight: Any
    block_size: int = static_field(default=32)
    coft: bool = static_field(default=False)
    eps: float = static_field(default=6e-5)
    block_share: bool = static_field(default=False)
    use_cayley_neumann: bool = static_field(default=True)
    num_cayley_neumann_terms: int = static_field(default=5)
    module_dropout: float = static_field(default=0.0)

    trainable_fields: ClassVar[tuple[str, ...]] = ("weight",)
    cast_fields: ClassVar[tuple[str, ...]] = ("weight",)

    @property
    def stack_ndim(self) -> int:
        return len(self.shape) - 2

    @property
    def n_blocks(self) -> int:
        """The number of blocks the input splits into, ``in / block_size``."""
        return int(self.shape[self.stack_ndim]) // self.block_size

    def misfit(self) -> str | None:
        problem = super().misfit()
        w, v = tuple(self.shape), shape_of(self.weight)
        if problem or v is None:
            return problem
        ns = len(v) - 2
        n = 1 if self.block_share else self.n_blocks
        want = w[:ns] + (n, n_elements(self.block_size))
        if ns < 0 or len(w) != ns + 2 or w[ns] % self.block_size or v != want:
            return unfit(f"weight {v} (expected {want}, block size {self.block_size})", w)
        return None

    def field_axes(self, axes):
        ns = self.stack_ndim
        return {"base": tuple(axes), "weight": (*axes[:ns], None, None)}

    def slices_locally(self, axes):
        return axes[self.stack_ndim] is None  # the rotation mixes the input features

    def parameters(self) -> jax.Array:
        """The parameters the rotation is computed from: ``weight``, projected by COFT
        (straight-through: the gradient is taken at the projected values, as peft's)."""
        acc = jnp.promote_types(self.weight.dtype, jnp.float32)
        vec = self.weight.astype(acc)
        if self.coft:
            vec = vec + jax.lax.stop_gradient(project(vec, self.eps) - vec)
        return vec

    def rotations(self, rng: Any = None) -> jax.Array:
        """The blocks ``(*stack, n, b, b)`` (``n`` = 1 with ``block_share``), float32 or
        wider; with ``rng`` and ``module_dropout``, some of them the identity."""
        r = cayley(
            self.parameters(),
            self.block_size,
            neumann=self.use_cayley_neumann,
            terms=self.num_cayley_neumann_terms,
        )
        d = r.shape[-3]
        drop = int(self.module_dropout * d)
        if rng is not None and drop and d > 1:  # peft: a block-shared rotation never drops
            perm = jax.random.permutation(rng, d)
            mask = (perm < drop).astype(r.dtype)[:, None, None]
            eye = jnp.eye(self.block_size, dtype=r.dtype)[None]
            r = (1 - mask) * r + mask * eye
        return r

    def rotate(self, x: jax.Array, axis: int, rng: Any = None) -> jax.Array:
        """``x`` with its ``axis`` (of size ``in``) rotated: ``x · R`` block by block."""
        r = self.rotations(rng).astype(x.dtype)
        moved = jnp.moveaxis(x, axis, -1)
        blocks = moved.reshape(*moved.shape[:-1], self.n_blocks, self.block_size)
        if self.block_share:
            out = jnp.einsum("...rk,kc->...rc", blocks, r[0])
        else:
            out = jnp.einsum("...rk,rkc->...rc", blocks, r)
        return jnp.moveaxis(out.reshape(moved.shape), -1, axis)

    def materialize(self) -> jax.Array:
        base = materialize(self.base)
        ns, b = self.stack_ndim, self.block_size
        r = self.rotations()
        r = jnp.broadcast_to(r, (*r.shape[:-3], self.n_blocks, b, b))
        acc = jnp.promote_types(base.dtype, jnp.float32)
        w = base.astype(acc).reshape(*base.shape[:ns], self.n_blocks, b, base.shape[-1])
        merged = jnp.einsum(
            "...rkc,...rco->...rko", r.astype(acc), w, precision=jax.lax.Precision.HIGHEST
        )
        return merged.reshape(base.shape).astype(base.dtype)

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
        (lc, rc), (lb, rb) = dimension_numbers
        wc, xc = (lc, rc) if leaf_is_lhs else (rc, lc)
        if self.stack_ndim or lb or rb or 0 not in [int(c) for c in wc]:
            return NotImplemented  # only products that contract W's input axis, unstacked
        axis = int(xc[[int(c) for c in wc].index(0)])
        rotated = self.rotate(other, axis, rng)  # sum_i x_i (R W)_io = sum_i (x R)_i W_io
        return self.base_dot(
            rotated,
            dimension_numbers=dimension_numbers,
            leaf_is_lhs=leaf_is_lhs,
            precision=precision,
            preferred_element_type=preferred_element_type,
            bind=bind,
        )


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise LoraxTypeError(f"{what} must be True or False; got {type(value).__name__} {value!r}")
    return bool(value)


def _check_fraction(value: Any, what: str, *, closed: bool) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise LoraxTypeError(f"{what} must be a float; got {type(value).__name__} {value!r}")
    value = float(value)
    ok = (0.0 <= value < 1.0) if closed else (0.0 < value < math.inf)
    if not ok:
        want = "in [0, 1)" if closed else "a positive finite float"
        raise LoraxValueError(f"{what} must be {want}; got {value!r}")
    return value


def oft(
    params: Any,
    /,
    *,
    targets: Targets,
    block_size: int | None = None,
    r: int | None = None,
    coft: bool = False,
    eps: float = 6e-5,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    module_dropout: float = 0.0,
    dtype: Any = None,
) -> Any:
    """Returns ``params`` with OFT leaves (block-diagonal input rotations) on the targets.

    Args:
      params: the base parameters.
      targets: as for ``lorax.wrap`` (e.g. ``["q_proj", "v_proj"]``); each targeted weight
        must be a 2-D kernel per layer ``[in, out]`` (scanned stacks allowed).
      block_size: the size ``b`` of each rotation block, peft's ``oft_block_size``; it must
        divide every targeted weight's input size. Default 32 (when ``r`` is not given).
      r: the number of blocks instead (``b = in / r`` per weight), peft's ``r``; give one of
        ``block_size`` and ``r``.
      coft: constrained OFT: the rotations stay within ``eps`` of the identity.
      eps: COFT's radius (peft's default 6e-5).
      block_share: one rotation shared by all blocks of a weight.
      use_cayley_neumann: the Cayley-Neumann series (peft's default) instead of the exact
        Cayley transform; see the module docstring for how the two differ.
      num_cayley_neumann_terms: terms of the series (peft's default 5).
      module_dropout: the fraction of blocks made the identity while training (with a
        ``dropout_rng`` to ``lorax.lora(fn)``).
      dtype: dtype of the parameters; default the base's promoted to at least float32.

    Returns:
      The tree with :class:`OftWeight` leaves (parameters zero: the model is unchanged).

    Raises:
      LoraxValueError: both or neither of ``block_size`` / ``r`` valid, a block size that
        does not divide a weight's input size (the path and sizes named), a weight that is
        not 2-D per layer, targets that select nothing.
      LoraxTypeError: an option of the wrong type.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> p = {"q": {"kernel": jnp.ones((8, 6))}, "v": {"kernel": jnp.ones((8, 4))}}
      >>> t = lorax.oft(p, targets=["q", "v"], block_size=4)
      >>> t["q"]["kernel"].weight.shape   # 2 blocks of 4 inputs, 4 * 3 / 2 entries each
      (2, 6)
      >>> bool(jnp.allclose(lorax.merge(t)["q"]["kernel"], p["q"]["kernel"]))
      True
    """
    what = "lorax.oft"
    if block_size is not None and r is not None:
        raise LoraxValueError(
            f"{what}: give block_size or r, not both (r x block_size is the input size); "
            f"got block_size={block_size!r}, r={r!r}"
        )
    if r is not None:
        r = positive_int(r, f"{what}: r")
    else:
        block_size = positive_int(32 if block_size is None else block_size, f"{what}: block_size")
        if block_size < 2:
            raise LoraxValueError(
                f"{what}: block_size must be at least 2 (a 1 x 1 rotation is the identity); "
                f"got {block_size}"
            )
    coft = _check_bool(coft, f"{what}: coft")
    block_share = _check_bool(block_share, f"{what}: block_share")
    use_cayley_neumann = _check_bool(use_cayley_neumann, f"{what}: use_cayley_neumann")
    eps = _check_fraction(eps, f"{what}: eps", closed=False)
    module_dropout = _check_fraction(module_dropout, f"{what}: module_dropout", closed=True)
    terms = positive_int(num_cayley_neumann_terms, f"{what}: num_cayley_neumann_terms")
    dtype = floating_dtype(dtype, f"{what}: dtype")

    def make(site: Site) -> OftWeight:
        path, leaf = site.path, site.leaf
        ns = site.stack_axes()
        if len(leaf.shape) - ns != 2:
            raise LoraxValueError(
                f"{what}: '{path}' has shape {tuple(leaf.shape)} ({ns} stacked axes); OFT "
                "rotates the input of a 2-D kernel [in, out] per layer"
            )
        fan_in = int(leaf.shape[ns])
        if r is not None:
            if fan_in % r or fan_in // r < 2:
                raise LoraxValueError(
                    f"{what}: r={r} blocks do not split the input size {fan_in} of '{path}' "
                    "into blocks of at least 2 (r must divide it)"
                )
            b = fan_in // r
        else:
            assert block_size is not None
            b = block_size
            if fan_in % b:
                divisors = [d for d in range(2, fan_in + 1) if fan_in % d == 0][:12]
                raise LoraxValueError(
                    f"{what}: block_size={b} does not divide the input size {fan_in} of "
                    f"'{path}' (shape {tuple(leaf.shape)}); block sizes that do: {divisors}"
                )
        n = 1 if block_share else fan_in // b
        vdtype = dtype if dtype is not None else jnp.promote_types(leaf.dtype, jnp.float32)
        return OftWeight(
            leaf,
            jnp.zeros((*leaf.shape[:ns], n, n_elements(b)), vdtype),
            block_size=b,
            coft=coft,
            eps=eps,
            block_share=block_share,
            use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=terms,
            module_dropout=module_dropout,
        )

    return build(params, make, targets=targets, what=what)
