"""Which weights of a parameter tree get adapted, and how their axes split.

Targets (see ``lorax.wrap``) select leaves by their '/'-joined key path
(``params/h_0/attn/c_attn/kernel``): a regex matched in full, a list of names matching any
path component, a callable ``(path, leaf) -> bool | LoraSpec``, or None for the default
(every floating weight of rank >= 2 except embedding tables).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from lorax.leaf import is_lorax_leaf


def key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined key path; nnx's trailing ``.value`` attribute is dropped."""
    names = [key_name(k) for k in path]
    if path and hasattr(path[-1], "name") and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


@dataclasses.dataclass(frozen=True)
class FlatTree:
    """A tree flattened down to arrays and lorax leaves, with '/'-joined paths and, for each
    path, its siblings by name (what layout inference looks at).

    Flax partitioning boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``) are read
    through: ``leaves`` holds plain values and ``boxes`` the dense weight's box at each
    boxed path, which :meth:`rebuild` puts back (a new lorax leaf gets each field boxed).
    """

    treedef: Any
    paths: list[str]
    leaves: list[Any]
    boxes: list[Any] | None = None

    @classmethod
    def of(cls, tree: Any) -> FlatTree:
        from lorax.sharding import is_box, unbox_leaf

        flat, treedef = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: is_lorax_leaf(x) or is_box(x)
        )
        leaves, boxes = [], []
        for _, leaf in flat:
            box = None
            if is_box(leaf):
                leaf, box = leaf.value, leaf
            if is_lorax_leaf(leaf):
                leaf, inner = unbox_leaf(leaf)
                box = box if inner is None else inner
            leaves.append(leaf)
            boxes.append(box)
        paths = [path_str(p) for p, _ in flat]
        return cls(treedef, paths, leaves, boxes if any(b is not None for b in boxes) else None)

    def siblings(self, path: str) -> dict[str, Any]:
        parent = path.rpartition("/")[0]
        return {
            p.rpartition("/")[2]: leaf
            for p, leaf in zip(self.paths, self.leaves, strict=True)
            if p.rpartition("/")[0] == parent
        }

    def rebuild(self, leaves: Sequence[Any]) -> Any:
        leaves = list(leaves)
        if self.boxes is not None:
            from lorax.sharding import rebox

            leaves = [rebox(x, b) for x, b in zip(leaves, self.boxes, strict=True)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)
