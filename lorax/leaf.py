"""The leaf protocol: what a lorax leaf declares, and the one hook through which it acts.

A lorax leaf stands in for a dense weight: a frozen dataclass, registered as a pytree with
:func:`register_leaf`, that holds arrays (its data fields) and static metadata (fields made
with :func:`static_field`). What the interpreter (``lorax.transform``) and the tree tools
(``lorax.tree``, ``lorax.io.checkpoint``, ``lorax.report``) need from a kind, it declares:

========================  ===============================================================
``kind``                  stable registered name, written into checkpoints
``trainable_fields``      the data fields that are trained (split into the first half)
``frozen_fields``         the other data fields (derived by ``register_leaf``)
``static_fields``         the static metadata fields (derived by ``register_leaf``)
``optional_fields``       data fields that a whole leaf may leave None (a factor that
                          one layout of the kind does without, as LoKr's ``w1_b``)
``has_dense_form``        False when no dense weight exists (bottleneck adapters); then
                          ``materialize`` raises :class:`~lorax.NotMergeableError` saying why
``dense_is_free``         True when ``materialize`` costs nothing (``lorax.Unfrozen``), so
                          densifying is no cause for a warning
``stack_ndim``            leading layer axes (``nn.scan`` stacks) that ``lax.scan`` may slice
``shape`` / ``dtype``     those of the dense weight
``materialize()``         the dense weight
``misfit()``              why the trainable arrays do not fit the frozen ones, or None
``handle_primitive(c)``   the one hook: compute primitive call ``c`` without the dense
                          weight, or return ``NotImplemented``
``ragged_dot_general``    a method it dispatches to, as ``dot_general``: the grouped
                          (mixture-of-experts) product ``ragged_dot(x, W, group_sizes)``
                          with the leaf as the expert weight ``W``, or ``NotImplemented``
``field_axes(axes)``      given a label per axis of the dense weight (mesh axes, logical
                          names or None), the labels of each array field's axes: how
                          partition specs, Flax boxes and sharding constraints carry over
``slices_locally(axes)``  whether ``shard_map`` may run on the fields' per-shard slices
``slice`` ... ``split``   the structural methods it dispatches to (``slice``,
                          ``dynamic_slice``, ``squeeze``, ``expand_dims``, ``concatenate``,
                          ``split``): the part as a leaf (or an array), or ``NotImplemented``
========================  ===============================================================

The interpreter asks, for an equation that consumes a leaf: the rule registered for the
primitive (``lorax.register_rule``), then each leaf's ``handle_primitive``, then it densifies.
The base class's ``handle_primitive`` dispatches seven primitives to methods a kind may
override (``dot_general``, ``conv_general_dilated``, ``gather``, ``astype``, ``transpose``,
``reshape``, ``ragged_dot_general``); a kind that needs another primitive overrides
``handle_primitive`` itself.
Leaves know nothing of the interpreter: a :class:`PrimitiveCall` carries the operands, the
params and a ``bind`` callback that applies the original primitive to plain arrays.

Indexing and assembling weights (``w[k]``, ``params[i]`` over a stack, ``jnp.split``,
``jnp.concatenate``) reach the structural methods, each returning the part as a leaf, an
array, or ``NotImplemented``: ``slice``, ``dynamic_slice`` (a traced index), ``squeeze``,
``expand_dims`` (a ``broadcast_in_dim`` that only adds size-1 axes), ``split`` (by default
one ``slice`` per part) and ``concatenate`` (``stack`` too, as ``expand_dims`` of every
operand and a ``concatenate``). ``concatenate`` gets all operands, arrays and leaves of any
kind, and is asked of each lazy operand in turn until one answers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax.errors import LoraxKeyError, LoraxTypeError, LoraxValueError

Array = jax.Array
Bind = Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class PrimitiveCall:
    """One application of a primitive to operands among which is a lorax leaf.

    Attributes:
      primitive: the ``jax.extend.core.Primitive``.
      params: its params (``dimension_numbers``, ``new_dtype``, ...).
      invals: the operands in order: arrays and lorax leaves.
      position: the index in ``invals`` of the leaf being asked.
      out_avals: shape and dtype of each output (``ShapeDtypeStruct``-like).
      bind: ``bind(*arrays, **param_overrides) -> list``: the primitive on plain arrays.
      key: ``key() -> PRNG key or None``: the dropout key of this call (None: no dropout).
    """

    primitive: Any
    params: Mapping[str, Any]
    invals: tuple[Any, ...]
    position: int
    out_avals: tuple[Any, ...]
    bind: Callable[..., list]
    key: Callable[[], Any] = lambda: None

    @property
    def name(self) -> str:
        return self.primitive.name

    def bind_one(self, *arrays: Any) -> Array:
        """``bind`` for a primitive with one result."""
        return self.bind(*arrays)[0]


class LoraxLeaf:
    """Base class of every lorax leaf kind (see the module docstring for the protocol).

    Subclasses are made frozen dataclass pytrees with :func:`register_leaf`; they set
    ``trainable_fields`` and implement ``shape``, ``dtype`` and ``materialize``.
    """

    kind: ClassVar[str] = ""
    trainable_fields: ClassVar[tuple[str, ...]] = ()
    frozen_fields: ClassVar[tuple[str, ...]] = ()
    static_fields: ClassVar[tuple[str, ...]] = ()
    optional_fields: ClassVar[tuple[str, ...]] = ()
    has_dense_form: ClassVar[bool] = True
    dense_is_free: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def dtype(self) -> Any:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stack_ndim(self) -> int:
        """Leading layer axes along which every array field may be sliced (0: none)."""
        return 0

    def materialize(self) -> Array:
        """The dense weight this leaf stands for, in ``self.dtype``."""
        raise NotImplementedError

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def misfit(self) -> str | None:
        """Why the trainable arrays cannot go with the frozen ones (e.g. an adapter of
        another rank), or None. Shapes only: it is called under jit. Kinds extend it."""
        for name in self.trainable_fields:  # e.g. factors cast to int by mistake
            dtype = getattr(getattr(self, name), "dtype", None)
            if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
                return f"the trainable {name} is {dtype}; expected a floating dtype"
        return None

    def field_axes(self, axes: tuple[Any, ...]) -> dict[str, Any]:
        """The axis labels of each array field, from one label per axis of the dense weight.

        ``axes`` has ``self.ndim`` entries: mesh axis names, logical names, None, or tuples
        of them. The answer maps each non-None data field to a tuple with one entry per axis
        of that field (an entry may be a tuple of labels: an axis that several dense axes
        fold into, as NF4's flat codes); a field that is itself a lorax leaf gets the dense
        ``axes`` and answers for its own fields. ``lorax.partition_specs``, Flax's boxes and
        the interpreter's ``sharding_constraint`` / ``shard_map`` rules all derive from it.

        The default fits leaves whose fields have the dense shape (labels as given) or are
        scalars (no axes); kinds with factors of other shapes override it.
        """
        out: dict[str, Any] = {}
        for name in (*self.trainable_fields, *self.frozen_fields):
            x = getattr(self, name)
            if x is None:
                continue
            shape = tuple(getattr(x, "shape", ()))
            if is_lorax_leaf(x) or shape == tuple(self.shape):
                out[name] = tuple(axes)
            elif shape == ():
                out[name] = ()
            else:
                raise LoraxTypeError(
                    f"lorax: the {self.kind} leaf kind does not say how the axes of its "
                    f"field {name!r} {shape} relate to the dense weight's {tuple(self.shape)}; "
                    "define field_axes(axes) on the kind to shard it"
                )
        return out

    def slices_locally(self, axes: tuple[Any, ...]) -> bool:
        """Whether a ``shard_map`` body may compute with this leaf's per-shard slices, each
        field sliced by its derived spec along the dense axes that ``axes`` labels (non-None):
        true when the per-shard results add up as the dense weight's slices would (a kind
        linear in its weight, as LoRA). DoRA's column norm over a sliced input axis, or a
        nonlinearity between a bottleneck's projections, are not: those say False and the
        interpreter densifies (or refuses) instead of computing a wrong result."""
        return True

    def handle_primitive(self, call: PrimitiveCall) -> Any:
        """Computes ``call`` on the dense weight without forming it, or ``NotImplemented``.

        Returns a value (or a list, for a primitive with several results) of the shapes and
        dtypes in ``call.out_avals``; a lorax leaf may stand in for an array result.
        """
        method = _METHODS.get(call.name)
        return NotImplemented if method is None else method(self, call)

    # The methods handle_primitive dispatches to; NotImplemented means "densify".
    def dot_general(
        self,
        other: Array,
        *,
        dimension_numbers: Any,
        leaf_is_lhs: bool,
        precision: Any,
        preferred_element_type: Any,
        bind: Bind,
        rng: Any = None,
    ) -> Array:
        return NotImplemented

    def conv_general_dilated(
        self,
        lhs: Array,
        *,
        dimension_numbers: Any,
        feature_group_count: int,
        batch_group_count: int,
        bind: Bind,
    ) -> Array:
        return NotImplemented

    def gather(self, indices: Array, *, params: Mapping[str, Any], bind: Bind) -> Array:
        return NotImplemented

    def astype(self, dtype: Any) -> LoraxLeaf:
        return NotImplemented

    def transpose(self, permutation: Sequence[int]) -> LoraxLeaf:
        return NotImplemented

    def reshape(self, new_sizes: Sequence[int]) -> LoraxLeaf:
        return NotImplemented

    # Structural methods: each returns the part of the dense weight it stands for, as a
    # leaf (or an array, e.g. a few dequantized rows), or NotImplemented ("densify").
    def slice(
        self,
        start_indices: Sequence[int],
        limit_indices: Sequence[int],
        strides: Sequence[int] | None,
    ) -> Any:
        """``lax.slice`` (``w[k]`` is a size-1 slice, then a ``squeeze``)."""
        return NotImplemented

    def dynamic_slice(self, start_indices: Sequence[Any], slice_sizes: Sequence[int]) -> Any:
        """``lax.dynamic_slice`` at traced (or constant) ``start_indices``, one scalar per
        axis, clamped as the primitive clamps them (``params[i]`` with a traced ``i``)."""
        return NotImplemented

    def squeeze(self, dimensions: Sequence[int]) -> Any:
        """``lax.squeeze``: drops the size-1 axes ``dimensions``."""
        return NotImplemented

    def expand_dims(self, dimensions: Sequence[int]) -> Any:
        """New size-1 axes at ``dimensions``, positions in the result (``w[None]``)."""
        return NotImplemented

    def concatenate(self, operands: Sequence[Any], dimension: int) -> Any:
        """``lax.concatenate`` of ``operands`` (arrays and leaves, ``self`` among them)
        along ``dimension``. Each lazy operand is asked in turn, so a kind answers for
        the operands it understands and returns ``NotImplemented`` for the rest."""
        return NotImplemented

    def split(self, sizes: Sequence[int], axis: int) -> Any:
        """``lax.split`` into parts of ``sizes`` along ``axis``: a list, by default one
        :meth:`slice` per part (``NotImplemented`` if any part is)."""
        parts, start = [], 0
        for size in sizes:
            begin, end = [0] * self.ndim, list(self.shape)
            begin[axis], end[axis] = start, start + int(size)
            part = self.slice(tuple(begin), tuple(end), None)
            if part is NotImplemented:
                return NotImplemented
            parts.append(part)
            start += int(size)
        return parts

    def ragged_dot_general(
        self,
        lhs: Array,
        group_sizes: Array,
        *,
        params: Mapping[str, Any],
        bind: Bind,
        rng: Any = None,
    ) -> Array:
        """``ragged_dot_general(lhs, self, group_sizes)``: the grouped matmul of a
        mixture-of-experts layer, the leaf being the expert weight (the rhs). ``params`` are
        the equation's (``ragged_dot_dimension_numbers``, ``precision``, ...), ``bind``
        applies it to plain ``(lhs, rhs, group_sizes)`` and ``rng`` is the dropout key."""
        return NotImplemented


def _dot_general(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    other = call.invals[1 - call.position]
    if is_lorax_leaf(other):  # a product of two leaves: no factored form
        return NotImplemented
    return leaf.dot_general(
        other,
        dimension_numbers=call.params["dimension_numbers"],
        leaf_is_lhs=call.position == 0,
        precision=call.params.get("precision"),
        preferred_element_type=call.params.get("preferred_element_type"),
        bind=call.bind_one,
        rng=call.key(),
    )


def _conv(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    if call.position != 1 or is_lorax_leaf(call.invals[0]):  # the leaf must be the kernel
        return NotImplemented
    return leaf.conv_general_dilated(
        call.invals[0],
        dimension_numbers=call.params["dimension_numbers"],
        feature_group_count=call.params["feature_group_count"],
        batch_group_count=call.params["batch_group_count"],
        bind=call.bind_one,
    )


def _gather(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    if call.position != 0 or is_lorax_leaf(call.invals[1]):  # rows of the leaf
        return NotImplemented
    return leaf.gather(call.invals[1], params=call.params, bind=call.bind_one)


def _ragged_dot(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    lhs, group_sizes = call.invals[0], call.invals[2]
    if call.position != 1 or is_lorax_leaf(lhs):  # the leaf must be the grouped weight
        return NotImplemented
    return leaf.ragged_dot_general(
        lhs, group_sizes, params=call.params, bind=call.bind_one, rng=call.key()
    )


def _reshape(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    if call.params.get("dimensions") is not None or len(call.invals) != 1:
        return NotImplemented
    return leaf.reshape(call.params["new_sizes"])


def _dynamic_slice(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    starts = call.invals[1:]
    if call.position != 0 or len(starts) != leaf.ndim or any(map(is_lorax_leaf, starts)):
        return NotImplemented  # the leaf must be the operand (and no dynamic sizes)
    return leaf.dynamic_slice(starts, call.params["slice_sizes"])


def _broadcast_in_dim(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    """``w[None]`` / ``jnp.expand_dims``: a ``broadcast_in_dim`` that only adds size-1 axes
    is ``expand_dims``; a real broadcast has no factored form."""
    shape, dims = tuple(call.params["shape"]), tuple(call.params["broadcast_dimensions"])
    if len(call.invals) != 1 or call.params.get("sharding") is not None:
        return NotImplemented
    new = tuple(p for p in range(len(shape)) if p not in dims)
    if (
        list(dims) != sorted(dims)
        or any(shape[p] != s for p, s in zip(dims, leaf.shape, strict=True))
        or any(shape[p] != 1 for p in new)
    ):
        return NotImplemented
    return leaf.expand_dims(new) if new else leaf


def _stack(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    """``jnp.stack``: a size-1 axis added to every operand, then ``concatenate``."""
    axis = int(call.params["axis"])
    parts = []
    for x in call.invals:
        part = x.expand_dims((axis,)) if is_lorax_leaf(x) else jnp.expand_dims(x, axis)
        if part is NotImplemented:
            return NotImplemented
        parts.append(part)
    head = parts[call.position]
    return head.concatenate(parts, axis) if is_lorax_leaf(head) else NotImplemented


def _split(leaf: LoraxLeaf, call: PrimitiveCall) -> Any:
    if call.position != 0 or len(call.invals) != 1:
        return NotImplemented
    return leaf.split([int(s) for s in call.params["sizes"]], int(call.params["axis"]))


_METHODS: dict[str, Callable[[LoraxLeaf, PrimitiveCall], Any]] = {
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "convert_element_type": lambda leaf, call: leaf.astype(call.params["new_dtype"]),
    "transpose": lambda leaf, call: leaf.transpose(call.params["permutation"]),
    "reshape": _reshape,
    "slice": lambda leaf, call: leaf.slice(
        call.params["start_indices"], call.params["limit_indices"], call.params.get("strides")
    ),
    "dynamic_slice": _dynamic_slice,
    "squeeze": lambda leaf, call: leaf.squeeze(call.params["dimensions"]),
    "broadcast_in_dim": _broadcast_in_dim,
    "concatenate": lambda leaf, call: leaf.concatenate(call.invals, call.params["dimension"]),
    "stack": _stack,
    "split": _split,
    "ragged_dot_general": _ragged_dot,
    "copy": lambda leaf, call: leaf,  # a copy of an immutable leaf is the leaf
    "copy_p": lambda leaf, call: leaf,
}


def input_product(
    dimension_numbers: Any, *, leaf_is_lhs: bool, stack_ndim: int, in_ndim: int
) -> bool:
    """Whether a ``dot_general`` is ``x @ W`` over W's ``in_ndim`` leading axes exactly (the
    leaf on the right, no batch axes, no stack): the one product the kinds that act on a
    layer's output (IA3, DoRA, bottleneck adapters, multi-LoRA) can compute unmerged."""
    (_, rc), (lb, rb) = dimension_numbers
    return (
        not leaf_is_lhs
        and not stack_ndim
        and not lb
        and not rb
        and sorted(int(c) for c in rc) == list(range(in_ndim))
    )


def layer_gather(
    shape: Sequence[int], stack_ndim: int, indices: Array, params: Mapping[str, Any]
) -> Callable[[Array, Any], Array] | None:
    """For a gather that picks whole layers of a stack (``jnp.take(params, i, axis=0)``,
    ``params[ids]``): ``take(x, fill)``, the same gather on any field ``x`` that leads with
    the same ``stack_ndim`` axes (its other axes taken whole, last in the result as in the
    weight's), ``fill`` the value of out-of-range layers under ``FILL_OR_DROP``. None when
    the gather touches other axes or reorders them."""
    dnums, sizes = params["dimension_numbers"], tuple(int(s) for s in params["slice_sizes"])
    touched = (
        set(dnums.collapsed_slice_dims)
        | set(dnums.start_index_map)
        | set(getattr(dnums, "operand_batching_dims", ()))
    )
    n_tail = len(shape) - stack_ndim
    offset = tuple(int(o) for o in dnums.offset_dims)
    out_nd = indices.ndim - 1 + len(offset)
    if (
        not touched <= set(range(stack_ndim))
        or sizes[stack_ndim:] != tuple(shape[stack_ndim:])
        or offset[len(offset) - n_tail :] != tuple(range(out_nd - n_tail, out_nd))
    ):
        return None
    lead = offset[: len(offset) - n_tail]  # where the stack axes not indexed go

    def take(x: Array, fill: Any) -> Array:
        tail = x.ndim - stack_ndim
        return jax.lax.gather(
            x,
            indices,
            dnums._replace(
                offset_dims=lead + tuple(range(out_nd - n_tail, out_nd - n_tail + tail))
            ),
            sizes[:stack_ndim] + tuple(x.shape[stack_ndim:]),
            indices_are_sorted=params.get("indices_are_sorted", False),
            unique_indices=params.get("unique_indices", False),
            mode=params.get("mode"),
            fill_value=fill,
        )

    return take


def row_lookup(leaf: Any, indices: jax.Array, params: Any) -> tuple[jax.Array, int, Any] | None:
    """``(row ids, axis of the row's values in the result, fill)`` when a gather takes
    whole rows of a 2-D (unstacked) table by one index each, the embedding lookup; else
    None. ``fill`` is the value of out-of-range rows under ``FILL_OR_DROP`` (as Flax's
    ``nn.Embed`` gathers), None when they are clamped."""
    dnums, sizes = params["dimension_numbers"], tuple(params["slice_sizes"])
    if leaf.stack_ndim or len(leaf.shape) != 2 or indices.ndim < 1 or indices.shape[-1] != 1:
        return None
    if (
        tuple(dnums.collapsed_slice_dims) != (0,)
        or tuple(dnums.start_index_map) != (0,)
        or tuple(getattr(dnums, "operand_batching_dims", ())) != ()
        or sizes != (1, leaf.shape[1])
        or len(dnums.offset_dims) != 1
    ):
        return None
    mode = params.get("mode")
    fill = None
    if mode is not None and "FILL" in str(mode).upper():
        fill = params.get("fill_value")
        fill = float("nan") if fill is None else fill
    ids = indices[..., 0]
    return ids, int(dnums.offset_dims[0]), fill


def fills(params: Mapping[str, Any]) -> bool:
    """Whether a gather's out-of-range indices read a fill value (``FILL_OR_DROP``)."""
    mode = params.get("mode")
    return mode is not None and "FILL" in str(mode).upper()


class OverBase(LoraxLeaf):
    """A leaf made of a frozen ``base`` (array or lorax leaf, e.g. NF4) plus trainable parts:
    shape and dtype are the base's, and ``cast_fields`` are the arrays a cast converts."""

    cast_fields: ClassVar[tuple[str, ...]] = ()
    base: Any  # declared by each kind as its first field

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    def base_dot(
        self,
        other: Array,
        *,
        dimension_numbers: Any,
        leaf_is_lhs: bool,
        precision: Any,
        preferred_element_type: Any,
        bind: Bind,
    ) -> Array:
        """``dot_general`` with the base alone (NotImplemented if a base leaf cannot)."""
        if isinstance(self.base, LoraxLeaf):
            return self.base.dot_general(
                other,
                dimension_numbers=dimension_numbers,
                leaf_is_lhs=leaf_is_lhs,
                precision=precision,
                preferred_element_type=preferred_element_type,
                bind=bind,
            )
        return bind(self.base, other) if leaf_is_lhs else bind(other, self.base)

    def base_apply(
        self, on_array: Callable[[Array], Any], on_leaf: Callable[[LoraxLeaf], Any] | None = None
    ) -> Any:
        """Applies an op to the base: an array, or a base leaf (densified if it lacks a
        method for the op, since the base is frozen and typically quantized)."""
        if not isinstance(self.base, LoraxLeaf):
            return on_array(self.base)
        if on_leaf is not None:
            out = on_leaf(self.base)
            if out is not NotImplemented:
                return out
        return on_array(self.base.materialize())

    def astype(self, dtype: Any) -> LoraxLeaf:
        if not jnp.issubdtype(dtype, jnp.floating):
            return NotImplemented
        base = self.base.astype(dtype)
        if base is NotImplemented:
            return NotImplemented
        return self.replace(
            base=base, **{name: getattr(self, name).astype(dtype) for name in self.cast_fields}
        )


LEAF_KINDS: dict[str, type] = {}  # kind name (and legacy aliases) -> class


def register_leaf(
    cls: type | None = None, /, *, kind: str | None = None, aliases: Sequence[str] = ()
) -> Any:
    """Makes ``cls`` a frozen dataclass pytree and registers it as a leaf kind.

    Fields made with :func:`static_field` become aux data; every other field is a child, so
    key paths name the fields. ``frozen_fields`` and ``static_fields`` are derived here.

    Args:
      cls: a subclass of :class:`LoraxLeaf` (when used as a bare decorator).
      kind: the stable name checkpoints record (default: the class name). Renaming the
        class later keeps old checkpoints readable as long as ``kind`` stays.
      aliases: older names of the same kind that checkpoints may hold.

    Returns:
      The registered class, or a decorator when called with keywords only.

    Raises:
      LoraxTypeError: ``cls`` is not a LoraxLeaf subclass.
      LoraxValueError: a ``trainable_fields`` name is not a data field, or ``kind`` is
        already taken by another class.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> @lorax.register_leaf(kind="example.scaled")
      ... class Scaled(lorax.LoraxLeaf):
      ...     w: jnp.ndarray
      ...     s: jnp.ndarray
      ...     trainable_fields = ("s",)
      ...     shape = property(lambda self: self.w.shape)
      ...     dtype = property(lambda self: self.w.dtype)
      ...     def materialize(self):
      ...         return self.w * self.s
      >>> Scaled.kind, Scaled.frozen_fields
      ('example.scaled', ('w',))
    """

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, LoraxLeaf)):
            raise LoraxTypeError(
                f"lorax.register_leaf: expected a subclass of LoraxLeaf; got {cls!r}"
            )
        name = cls.__name__ if kind is None else kind
        if not isinstance(name, str) or not name:
            raise LoraxTypeError(f"lorax.register_leaf: kind must be a non-empty str; got {name!r}")
        cls = dataclasses.dataclass(frozen=True)(cls)
        fields = dataclasses.fields(cls)
        static = tuple(f.name for f in fields if f.metadata.get("static", False))
        data = tuple(f.name for f in fields if not f.metadata.get("static", False))
        unknown = [n for n in cls.trainable_fields if n not in data]
        if unknown:
            raise LoraxValueError(
                f"lorax.register_leaf: {cls.__name__}.trainable_fields names "
                f"{unknown}, which are not data fields (those are {data})"
            )
        for n in (name, *aliases):
            old = LEAF_KINDS.get(n)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise LoraxValueError(
                    f"lorax.register_leaf: the kind {n!r} is taken by "
                    f"{old.__module__}.{old.__qualname__}"
                )
        cls.kind = name
        cls.static_fields = static
        cls.frozen_fields = tuple(n for n in data if n not in cls.trainable_fields)
        for n in (name, *aliases):
            LEAF_KINDS[n] = cls
        return jax.tree_util.register_dataclass(
            cls, data_fields=list(data), meta_fields=list(static)
        )

    return register if cls is None else register(cls)


def leaf_kind(name: str) -> type:
    """The leaf class registered under ``name`` (a kind or one of its aliases).

    Raises:
      LoraxKeyError: no kind of that name (the message lists the known kinds).
    """
    cls = LEAF_KINDS.get(name) if isinstance(name, str) else None
    if cls is None:
        known = sorted({c.kind for c in LEAF_KINDS.values()})
        raise LoraxKeyError(
            f"lorax: no leaf kind is registered as {name!r} (known: {known}); "
            "import the module that registers it first"
        )
    return cls


def shape_of(x: Any) -> tuple[int, ...] | None:
    """The shape of an array field, or None for a hole (half of a split)."""
    return tuple(x.shape) if hasattr(x, "shape") else None


def unfit(trainable: str, base: tuple[int, ...]) -> str:
    """The ``misfit`` message of trainable arrays that do not go with the frozen base."""
    return (
        f"the trainable {trainable} and the frozen base {base} do not fit together (an "
        "adapter of another layout, or for another base?)"
    )


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static metadata (aux data), not an array child."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def is_lorax_leaf(x: Any) -> bool:
    """True for a lorax leaf (the ``is_leaf`` to use when mapping over wrapped trees)."""
    return isinstance(x, LoraxLeaf)


def materialize(x: Any) -> Any:
    """Dense value of a lorax leaf; anything else is returned unchanged."""
    return x.materialize() if is_lorax_leaf(x) else x
