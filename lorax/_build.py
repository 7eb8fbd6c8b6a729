"""The one loop every constructor runs (``wrap``, ``ia3``, ``adapters``, ``quantize``,
``unfreeze``): flatten the tree, choose the targets, give each its own key and axis layout,
build its leaf, rebuild the tree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from lorax._checks import check_key
from lorax.layout import infer_in_axes, infer_stack_axes, stack_axes_for
from lorax.paths import FlatTree
from lorax.targets import LoraSpec, Targets, select


@dataclasses.dataclass(frozen=True)
class Site:
    """One chosen weight: where it is, what it is, and how its axes may split.

    Attributes:
      path: the '/'-joined key path.
      leaf: the weight (an array or a lorax leaf).
      spec: the target's per-weight choices (a callable target may return a LoraSpec).
      siblings: the other leaves of its module by name (what layout inference reads).
      key: this weight's own PRNG key (None when the constructor draws nothing).
    """

    path: str
    leaf: Any
    spec: LoraSpec
    siblings: Mapping[str, Any]
    key: Any = None

    def stack_axes(self, stacked: Any = None) -> int:
        """Leading layer axes: the spec's, else ``stacked`` (wrap's argument), else inferred."""
        explicit = stack_axes_for(stacked, self.spec.stack_axes, self.path)
        if explicit is not None:
            return explicit
        return infer_stack_axes(self.path, self.leaf.shape, self.siblings)

    def in_axes(self, stack: int) -> int:
        """Input axes per layer: the spec's, else inferred from a bias or squareness."""
        return self.spec.in_axes or infer_in_axes(self.leaf.shape, self.siblings, stack)


def build(
    params: Any,
    make: Callable[[Site], Any],
    *,
    targets: Targets = None,
    choose: Callable[[FlatTree], Mapping[int, LoraSpec]] | None = None,
    key: Any = None,
    check: Callable[[list[Site]], None] | None = None,
    what: str,
) -> Any:
    """``params`` with ``make(site)`` in place of each chosen weight.

    Args:
      params: the tree (anything ``FlatTree.of`` takes).
      make: builds the new leaf of one :class:`Site`.
      targets: the target spec, chosen with :func:`lorax.targets.select`; or
      choose: a chooser of one's own, ``FlatTree -> {leaf index: LoraSpec}``.
      key: split into one key per chosen weight, in path order (None: no keys).
      check: called once with every site before any leaf is built (argument checks that
        need to see all the chosen paths).
      what: the calling function, for error messages.
    """
    if key is not None:
        check_key(key, f"{what}: key")
    tree = FlatTree.of(params)
    chosen = choose(tree) if choose is not None else select(targets, tree.paths, tree.leaves)
    order = sorted(chosen)
    keys = (
        [None] * len(order)
        if key is None
        else list(jax.random.split(key, max(len(order), 1)))[: len(order)]
    )
    sites = [
        Site(tree.paths[i], tree.leaves[i], chosen[i], tree.siblings(tree.paths[i]), k)
        for i, k in zip(order, keys, strict=True)
    ]
    if check is not None:
        check(sites)
    out = list(tree.leaves)
    for i, site in zip(order, sites, strict=True):
        out[i] = make(site)
    return tree.rebuild(out)
