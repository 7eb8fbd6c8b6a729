"""Quantized frozen bases: NF4 (bit-for-bit the bitsandbytes scheme) and int8 absmax.

``lorax.quantize(params, "nf4")`` replaces the targeted weights by :class:`NF4Weight`
leaves holding uint8 packed codes and (double-)quantized block scales. Inside
``lorax.lora`` an NF4 weight is dequantized in the jitted program right where it is used,
under ``jax.checkpoint``, so the backward pass recomputes it instead of keeping a dense copy
of every layer alive. ``lorax.wrap`` adapts NF4 weights like dense ones: that is QLoRA.

The scheme (see docs/nf4.md): the weight is flattened row-major in PyTorch's ``[out, in]`` layout
(a Flax ``[in, out]`` kernel is transposed first; kernels of more axes are flattened as
they are), cut into blocks of ``block_size`` values, each scaled by its absmax and mapped to
the nearest of 16 NF4 levels (ties to the lower code), packed two per byte, high nibble
first. Double quantization stores the block absmaxes as uint8 codes of bitsandbytes' signed
8-bit dynamic map, in blocks of 256, around their mean.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax._build import Site, build
from lorax._checks import floating_dtype, require_finite
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.quant.formats import (
    DYNAMIC_MAP,
    NESTED_BLOCK,
    NF4_CODE,
    Int8Weight,
    NF4Weight,
    _mean_last,
    _nearest,
    _normalize,
    _to_torch_order,
)
from lorax.targets import Targets, from_function


def _compute_dtype(value: Any, where: str) -> str:
    """The name of ``value`` if it is a floating dtype (what quantized weights decode to)."""
    return floating_dtype(value, f"{where}: compute_dtype", optional=False).name


def _check_nf4_options(block_size: Any, double_quant: Any, where: str) -> None:
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
        raise LoraxTypeError(
            f"{where}: block_size must be an int, a power of two in [32, 4096]; "
            f"got {type(block_size).__name__} {block_size!r}"
        )
    if not 32 <= int(block_size) <= 4096 or int(block_size) & (int(block_size) - 1):
        raise LoraxValueError(
            f"{where}: block_size must be a power of two in [32, 4096]; got {block_size}"
        )
    if not isinstance(double_quant, (bool, np.bool_)):
        raise LoraxTypeError(
            f"{where}: double_quant must be a bool; got "
            f"{type(double_quant).__name__} {double_quant!r}"
        )


def _check_axes(value: Any, name: str, low: int, high: int, ndim: int, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise LoraxTypeError(f"{where}: {name} must be an int; got {value!r}")
    if not low <= int(value) <= high:
        raise LoraxValueError(
            f"{where}: {name} must be in [{low}, {high}] for a weight of {ndim} axes; got {value}"
        )
    return int(value)


def quantize_nf4(
    w: jax.Array,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: Any = jnp.bfloat16,
    stack: int = 0,
) -> NF4Weight:
    """NF4-quantizes one weight (per layer over ``stack`` leading axes), as bitsandbytes.

    A concrete ``w`` holding inf or NaN raises :class:`lorax.NonFiniteError`; under tracing
    (jit, ``lax.map``) the values are unknown and not checked.

    Example:
      >>> import jax, lorax
      >>> q = lorax.quant.quantize_nf4(jax.random.normal(jax.random.key(0), (64, 32)))
      >>> q.codes.shape, q.codes.dtype.name, q.absmax.dtype.name
      ((1024,), 'uint8', 'uint8')
    """
    where = "lorax.quant.quantize_nf4"
    _check_nf4_options(block_size, double_quant, where)
    dtype = _compute_dtype(compute_dtype, where)
    stack = _check_axes(stack, "stack", 0, max(jnp.ndim(w) - 1, 0), jnp.ndim(w), where)
    require_finite(w, f"{where}: w")
    return _nf4(w, int(block_size), bool(double_quant), dtype, stack)


# A concrete weight with more values per layer than this is quantized by pieces of about
# this many values (1M float32, 4 MB; see _nf4_by_pieces): the temporaries of the
# nearest-code search stay a few tens of MB instead of ten copies of the weight
PIECE = 1 << 20


def _nf4(
    w: jax.Array, block_size: int, double_quant: bool, compute_dtype: str, stack: int
) -> NF4Weight:
    layer_shape = tuple(int(s) for s in w.shape[stack:])
    tracer = jax.core.Tracer  # pyright: ignore[reportAttributeAccessIssue]
    if not isinstance(w, tracer) and math.prod(layer_shape) > PIECE:
        codes, absmax = _nf4_by_pieces(w, block_size, stack)
    else:
        codes, absmax = _nf4_codes(_to_torch_order(jnp.asarray(w, jnp.float32), stack), block_size)
    absmax, absmax2, offset = _nf4_scales(absmax, double_quant)
    return NF4Weight(
        codes=codes,
        absmax=absmax,
        absmax2=absmax2,
        offset=offset,
        layer_shape=layer_shape,
        block_size=block_size,
        compute_dtype=compute_dtype,
    )


def _nf4_codes(flat: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """(codes, absmax): the packed 4-bit codes of ``flat`` (float32, PyTorch order, the
    values of each layer on the last axis) and the float32 absmax of each block."""
    n = flat.shape[-1]
    nblocks = -(-n // block_size)
    lead = [(0, 0)] * (flat.ndim - 1)
    padded = jnp.pad(flat, [*lead, (0, nblocks * block_size - n)])
    blocks = padded.reshape(flat.shape[:-1] + (nblocks, block_size))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = _normalize(blocks, absmax)
    q = _nearest(NF4_CODE, normed).reshape(flat.shape[:-1] + (-1,))[..., :n]
    if n % 2:
        q = jnp.pad(q, [*lead, (0, 1)])
    pairs = q.reshape(q.shape[:-1] + (-1, 2))
    return ((pairs[..., 0] << 4) | pairs[..., 1]).astype(jnp.uint8), absmax


_nf4_codes_jit = jax.jit(_nf4_codes, static_argnums=1)


def _nf4_by_pieces(w: Any, block_size: int, stack: int) -> tuple[jax.Array, jax.Array]:
    """:func:`_nf4_codes` of a concrete weight, a layer and a run of whole blocks at a time:
    the same codes and absmax, with temporaries the size of a piece instead of ten copies
    of the weight (what loading a checkpoint with ``quantize="nf4"`` relies on)."""
    if stack:  # one layer at a time, stacked again
        layers = [_nf4_by_pieces(w[i], block_size, stack - 1) for i in range(w.shape[0])]
        return jnp.stack([c for c, _ in layers]), jnp.stack([a for _, a in layers])
    # a run of PyTorch-order values: for a 2-D kernel [in, out] the columns start:stop
    # (PyTorch's rows), else the flat values; each run starts on a block boundary
    rows, width = (w.shape[1], w.shape[0]) if w.ndim == 2 else (w.size, 1)
    step = block_size // math.gcd(width, block_size)  # rows per whole number of blocks
    per = max(step, (PIECE // width) // step * step)

    def run(start: int, stop: int) -> jax.Array:
        part = w[:, start:stop].T if w.ndim == 2 else jnp.ravel(w)[start:stop]
        return jnp.asarray(part, jnp.float32).reshape(-1)

    pieces = [_nf4_codes_jit(run(i, min(i + per, rows)), block_size) for i in range(0, rows, per)]
    return jnp.concatenate([c for c, _ in pieces]), jnp.concatenate([a for _, a in pieces])


def _nf4_scales(
    absmax: jax.Array, double_quant: bool
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(absmax, absmax2, offset): the block scales as stored, quantized to 8 bits around
    their mean (per layer) with ``double_quant``."""
    if not double_quant:
        return absmax, None, None
    nblocks = absmax.shape[-1]
    lead = [(0, 0)] * (absmax.ndim - 1)
    offset = _mean_last(absmax)
    centered = absmax - offset[..., None]
    nb2 = -(-nblocks // NESTED_BLOCK)
    cpad = jnp.pad(centered, [*lead, (0, nb2 * NESTED_BLOCK - nblocks)])
    cblocks = cpad.reshape(centered.shape[:-1] + (nb2, NESTED_BLOCK))
    absmax2 = jnp.max(jnp.abs(cblocks), axis=-1)
    normed2 = _normalize(cblocks, absmax2)
    codes = _nearest(DYNAMIC_MAP, normed2).reshape(cpad.shape)[..., :nblocks]
    return codes, absmax2, offset


def quantize_int8(
    w: jax.Array, compute_dtype: Any = jnp.bfloat16, stack: int = 0, in_axes: int = 1
) -> Int8Weight:
    """int8 absmax quantization with one scale per output channel (axes after ``in_axes``).

    A concrete ``w`` holding inf or NaN raises :class:`lorax.NonFiniteError`."""
    where = "lorax.quant.quantize_int8"
    dtype = _compute_dtype(compute_dtype, where)
    ndim = jnp.ndim(w)
    stack = _check_axes(stack, "stack", 0, max(ndim - 2, 0), ndim, where)
    in_axes = _check_axes(in_axes, "in_axes", 1, max(ndim - stack - 1, 1), ndim, where)
    require_finite(w, f"{where}: w")
    return _int8(w, dtype, stack, in_axes)


def _int8(w: jax.Array, compute_dtype: str, stack: int, in_axes: int) -> Int8Weight:
    w = jnp.asarray(w, jnp.float32)
    reduce = tuple(range(stack, stack + in_axes))
    scale = jnp.max(jnp.abs(w), axis=reduce, keepdims=True) / 127.0
    codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale)).astype(jnp.int8)
    return Int8Weight(codes=codes, scale=scale, compute_dtype=compute_dtype)


def quantize(
    params: Any,
    /,
    method: str = "nf4",
    *,
    targets: Targets = None,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: Any = jnp.bfloat16,
    stacked: Any = None,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
) -> Any:
    """Replaces the targeted weights of ``params`` by quantized frozen leaves.

    Args:
      params: any pytree of arrays (as ``lorax.wrap``).
      method: ``"nf4"`` (bitsandbytes NF4) or ``"int8"`` (absmax per output channel).
      block_size: NF4 values per block (a power of two, 32 ... 4096).
      double_quant: quantize the NF4 block scales too (4.127 instead of 4.5 bits/param).
      targets: as in ``lorax.wrap``; default every floating weight of rank >= 2 except
        embedding tables, biases and norm scales (by name), or with ``fn`` the weights it
        uses as matmul or convolution weights.
      fn, args: the model and an example input, as in ``lorax.wrap``: quantize what
        ``fn(params, *args)`` uses as a matmul or convolution weight (never a table it
        gathers rows from or a bias it adds).
      compute_dtype: floating dtype the weights are dequantized to inside the model.
      stacked: leading layer axes, as in ``lorax.wrap`` (each layer is quantized alone).

    Returns:
      The tree with :class:`NF4Weight` / :class:`Int8Weight` leaves where targeted; nothing
      else changes.

    Raises:
      lorax.NonFiniteError: a targeted weight holds inf or NaN (its blocks' scales would be
        inf/NaN); the message names its path. Checked on concrete arrays, not under jit.
      LoraxValueError, LoraxTypeError: a bad argument (the message names it).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 64)),
      ...                     "bias": jnp.zeros(64)}}
      >>> qp = lorax.quantize(params, "nf4")
      >>> type(qp["dense"]["kernel"]).__name__, qp["dense"]["kernel"].shape
      ('NF4Weight', (64, 64))
    """
    if not isinstance(method, str) or method not in ("nf4", "int8"):
        raise LoraxValueError(f"lorax.quantize: method must be 'nf4' or 'int8'; got {method!r}")
    _check_nf4_options(block_size, double_quant, "lorax.quantize")
    dtype = _compute_dtype(compute_dtype, "lorax.quantize")

    def make(site: Site) -> Any:
        path, leaf = site.path, site.leaf
        if is_lorax_leaf(leaf):
            raise LoraxValueError(
                f"lorax.quantize: '{path}' is already a {type(leaf).__name__}; "
                "quantize the dense tree before wrapping it"
            )
        stack = site.stack_axes(stacked)
        require_finite(leaf, f"lorax.quantize: '{path}'")
        if method == "nf4":
            return _nf4(leaf, int(block_size), bool(double_quant), dtype, stack)
        return _int8(leaf, dtype, stack, site.in_axes(stack))

    targets = from_function(targets, params, fn, args, "lorax.quantize")
    return build(params, make, targets=targets, what="lorax.quantize")


def dequantize(params: Any, /) -> Any:
    """Dense weights for every quantized leaf (alias of ``lorax.merge`` on such trees)."""
    from lorax.tree import merge

    return merge(params)
