"""Fully trained weights inside a wrapped tree: BitFit (biases only) and peft's
"modules to save" (a classifier head, layer norms). An :class:`Unfrozen` leaf marks a plain
array as trainable, so ``split`` / ``mask`` / ``optimizer`` / ``save`` / ``summary`` treat
it like any adapter, and ``lorax.lora`` uses it as the array it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax

from lorax._build import build
from lorax._checks import compile_regex
from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import LoraxLeaf, is_lorax_leaf, register_leaf
from lorax.paths import FlatTree
from lorax.targets import LoraSpec

Selector = str | Sequence[str] | Callable[[str, Any], bool]


@register_leaf(kind="unfrozen", aliases=("Unfrozen",))
class Unfrozen(LoraxLeaf):
    """A weight trained in full. ``value`` is the array itself."""

    value: Any

    trainable_fields: ClassVar[tuple[str, ...]] = ("value",)
    dense_is_free: ClassVar[bool] = True  # using it as an array costs nothing: no warning

    @property
    def stack_ndim(self) -> int:
        return self.value.ndim  # a plain array: lax.scan may slice any leading axis

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    def materialize(self) -> jax.Array:
        return self.value


def unfreeze(
    params: Any, /, *, targets: Selector | None = None, select: Selector | None = None
) -> Any:
    """Marks the chosen plain arrays of ``params`` as fully trainable.

    Unlike ``lorax.wrap``'s targets, which adapt weights only, these choose any plain array
    (biases and norm scales included): BitFit and peft's modules to save.

    Args:
      params: a tree, wrapped or not (lorax leaves are left as they are).
      targets: a regex matched in full against the '/'-joined path, a list of path
        components (``["bias"]`` for BitFit, ``["lm_head", "ln_f"]`` for modules to save),
        or a callable ``(path, leaf) -> bool``.
      select: the deprecated name of ``targets``; warns.

    Returns:
      The tree with :class:`Unfrozen` leaves at the chosen paths.

    Raises:
      ValueError: ``targets`` chooses nothing, or a name of its list matches no plain array
        (the message lists the paths there are), or it is a bad regex.
      TypeError: ``targets`` is none of the above, or missing.

    Example:
      >>> import jax.numpy as jnp, lorax
      >>> p = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> trainable, _ = lorax.split(lorax.unfreeze(p, targets=["bias"]))   # BitFit
      >>> trainable["dense"]["bias"].value.shape, trainable["dense"]["kernel"]
      ((4,), None)
    """
    if select is not None:
        if targets is not None:
            raise LoraxTypeError("lorax.unfreeze: pass targets= only (select= is its old name)")
        warnings.warn(
            "lorax.unfreeze: select= is deprecated; pass targets=", DeprecationWarning, stacklevel=2
        )
        targets = select
    if targets is None:
        raise LoraxTypeError(
            "lorax.unfreeze: targets must be given: a regex (str), a list of "
            "path components (str) or a callable (path, leaf) -> bool"
        )
    return build(
        params,
        lambda site: Unfrozen(site.leaf),
        choose=lambda tree: _choose(tree, targets),
        what="lorax.unfreeze",
    )


def _choose(tree: FlatTree, targets: Selector) -> dict[int, LoraSpec]:
    plain = [not is_lorax_leaf(leaf) and hasattr(leaf, "shape") for leaf in tree.leaves]
    listing = (
        "; the paths are: " + ", ".join(tree.paths[:40]) + (" ..." if len(tree.paths) > 40 else "")
    )
    if callable(targets):
        chosen = [targets(p, leaf) for p, leaf in zip(tree.paths, tree.leaves, strict=True)]
    elif isinstance(targets, str):
        pattern = compile_regex(targets, "lorax.unfreeze: targets")
        chosen = [pattern.fullmatch(p) is not None for p in tree.paths]
    elif isinstance(targets, (list, tuple, set, frozenset)) and all(
        isinstance(n, str) for n in targets
    ):
        names = set(targets)
        # as wrap's target names: a name that selects nothing is most likely a typo
        unmatched = sorted(
            n
            for n in names
            if not any(n in p.split("/") and ok for p, ok in zip(tree.paths, plain, strict=True))
        )
        if unmatched and len(unmatched) < len(names):
            raise LoraxValueError(
                f"lorax.unfreeze: the names {unmatched} select no plain array" + listing
            )
        chosen = [bool(names & set(p.split("/"))) for p in tree.paths]
    else:
        raise LoraxTypeError(
            "lorax.unfreeze: targets must be a regex (str), a list of path "
            "components (str) or a callable (path, leaf) -> bool; got "
            f"{targets!r}"
        )
    chosen = [bool(c) and ok for c, ok in zip(chosen, plain, strict=True)]
    if not any(chosen):
        raise LoraxValueError(f"lorax.unfreeze: {targets!r} selects no plain array" + listing)
    return {i: LoraSpec() for i, c in enumerate(chosen) if c}
