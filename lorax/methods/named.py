"""Named adapters over one base, as peft's ``add_adapter`` / ``set_adapter`` /
``disable_adapter`` / ``delete_adapter``, as one immutable pytree.

A wrapped tree is a base plus adapter arrays. :class:`AdapterSet` keeps the base once
(``base``: the base parameters, what ``lorax.wrap`` was given) and, per name, the adapter
leaves of one wrapped tree with their base left out (``adapters``), plus the ``active`` name
(static; None when disabled). Every operation returns a new object and copies no array::

    ads = lorax.AdapterSet.create(lorax.wrap(params, rank=8), name="a")
    ads = ads.add("b", other_wrapped_tree).select("b")
    y = apply({"params": ads.tree()}, x)          # the wrapped tree of "b"
    y0 = model.apply({"params": ads.disable().tree()}, x)   # the base alone

``split()`` gives the active adapter's ``(trainable, frozen)`` as ``lorax.split`` does. The
frozen half holds the shared base arrays, so a function jitted over ``(trainable, frozen)``
is compiled once for all adapters of the same shapes and settings (rank, alpha) and reused
when another is selected; ``disable()`` compiles once more (no adapter). ``stack`` serves
several of them in one batch (``lorax.stack``); ``lorax.save_adapters`` /
``lorax.load_adapters`` write and read them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.methods.multi import stack as stack_trees
from lorax.paths import path_str
from lorax.tree import combine, split


def _is_adapter(x: Any) -> bool:
    return is_lorax_leaf(x) and bool(x.trainable_fields)


def _has_base(leaf: Any) -> bool:
    return "base" in leaf.frozen_fields


def _is_half(tree: Any) -> bool:
    """True for the trainable half of ``lorax.split`` (adapter leaves without their base)."""
    leaves = jax.tree.leaves(tree, is_leaf=is_lorax_leaf)
    return any(
        _is_adapter(x) and any(getattr(x, f) is None for f in x.frozen_fields) for x in leaves
    )


def _parts(tree: Any, where: str) -> tuple[Any, Any, set[str]]:
    """``(base, own, loose)`` of a whole wrapped tree: the base parameters, the adapter
    leaves with ``base=None`` (None elsewhere), and the paths of leaves without a base
    (``lorax.unfreeze``'s weights trained in full, whose base value is their own)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]
    loose = {path_str(p) for p, x in flat if _is_adapter(x) and not _has_base(x)}
    if not any(_is_adapter(x) for _, x in flat):
        raise LoraxValueError(
            f"{where}: the tree has no adapter leaves; pass a wrapped tree (lorax.wrap, "
            "lorax.load, lorax.import_peft)"
        )
    base = jax.tree.map(
        lambda x: (x.base if _has_base(x) else x.materialize()) if _is_adapter(x) else x,
        tree,
        is_leaf=is_lorax_leaf,
    )
    own = jax.tree.map(
        lambda x: (x.replace(base=None) if _has_base(x) else x) if _is_adapter(x) else None,
        tree,
        is_leaf=is_lorax_leaf,
    )
    return base, own, loose


def _attach(base: Any, own: Any) -> Any:
    """The wrapped tree: each adapter leaf of ``own`` on its base."""

    def put(o: Any, b: Any) -> Any:
        if o is None:
            return b
        return o.replace(base=b) if _has_base(o) else o

    return jax.tree.map(put, own, base, is_leaf=lambda x: x is None or is_lorax_leaf(x))


def _loose(own: Any) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(own, is_leaf=is_lorax_leaf)[0]
    return {path_str(p) for p, x in flat if _is_adapter(x) and not _has_base(x)}


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    return tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))


def _base_difference(old: Any, new: Any, loose: set[str]) -> str | None:
    """What differs between two bases (paths, shapes, dtypes, values), or None. Values are
    compared where the arrays are not the same objects, except under ``loose`` paths."""
    o_flat, o_def = jax.tree_util.tree_flatten_with_path(old)
    n_flat, n_def = jax.tree_util.tree_flatten_with_path(new)
    o_paths = {path_str(p): x for p, x in o_flat}
    n_paths = {path_str(p): x for p, x in n_flat}
    if set(o_paths) != set(n_paths):
        missing, extra = sorted(set(o_paths) - set(n_paths)), sorted(set(n_paths) - set(o_paths))
        said = [f"lacks {missing[:5]}"] if missing else []
        said += [f"has {extra[:5]}, which the others' has not"] if extra else []
        return "its base " + " and ".join(said)
    for path, x in o_paths.items():
        y = n_paths[path]
        sx, sy = _shape_dtype(x), _shape_dtype(y)
        if sx != sy:
            return (
                f"at '{path}' its base is {sy[1]}{list(sy[0])}; the others' is {sx[1]}{list(sx[0])}"
            )
        if x is y or any(path == p or path.startswith(p + "/") for p in loose):
            continue
        tracer = jax.core.Tracer  # pyright: ignore[reportAttributeAccessIssue]
        if isinstance(x, tracer) or isinstance(y, tracer):
            continue  # values unknown under a transformation: shapes only
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            return f"at '{path}' its base holds other values than the others' (another model?)"
    if o_def != n_def:
        return f"its base has other node types or metadata:\n  {n_def}\n  {o_def}"
    return None


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise LoraxTypeError(f"{where}: an adapter name must be a non-empty str; got {name!r}")
    return name


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named adapters over one base: peft's ``add_adapter`` / ``set_adapter`` /
    ``disable_adapter`` / ``delete_adapter`` as an immutable pytree.

    Build it with :meth:`create`; every method returns a new object (no array is copied).

    Attributes:
      base: the base parameters (the tree ``lorax.wrap`` was given; a quantized base stays
        quantized).
      adapters: ``{name: tree}``, each adapter's leaves with ``base=None`` (None where the
        base is not adapted), in the order they were added.
      active: the selected name, or None when disabled (static: part of the treedef).

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> params = {"w": jnp.ones((8, 4))}
      >>> ads = lorax.AdapterSet.create(lorax.wrap(params, rank=2), name="a")
      >>> ads = ads.add("b", lorax.wrap(params, rank=3)).select("b")
      >>> ads.names, ads.active, ads.tree()["w"].rank
      (('a', 'b'), 'b', 3)
      >>> ads.disable().tree()["w"] is params["w"]
      True
    """

    base: Any
    adapters: dict[str, Any]
    active: str | None = None

    @classmethod
    def create(cls, tree: Any, /, *, name: str = "default") -> AdapterSet:
        """The adapters of one wrapped tree, under ``name``, selected.

        Args:
          tree: a wrapped tree (``lorax.wrap``, ``lorax.load``, ``lorax.import_peft``, or
            ``lorax.combine(trainable, frozen)``).
          name: the adapter's name.

        Returns:
          An :class:`AdapterSet` holding that one adapter, active.

        Raises:
          LoraxValueError: the tree has no adapter leaves, or is one half of a split.
          LoraxTypeError: ``name`` is not a non-empty str.

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> ads = lorax.AdapterSet.create(lorax.wrap({"w": jnp.ones((8, 4))}, rank=2))
          >>> ads.names, ads.active
          (('default',), 'default')
        """
        name = _check_name(name, "lorax.AdapterSet.create")
        if _is_half(tree):
            raise LoraxValueError(
                f"lorax.AdapterSet.create: adapter '{name}' is one half of lorax.split (leaves "
                "without their base); pass the wrapped tree (lorax.combine(trainable, frozen))"
            )
        base, own, _ = _parts(tree, f"lorax.AdapterSet.create (adapter '{name}')")
        return cls(base=base, adapters={name: own}, active=name)

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, in the order they were added.

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> lorax.AdapterSet.create(lorax.wrap({"w": jnp.ones((8, 4))}, rank=2)).names
          ('default',)
        """
        return tuple(self.adapters)

    def _get(self, name: Any, where: str) -> Any:
        name = _check_name(name, where)
        if name not in self.adapters:
            raise LoraxValueError(
                f"{where}: no adapter named '{name}' (adapters: {list(self.adapters)})"
            )
        return self.adapters[name]

    def add(self, name: str, tree: Any, /) -> AdapterSet:
        """A copy with one more adapter (the active one stays active), as peft's
        ``add_adapter``.

        Args:
          name: its name, not taken yet.
          tree: a wrapped tree over the same base, or the trainable half of one
            (``lorax.split``), which takes the frozen half of the active adapter (or of the
            first, when disabled).

        Returns:
          The new :class:`AdapterSet`.

        Raises:
          LoraxValueError: the name is taken; the tree has no adapter leaves; its base
            differs from the others' (other paths, shapes, dtypes or values; the message
            names the path); a trainable half that does not fit (other paths or ranks).
          LoraxTypeError: ``name`` is not a non-empty str.

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> params = {"w": jnp.ones((8, 4))}
          >>> ads = lorax.AdapterSet.create(lorax.wrap(params, rank=2), name="a")
          >>> trainable, _ = lorax.split(lorax.wrap(params, rank=2))
          >>> ads.add("b", trainable).names
          ('a', 'b')
        """
        where = f"lorax.AdapterSet.add (adapter '{name}')"
        name = _check_name(name, "lorax.AdapterSet.add")
        if name in self.adapters:
            raise LoraxValueError(
                f"lorax.AdapterSet.add: an adapter named '{name}' exists already "
                f"(adapters: {list(self.adapters)}); delete it first or pick another name"
            )
        if _is_half(tree):
            ref = self.active if self.active is not None else next(iter(self.adapters), None)
            if ref is None:
                raise LoraxValueError(
                    f"{where}: a trainable half needs an adapter to take its frozen half "
                    "from, and there is none; pass the wrapped tree"
                )
            _, frozen = split(_attach(self.base, self.adapters[ref]))
            try:
                tree = combine(tree, frozen)
            except ValueError as e:
                raise LoraxValueError(
                    f"{where}: the trainable half does not fit the frozen half of adapter "
                    f"'{ref}': {e}"
                ) from None
        base, own, loose = _parts(tree, where)
        for other in self.adapters.values():
            loose |= _loose(other)
        problem = _base_difference(self.base, base, loose)
        if problem:
            raise LoraxValueError(f"{where}: not over the same base: {problem}")
        return dataclasses.replace(self, adapters={**self.adapters, name: own})

    def select(self, name: str, /) -> AdapterSet:
        """A copy with ``name`` active (peft's ``set_adapter``; also re-enables after
        :meth:`disable`).

        Args:
          name: an adapter's name.

        Returns:
          The new :class:`AdapterSet`.

        Raises:
          LoraxValueError: no adapter of that name (the message lists them).

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> params = {"w": jnp.ones((8, 4))}
          >>> ads = lorax.AdapterSet.create(lorax.wrap(params, rank=2), name="a")
          >>> ads.add("b", lorax.wrap(params, rank=2)).select("b").active
          'b'
        """
        self._get(name, "lorax.AdapterSet.select")
        return dataclasses.replace(self, active=name)

    def disable(self) -> AdapterSet:
        """A copy with no adapter active: :meth:`tree` is the base alone (peft's
        ``disable_adapter``); :meth:`select` enables one again.

        Returns:
          The new :class:`AdapterSet`, with ``active`` None.

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> params = {"w": jnp.ones((8, 4))}
          >>> off = lorax.AdapterSet.create(lorax.wrap(params, rank=2)).disable()
          >>> off.active is None, off.tree()["w"] is params["w"]
          (True, True)
        """
        return dataclasses.replace(self, active=None)

    def delete(self, name: str, /) -> AdapterSet:
        """A copy without adapter ``name`` (peft's ``delete_adapter``).

        Args:
          name: an adapter's name, not the active one.

        Returns:
          The new :class:`AdapterSet`.

        Raises:
          LoraxValueError: no adapter of that name, or it is the active one (select another,
            or :meth:`disable`, first).

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> params = {"w": jnp.ones((8, 4))}
          >>> ads = lorax.AdapterSet.create(lorax.wrap(params, rank=2), name="a")
          >>> ads.add("b", lorax.wrap(params, rank=2)).delete("b").names
          ('a',)
        """
        self._get(name, "lorax.AdapterSet.delete")
        if name == self.active:
            raise LoraxValueError(
                f"lorax.AdapterSet.delete: adapter '{name}' is the active one; select another "
                "(.select(name)) or disable adapters (.disable()) before deleting it"
            )
        return dataclasses.replace(
            self, adapters={k: v for k, v in self.adapters.items() if k != name}
        )

    def tree(self) -> Any:
        """The wrapped tree of the active adapter; the base parameters when disabled.

        Returns:
          The tree ``lorax.wrap`` gave for that adapter (its leaves on the shared base
          arrays), for ``lorax.lora(apply)``; disabled, :attr:`base` itself.

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> ads = lorax.AdapterSet.create(lorax.wrap({"w": jnp.ones((8, 4))}, rank=2))
          >>> type(ads.tree()["w"]).__name__
          'LoraWeight'
        """
        if self.active is None:
            return self.base
        return _attach(self.base, self._get(self.active, "lorax.AdapterSet.tree"))

    def split(self) -> tuple[Any, Any]:
        """``lorax.split`` of :meth:`tree`: the active adapter's ``(trainable, frozen)``.

        The frozen half holds the shared base arrays: a function jitted over both halves
        reuses its compiled program for every adapter of the same shapes and settings.
        Returns:
          ``(trainable, frozen)``; disabled, ``trainable`` is all None and ``frozen`` the
          base.

        Example:
          >>> import jax, jax.numpy as jnp, lorax
          >>> ads = lorax.AdapterSet.create(lorax.wrap({"w": jnp.ones((8, 4))}, rank=2))
          >>> trainable, frozen = ads.split()
          >>> [x.shape for x in jax.tree.leaves(trainable)]
          [(8, 2), (2, 4)]
        """
        return split(self.tree())

    def trainable(self) -> Any:
        """The active adapter's trainable half (the first of :meth:`split`).

        Returns:
          The trainable tree (None where nothing is trained; all None when disabled).

        Example:
          >>> import jax, jax.numpy as jnp, lorax
          >>> ads = lorax.AdapterSet.create(lorax.wrap({"w": jnp.ones((8, 4))}, rank=2))
          >>> len(jax.tree.leaves(ads.trainable()))
          2
        """
        return self.split()[0]

    def stack(self, index: Any, /, *, names: Sequence[str] | None = None) -> Any:
        """Several adapters for one mixed batch (``lorax.stack``): row ``i`` uses adapter
        ``names[index[i]]``.

        Args:
          index: ``[batch]``, per row an int (a position in ``names``) or an adapter name.
          names: the adapters to stack; default all, in order.

        Returns:
          A tree of :class:`~lorax.MultiLoraWeight` leaves, for ``lorax.lora(apply)``.

        Raises:
          LoraxValueError: an unknown name, or what ``lorax.stack`` refuses (adapters on
            other paths, non-LoRA leaves).

        Example:
          >>> import jax.numpy as jnp, lorax
          >>> params = {"w": jnp.ones((8, 4))}
          >>> ads = lorax.AdapterSet.create(lorax.wrap(params, rank=2), name="a")
          >>> ads = ads.add("b", lorax.wrap(params, rank=3))
          >>> ads.stack(["b", "a", "b"])["w"].index.tolist()
          [1, 0, 1]
        """
        chosen = list(self.adapters) if names is None else list(names)
        if isinstance(names, str) or not chosen:
            raise LoraxValueError(
                f"lorax.AdapterSet.stack: names must be a non-empty list of adapter names; "
                f"got {names!r}"
            )
        trees = [_attach(self.base, self._get(n, "lorax.AdapterSet.stack")) for n in chosen]
        if isinstance(index, (list, tuple)) and any(isinstance(i, str) for i in index):
            for i in index:
                if i not in chosen:
                    raise LoraxValueError(
                        f"lorax.AdapterSet.stack: index names adapter {i!r}, which is not "
                        f"among {chosen}"
                    )
            index = [chosen.index(i) for i in index]
        return stack_trees(trees, index)


jax.tree_util.register_dataclass(
    AdapterSet, data_fields=["base", "adapters"], meta_fields=["active"]
)
