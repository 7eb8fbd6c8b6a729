"""Sharded training on JAX's SPMD machinery: partition specs for wrapped trees, placing them
on a mesh, Flax's partitioning boxes, and the interpreter's rules for sharding primitives.

Everything derives from one declaration per leaf kind, ``LoraxLeaf.field_axes``: given a
label for each axis of the dense weight (a mesh axis, a logical name, or None), the labels
of each array field's axes. LoRA's ``a`` takes the input axes' labels and None on the rank
axis; ``b`` None on the rank axis and the output axes' labels; stack (``nn.scan``) axes keep
theirs; NF4 codes and scales are cut along their flat axis by every mesh axis that shards
the dense weight. From it come:

* :func:`partition_specs`: a ``PartitionSpec`` tree of the wrapped tree's structure.
* :func:`shard`: the tree placed on a mesh with those specs (also from many processes).
* Flax boxes: ``lorax.wrap`` (and every constructor) of ``nn.Partitioned`` /
  ``nn.LogicallyPartitioned`` params boxes each field of the new leaf with its own names,
  so ``nn.get_partition_spec`` and ``nn.logical_to_mesh_sharding`` stay correct.
* The rules for ``sharding_constraint``, ``reshard`` and ``mesh_cast`` (each field gets the
  derived constraint), ``pvary`` (applied to each field) and ``shard_map`` (the body runs
  per shard on the leaf's fields sliced by their own specs): the low-rank path survives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import LoraxLeaf, is_lorax_leaf
from lorax.paths import path_str

__all__ = ["partition_specs", "shard", "field_specs", "map_fields", "unbox"]

P = PartitionSpec


# --------------------------------------------------------------------------------------
# Field labels
# --------------------------------------------------------------------------------------


def map_fields(leaf: LoraxLeaf, axes: Any, fn: Callable[[Any, tuple], Any]) -> LoraxLeaf:
    """``leaf`` with each array field ``x`` replaced by ``fn(x, labels)``.

    ``labels`` has one entry per axis of ``x``, derived from ``axes`` (one per axis of the
    dense weight; shorter tuples are padded with None) by the kind's ``field_axes``. Nested
    leaves (an NF4 base) are mapped in turn; None fields (half of a split) stay None.
    """
    axes = _pad(axes, len(leaf.shape))
    table = leaf.field_axes(axes)
    changes = {}
    for name in (*leaf.trainable_fields, *leaf.frozen_fields):
        x = getattr(leaf, name)
        if x is None:
            continue
        if is_lorax_leaf(x):
            changes[name] = map_fields(x, table.get(name, axes), fn)
        else:
            changes[name] = fn(x, tuple(table[name]))
    return leaf.replace(**changes)


def _pad(axes: Any, ndim: int) -> tuple:
    axes = tuple(axes) if axes is not None else ()
    if len(axes) > ndim:
        raise LoraxValueError(
            f"lorax: a spec of {len(axes)} axes {axes} for a weight of {ndim} axes"
        )
    return axes + (None,) * (ndim - len(axes))


def _mesh_names(label: Any) -> tuple[str, ...]:
    """The mesh axes of one label: a name, None, or (nested) tuples of them."""
    if label is None or label is P.UNCONSTRAINED:
        return ()
    if isinstance(label, (tuple, list)):
        out: list[str] = []
        for part in label:
            out += [n for n in _mesh_names(part) if n not in out]
        return tuple(out)
    return (label,)


def _spec_entry(label: Any, size: int, sizes: Mapping[str, int] | None) -> Any:
    """One ``PartitionSpec`` entry: the mesh axes of ``label`` that divide ``size`` (the
    longest such prefix; an axis they do not divide, e.g. a small scale table, is
    replicated over the rest), as None, a name, or a tuple."""
    if label is P.UNCONSTRAINED:
        return label
    names = _mesh_names(label)
    if sizes is not None:
        for k in range(len(names), -1, -1):
            if size % int(np.prod([sizes.get(n, 1) for n in names[:k]], dtype=np.int64)) == 0:
                names = names[:k]
                break
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _spec(labels: tuple, shape: tuple, sizes: Mapping[str, int] | None) -> PartitionSpec:
    if sizes is not None:
        unknown = [n for lab in labels for n in _mesh_names(lab) if n not in sizes]
        if unknown:
            raise LoraxValueError(
                f"lorax: {sorted(set(unknown))} in the spec {labels} are not axes of the mesh "
                f"(its axes: {sorted(sizes)}); logical names need rules= (or Flax's "
                "nn.logical_axis_rules in context)"
            )
    entries = [_spec_entry(lab, int(n), sizes) for lab, n in zip(labels, shape, strict=True)]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def field_specs(leaf: LoraxLeaf, spec: Any, *, mesh: Any = None) -> LoraxLeaf:
    """The ``PartitionSpec`` of each field of ``leaf`` (a leaf of the same kind holding
    specs), derived from ``spec``, the dense weight's.

    Args:
      leaf: a lorax leaf (arrays or ``ShapeDtypeStruct``s).
      spec: the dense weight's ``PartitionSpec`` (or a tuple of mesh axis names).
      mesh: when given (a ``Mesh`` or ``AbstractMesh``), an axis that a field's size is not
        divisible by is replicated instead (e.g. NF4's second-level scales).

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> from jax.sharding import PartitionSpec as P
      >>> leaf = lorax.wrap({"w": jnp.ones((8, 16))}, rank=2)["w"]
      >>> s = lorax.sharding.field_specs(leaf, P("fsdp", "tp"))
      >>> s.base, s.a, s.b
      (P('fsdp', 'tp'), P('fsdp',), P(None, 'tp'))
    """
    sizes = _sizes(mesh)
    return map_fields(leaf, tuple(spec), lambda x, labels: _spec(labels, x.shape, sizes))


def _sizes(mesh: Any) -> dict[str, int] | None:
    if mesh is None:
        return None
    return {str(k): int(v) for k, v in dict(mesh.shape).items()}


# --------------------------------------------------------------------------------------
# Flax boxes (nn.Partitioned, nn.LogicallyPartitioned)
# --------------------------------------------------------------------------------------


@functools.cache
def _flax() -> Any:
    """flax.core.meta and flax.linen, imported on first use (lorax's core needs neither)."""
    import flax.core.meta as meta
    import flax.linen as nn
    from flax import struct

    class FieldPartitioned(nn.Partitioned):
        """An ``nn.Partitioned`` field of a lorax leaf; ``dense_names`` are the names of
        the dense weight it belongs to (so the leaf can be rebuilt, merged, re-wrapped)."""

        dense_names: Any = struct.field(pytree_node=False, default=None)

    class FieldLogicallyPartitioned(nn.LogicallyPartitioned):
        """An ``nn.LogicallyPartitioned`` field of a lorax leaf (see FieldPartitioned)."""

        dense_names: Any = struct.field(pytree_node=False, default=None)

    return (
        meta,
        nn,
        {
            nn.Partitioned: FieldPartitioned,
            nn.LogicallyPartitioned: FieldLogicallyPartitioned,
            FieldPartitioned: FieldPartitioned,
            FieldLogicallyPartitioned: FieldLogicallyPartitioned,
        },
    )


def is_box(x: Any) -> bool:
    """True for Flax axis metadata (``nn.Partitioned`` and kin)."""
    if x is None or isinstance(x, (jax.Array, np.ndarray)) or is_lorax_leaf(x):
        return False
    return isinstance(x, _flax()[0].AxisMetadata)


def _box_label(label: Any) -> Any:
    """A box holds one name per axis: the first of a folded axis' names."""
    if isinstance(label, (tuple, list)):
        for part in label:
            first = _box_label(part)
            if first is not None:
                return first
        return None
    return label


def box_fields(leaf: LoraxLeaf, dense_box: Any) -> LoraxLeaf:
    """Boxes each array field of ``leaf`` like ``dense_box`` (the dense weight's box), with
    the names ``field_axes`` derives, so Flax's spec functions see every field."""
    _, _, classes = _flax()
    cls = classes.get(type(dense_box))
    if cls is None:
        raise LoraxTypeError(
            f"lorax: cannot box the fields of a {leaf.kind} leaf like a "
            f"{type(dense_box).__name__}; lorax knows nn.Partitioned and "
            "nn.LogicallyPartitioned"
        )
    names = tuple(getattr(dense_box, "dense_names", None) or dense_box.names)
    extra = {"rules": dense_box.rules} if hasattr(dense_box, "rules") else {}

    def box(x: Any, labels: tuple) -> Any:
        return cls(
            value=x,
            names=tuple(_box_label(lab) for lab in labels),
            mesh=dense_box.mesh,
            dense_names=names,
            **extra,
        )

    return map_fields(leaf, names, box)


def rebox(value: Any, box: Any) -> Any:
    """``value`` boxed like the dense weight's ``box`` (None: unboxed): a lorax leaf gets
    each field boxed, an array the box itself."""
    if box is None:
        return value
    if is_lorax_leaf(value):
        return box_fields(value, box)
    if value is None:
        return None
    return dense_box(box).replace(value=value)


def dense_box(box: Any) -> Any:
    """The box of the dense weight that a field box belongs to (a plain box: itself)."""
    names = getattr(box, "dense_names", None)
    if names is None:
        return box
    meta, nn, _ = _flax()
    base = nn.LogicallyPartitioned if isinstance(box, nn.LogicallyPartitioned) else nn.Partitioned
    extra = {"rules": box.rules} if hasattr(box, "rules") else {}
    return base(value=None, names=tuple(names), mesh=box.mesh, **extra)


def unbox_leaf(leaf: LoraxLeaf, *, constrain: bool = False) -> tuple[LoraxLeaf, Any]:
    """``leaf`` with plain arrays in its boxed fields, and the dense weight's box (or None).

    With ``constrain``, each field is unboxed as Flax does (``box.unbox()``: a sharding
    constraint with its names when a mesh is active)."""
    found: list[Any] = []

    def visit(x: Any) -> Any:
        if is_box(x):
            found.append(x)
            return x.unbox(apply_constraint=constrain) if constrain else x.value
        if is_lorax_leaf(x):
            return _map_data(x, visit)
        return x

    out = _map_data(leaf, visit)
    if not found:  # the common case (no Flax boxes): the leaf itself, no copy
        return leaf, None
    return out, dense_box(found[0])


def _map_data(leaf: LoraxLeaf, fn: Callable[[Any], Any]) -> LoraxLeaf:
    changes = {}
    for name in (*leaf.trainable_fields, *leaf.frozen_fields):
        x = getattr(leaf, name)
        if x is not None:
            changes[name] = fn(x)
    return leaf.replace(**changes)


def unbox(tree: Any, /) -> Any:
    """``tree`` without Flax boxes, also inside lorax leaves (no constraints applied)."""

    def visit(x: Any) -> Any:
        if is_box(x):
            return visit(x.value)
        if is_lorax_leaf(x):
            return unbox_leaf(x)[0]
        return x

    return jax.tree.map(visit, tree, is_leaf=lambda x: is_box(x) or is_lorax_leaf(x))


def has_boxes(tree: Any) -> bool:
    """Whether ``tree`` holds a Flax box anywhere (inside lorax leaves included)."""
    return any(is_box(x) for x in jax.tree.leaves(tree, is_leaf=is_box))


# --------------------------------------------------------------------------------------
# partition_specs and shard
# --------------------------------------------------------------------------------------


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _to_specs(base_specs: Any, rules: Any) -> Any:
    """Base specs as mesh-axis ``PartitionSpec``s: boxes read with Flax, logical names
    mapped with ``rules`` (or the ``nn.logical_axis_rules`` in context)."""
    logical = rules is not None
    if has_boxes(base_specs):
        _, nn, _ = _flax()
        logical = logical or any(
            isinstance(x, nn.LogicallyPartitioned)
            for x in jax.tree.leaves(base_specs, is_leaf=is_box)
        )
        base_specs = nn.get_partition_spec(base_specs)
    elif _is_nnx_state(base_specs):
        from flax import nnx

        base_specs = nnx.get_partition_spec(base_specs)
        base_specs = jax.tree.map(
            lambda v: v.get_value() if hasattr(v, "get_value") else getattr(v, "value", v),
            base_specs,
            is_leaf=lambda x: hasattr(x, "get_value") or type(x).__name__ == "VariableState",
        )
    if logical:
        _, nn, _ = _flax()
        base_specs = nn.logical_to_mesh(base_specs, rules)
    return base_specs


def _is_nnx_state(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nnx.State)


def partition_specs(tree: Any, base_specs: Any, /, *, mesh: Any = None, rules: Any = None) -> Any:
    """``PartitionSpec``s for every array of a wrapped tree, derived from the dense weights'.

    The base keeps the dense weight's spec. Adapter factors follow the axes they share with
    it: LoRA / DoRA ``a`` takes the input axes' spec and None on the rank axis, ``b`` None
    on the rank axis and the output axes' spec; DoRA magnitudes and IA3 vectors follow the
    axes they scale; bottleneck adapters shard their feature axis like the weight's; stack
    (``nn.scan``) axes keep theirs. Rank and adapter axes are replicated: they are small,
    and sharding them would split every low-rank product into partial sums.

    NF4 (and int8) bases: the codes and block scales are stored flat per layer in the
    PyTorch ``[out, in]`` order, so a contiguous slice of them is whole rows. They are cut
    along that axis by every mesh axis that shards the dense weight (output axes first),
    which keeps each device's frozen bytes at ``1 / devices`` of the total; an axis whose
    length the mesh does not divide (the small second-level scales) is replicated. The
    dequantized weight then takes the spec of its use.

    Args:
      tree: the wrapped tree (arrays, ``ShapeDtypeStruct``s or Flax boxes; lorax leaves).
      base_specs: the dense weights' specs, a prefix of ``tree``'s structure: a
        ``PartitionSpec`` tree (as for the unwrapped params; a spec at a lorax leaf's
        position is the dense weight's), the params boxed with ``nn.with_partitioning`` /
        ``nn.with_logical_partitioning`` (or ``nn.get_partition_spec`` of them), logical
        specs with ``rules``, or an nnx ``State`` with sharding metadata. None means
        replicated.
      mesh: a ``Mesh`` / ``AbstractMesh``; when given (or set with ``jax.set_mesh``),
        specs are fitted to its axis sizes (see NF4 above).
      rules: logical axis rules (``(("embed", "fsdp"), ("mlp", "tp"))``) to map logical
        names to mesh axes; with Flax's logically partitioned boxes the rules in context
        (``nn.logical_axis_rules``) are used when this is None.

    Returns:
      A tree of ``tree``'s structure (Flax boxes are read through) with a
      ``PartitionSpec`` for each array, and at each lorax leaf a leaf of the same kind
      holding its fields' specs. Pass it to ``jax.jit``'s shardings (through
      ``NamedSharding``), to :func:`shard`, or to ``lorax.split`` for the two halves.

    Raises:
      LoraxValueError: a spec has more axes than its weight, or ``base_specs`` does not
        match ``tree``'s structure (the message names the path).

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> from jax.sharding import PartitionSpec as P
      >>> lp = lorax.wrap({"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}, rank=2)
      >>> specs = lorax.partition_specs(lp, {"w": P("fsdp", "tp"), "b": P("tp")})
      >>> specs["w"].a, specs["w"].b, specs["b"]
      (P('fsdp',), P(None, 'tp'), P('tp',))
    """
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        mesh = None if abstract.empty else abstract
    sizes = _sizes(mesh)
    specs = _to_specs(base_specs, rules)
    plain = unbox(tree)

    def derive(key_path: Any, spec: Any, sub: Any) -> Any:
        if is_lorax_leaf(spec):  # specs given per field already
            return jax.tree.map(
                lambda s, x: _spec(_pad(s, x.ndim), x.shape, sizes),
                spec,
                sub,
                is_leaf=_is_spec,
            )
        spec = P() if spec is None else spec
        if isinstance(spec, (tuple, list)):
            spec = P(*spec)
        if not isinstance(spec, PartitionSpec):
            raise LoraxTypeError(
                f"lorax.partition_specs: at '{path_str(key_path)}' the base spec is "
                f"{type(spec).__name__} {spec!r}; expected a PartitionSpec (or a tuple of "
                "mesh axis names, one per axis)"
            )

        def one(x: Any) -> Any:
            if is_lorax_leaf(x):
                try:
                    return field_specs(x, spec, mesh=mesh)
                except LoraxValueError as e:
                    raise LoraxValueError(
                        f"lorax.partition_specs: at '{path_str(key_path)}': {e}"
                    ) from None
            if not hasattr(x, "shape"):
                return x
            try:
                return _spec(_pad(spec, len(x.shape)), x.shape, sizes)
            except LoraxValueError as e:
                raise LoraxValueError(
                    f"lorax.partition_specs: at '{path_str(key_path)}': {e}"
                ) from None

        return jax.tree.map(one, sub, is_leaf=is_lorax_leaf)

    try:
        return jax.tree_util.tree_map_with_path(
            derive, specs, plain, is_leaf=lambda x: _is_spec(x) or is_lorax_leaf(x)
        )
    except ValueError as e:
        if isinstance(e, LoraxValueError):
            raise
        raise LoraxValueError(
            "lorax.partition_specs: base_specs must be a prefix of the tree's structure "
            f"(the unwrapped params' structure works): {e}"
        ) from None


def shard(tree: Any, specs: Any = None, /, *, mesh: Any = None, rules: Any = None) -> Any:
    """Places a (wrapped) tree on a mesh: each array gets its ``NamedSharding``.

    Works from every process of a multi-host run (each process passes the same host
    values; it keeps only its devices' shards), and on abstract trees
    (``ShapeDtypeStruct``s get their sharding, for ``jax.jit(...).lower``).

    Args:
      tree: arrays / numpy arrays / ``ShapeDtypeStruct``s and lorax leaves; Flax boxes
        are removed.
      specs: :func:`partition_specs` of it, or the dense weights' specs (derived here);
        None: the boxes' own names when ``tree`` has Flax boxes, else replicated.
      mesh: the ``jax.sharding.Mesh`` (default: the one set with ``jax.set_mesh``).
      rules: logical axis rules, as for :func:`partition_specs`.

    Returns:
      The tree, unboxed, with every array placed.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> lp = lorax.wrap({"w": jnp.ones((8, 16))}, rank=2)
      >>> placed = lorax.shard(lp, {"w": P("fsdp")}, mesh=mesh)
      >>> placed["w"].a.sharding.spec
      P('fsdp',)
    """
    if mesh is None:
        mesh = _context_mesh()
    if mesh is None:
        raise LoraxValueError("lorax.shard: pass mesh= or set one with jax.set_mesh(mesh)")
    if specs is None:
        specs = tree if has_boxes(tree) else jax.tree.map(lambda _: P(), unbox(tree))
    specs = partition_specs(tree, specs, mesh=mesh, rules=rules)
    plain = unbox(tree)

    def place(spec: PartitionSpec, x: Any) -> Any:
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        if isinstance(x, jax.Array) and x.is_fully_addressable and _single_process(mesh):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, specs, plain, is_leaf=_is_spec)


def _single_process(mesh: Any) -> bool:
    return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def _context_mesh() -> Any:
    get = getattr(jax.sharding, "get_mesh", None)
    mesh = get() if get is not None else None
    return None if mesh is None or getattr(mesh, "empty", False) else mesh


# --------------------------------------------------------------------------------------
# Interpreter rules: sharding primitives that meet a lorax leaf
# --------------------------------------------------------------------------------------


def _constraint_rule(ctx: Any, invals: list) -> Any:
    """``with_sharding_constraint`` of a leaf constrains each field with its derived spec
    (as Flax does when it unboxes a partitioned weight): the leaf stays lazy."""
    (x,) = invals
    sharding = ctx.params["sharding"]
    if not is_lorax_leaf(x) or not isinstance(sharding, NamedSharding):
        return NotImplemented
    if ctx.params.get("layout") is not None:
        return NotImplemented
    mesh, sizes = sharding.mesh, _sizes(sharding.mesh)

    def one(arr: Any, labels: tuple) -> Any:
        spec = _spec(labels, arr.shape, sizes)
        loose = frozenset(i for i, e in enumerate(spec) if e is P.UNCONSTRAINED)
        return ctx.bind(arr, sharding=NamedSharding(mesh, spec), unconstrained_dims=loose)[0]

    return map_fields(x, tuple(sharding.spec), one)


def _reshard_rule(param: str) -> Callable:
    """``reshard`` / ``mesh_cast`` (explicit-axes meshes): each field to its derived spec."""

    def rule(ctx: Any, invals: list) -> Any:
        (x,) = invals
        sharding = ctx.params[param]
        if not is_lorax_leaf(x) or not isinstance(sharding, NamedSharding):
            return NotImplemented
        mesh, sizes = sharding.mesh, _sizes(sharding.mesh)

        def one(arr: Any, labels: tuple) -> Any:
            spec = _spec(labels, arr.shape, sizes)
            return ctx.bind(arr, **{param: NamedSharding(mesh, spec)})[0]

        return map_fields(x, tuple(sharding.spec), one)

    return rule


def _each_field_rule(ctx: Any, invals: list) -> Any:
    """A primitive that acts on each operand alone and keeps its shape (``pvary``: mark
    as varying over manual axes): applied to every field of a leaf."""
    outs = [
        map_fields(x, None, lambda arr, _: ctx.bind(arr)[0]) if is_lorax_leaf(x) else ctx.bind(x)[0]
        for x in invals
    ]
    return outs if ctx.eqn.primitive.multiple_results else outs[0]


def _local_shape(shape: tuple, spec: Any, sizes: Mapping[str, int]) -> tuple:
    spec = _pad(spec, len(shape))
    out = []
    for n, entry in zip(shape, spec, strict=True):
        k = int(np.prod([sizes.get(a, 1) for a in _mesh_names(entry)], dtype=np.int64))
        out.append(int(n) // k)
    return tuple(out)


def _per_shard(leaf: LoraxLeaf, spec: Any, sizes: Mapping[str, int], want: tuple) -> Any:
    """The fields' specs inside a ``shard_map`` when slicing each field by its own spec
    gives a valid leaf of the per-shard shape ``want`` whose results are the slices of the
    dense ones (``slices_locally``); else None."""
    axes = _pad(spec, len(leaf.shape))
    sliced = tuple(e if _mesh_names(e) else None for e in axes)
    if not _all_slice(leaf, sliced):
        return None
    specs = field_specs(leaf, spec, mesh=_Sizes(sizes))
    local = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(_local_shape(x.shape, s, sizes), x.dtype),
        leaf,
        specs,
        is_leaf=_is_spec,
    )
    try:
        ok = tuple(local.shape) == tuple(want) and local.misfit() is None
    except Exception:  # noqa: BLE001 - a layout the kind cannot slice (NF4's static shape)
        ok = False
    # Fitting may have replicated an axis the dense spec shards: then the slices disagree.
    return specs if ok else None


def _all_slice(leaf: LoraxLeaf, axes: tuple) -> bool:
    """``slices_locally`` of the leaf and of every leaf nested in it (an NF4 base)."""
    if not leaf.slices_locally(axes):
        return False
    return all(
        _all_slice(x, axes)
        for x in (getattr(leaf, n) for n in (*leaf.trainable_fields, *leaf.frozen_fields))
        if is_lorax_leaf(x)
    )


class _Sizes:
    """A mesh stand-in for ``field_specs``: only ``shape`` is read."""

    def __init__(self, sizes: Mapping[str, int]):
        self.shape = dict(sizes)


def _shard_map_rule(ctx: Any, invals: list) -> Any:
    """``shard_map`` over a function that consumes a leaf: each field enters sliced by its
    own spec (derived from the dense argument's ``in_specs``), and the body is evaluated
    per shard by the interpreter, so the low-rank path runs on local shards. A leaf that
    cannot be sliced that way (an NF4 base, whose flat blocks follow the global shape)
    enters with its base densified, with the usual warning."""
    from lorax import _compat

    p = ctx.params
    mesh = p["mesh"]
    sizes = _sizes(mesh) or {}
    inner, _ = _compat.open_jaxpr(p["jaxpr"])
    in_specs, values = list(p["in_specs"]), list(invals)
    for i, x in enumerate(invals):
        if not is_lorax_leaf(x):
            continue
        want = tuple(inner.invars[i].aval.shape)
        specs = _per_shard(x, in_specs[i], sizes, want)
        if specs is None and is_lorax_leaf(getattr(x, "base", None)):
            x = x.replace(base=_densify_one(ctx, x.base, ctx.names[i]))
            specs = _per_shard(x, in_specs[i], sizes, want)
        if specs is None:
            x = _densify_one(ctx, x, ctx.names[i])
            specs = in_specs[i]
        values[i], in_specs[i] = x, specs
    names = ctx.names

    def body(*args: Any) -> tuple:
        outs = ctx.eval_jaxpr(p["jaxpr"], args, names)
        return tuple(_densify_one(ctx, o, None) if is_lorax_leaf(o) else o for o in outs)

    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(in_specs),
        out_specs=tuple(p["out_specs"]),
        axis_names=set(p["newly_manual_axes"]),
        check_vma=p["check_vma"],
    )
    return list(run(*values))


def _densify_one(ctx: Any, value: Any, name: str | None) -> Any:
    import dataclasses

    return dataclasses.replace(ctx, names=(name,)).densify([value])[0]


def _register_rules() -> None:
    from lorax.transform import _RULES

    _RULES.update(
        {
            "sharding_constraint": _constraint_rule,
            "reshard": _reshard_rule("dst_sharding"),
            "mesh_cast": _reshard_rule("dst_sharding"),
            "pvary": _each_field_rule,
            "shard_map": _shard_map_rule,
        }
    )


_register_rules()
