"""Optax glue: train the adapter leaves of a wrapped tree and nothing else, and LoRA+ (the
``B`` factors at a higher learning rate)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax._checks import is_real_scalar
from lorax.errors import LoraxValueError
from lorax.paths import path_str
from lorax.targets import EMBEDDING_NAMES
from lorax.tree import mask


def optimizer(tx: optax.GradientTransformation, params: Any, /) -> optax.GradientTransformation:
    """Wraps ``tx`` so that it updates only the adapter leaves of ``params``.

    ``optax.masked(tx, lorax.mask(params))`` alone passes the gradients of unmasked leaves
    through unchanged (plain leaves such as biases would then move by their raw gradient);
    this chains it with ``optax.freeze`` of the rest. Frozen leaves hold no optimizer state.

    Args:
      tx: any optax transformation, e.g. ``optax.adamw(1e-4)``.
      params: the wrapped tree (from ``lorax.wrap``) whose structure the updates have.

    Returns:
      An ``optax.GradientTransformation`` for gradients with respect to the whole tree.

    Raises:
      LoraxValueError: ``params`` has no trainable arrays (it would train nothing).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, rank=2)
      >>> tx = lorax.optimizer(optax.adam(1e-3), lp)
      >>> state = tx.init(lp)
      >>> grads = jax.tree.map(jnp.ones_like, lp)
      >>> updates, state = tx.update(grads, state, lp)
      >>> float(jax.numpy.abs(updates["b"]).max()), updates["w"].a.shape
      (0.0, (4, 2))
    """
    trainable = mask(params)
    if not any(jax.tree.leaves(trainable)):  # every update would be zero: nothing trains
        raise LoraxValueError(
            f"lorax.optimizer: the tree has no trainable adapter arrays (got "
            f"{type(params).__name__}); pass the tree from lorax.wrap / "
            "lorax.unfreeze, not the base parameters"
        )
    frozen = jax.tree.map(lambda m: not m, trainable)
    return optax.chain(optax.masked(tx, trainable), optax.freeze(frozen))


#: The group each trainable array joins in ``loraplus`` (peft's param groups).
LORAPLUS_GROUPS = ("a", "b", "embedding")


def loraplus_labels(params: Any, /, *, embeddings: re.Pattern | str | None = None) -> Any:
    """The LoRA+ group of each array of ``params``: ``"b"``, ``"a"``, ``"embedding"`` or
    ``"frozen"``, as peft's ``create_loraplus_optimizer`` groups parameters.

    ``B`` factors and trainable vectors (biases, IA3 and DoRA magnitudes) are ``"b"``;
    adapters of embedding tables are ``"embedding"``; every other trainable array is ``"a"``.

    Args:
      params: the wrapped tree.
      embeddings: a regex (full match on any '/'-separated component of the path) naming
        embedding tables; default: the names ``lorax.wrap`` treats as embeddings.

    Returns:
      A tree of strings with ``params``'s structure, for ``optax.multi_transform``.

    Example:
      >>> import jax, jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((8, 8)), "b": jnp.ones(8)}, rank=2)
      >>> jax.tree.leaves(lorax.optim.loraplus_labels(lp))
      ['frozen', 'frozen', 'a', 'b']
    """
    names = re.compile(embeddings) if isinstance(embeddings, str) else embeddings
    names = names or EMBEDDING_NAMES
    trainable = mask(params)

    def label(key_path, is_trainable, x):
        if not is_trainable:
            return "frozen"
        path = path_str(key_path)
        module = path.split("/")[:-1]
        if any(names.fullmatch(c) for c in module):
            return "embedding"
        last = key_path[-1]
        if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "b":
            return "b"
        return "b" if jnp.ndim(x) <= 1 else "a"

    return jax.tree_util.tree_map_with_path(label, trainable, params)


def loraplus(
    make_tx: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    params: Any,
    /,
    *,
    learning_rate: optax.ScalarOrSchedule,
    ratio: float = 16.0,
    embedding_learning_rate: optax.ScalarOrSchedule = 1e-6,
    embeddings: re.Pattern | str | None = None,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): the ``B`` factors learn ``ratio`` times faster than ``A``.

    The groups are peft's (``create_loraplus_optimizer``): ``B`` factors and trainable
    vectors at ``ratio * learning_rate``; adapters of embedding tables at
    ``embedding_learning_rate``; the rest at ``learning_rate``. Frozen arrays get zero
    updates and hold no optimizer state, as with ``lorax.optimizer``.

    Args:
      make_tx: builds the optimizer from a learning rate, e.g.
        ``lambda lr: optax.adamw(lr, weight_decay=0.0)``.
      params: the wrapped tree whose structure the gradients have.
      learning_rate: ``A``'s learning rate: a number or an optax schedule.
      ratio: ``B``'s learning rate over ``A``'s (peft's ``loraplus_lr_ratio``); >= 1 in
        the paper, any positive number accepted.
      embedding_learning_rate: the learning rate of adapters on embedding tables.
      embeddings: which modules are embedding tables (see :func:`loraplus_labels`).

    Returns:
      An ``optax.GradientTransformation`` for gradients with respect to the whole tree.

    Raises:
      LoraxValueError: ``ratio`` is not a positive finite number, or ``params`` has no
        trainable arrays.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lorax
      >>> lp = lorax.wrap({"w": jnp.ones((4, 4))}, rank=2)
      >>> tx = lorax.loraplus(optax.sgd, lp, learning_rate=0.1, ratio=4.0)
      >>> grads = jax.tree.map(jnp.ones_like, lp)
      >>> updates, _ = tx.update(grads, tx.init(lp), lp)
      >>> round(float(updates["w"].a[0, 0]), 6), round(float(updates["w"].b[0, 0]), 6)
      (-0.1, -0.4)
    """
    if not is_real_scalar(ratio) or not math.isfinite(ratio) or ratio <= 0:
        raise LoraxValueError(f"lorax.loraplus: ratio must be a positive number; got {ratio!r}")
    labels = loraplus_labels(params, embeddings=embeddings)
    if not any(lab != "frozen" for lab in jax.tree.leaves(labels)):
        raise LoraxValueError(
            "lorax.loraplus: the tree has no trainable adapter arrays; pass the tree from "
            "lorax.wrap, not the base parameters"
        )
    if callable(learning_rate):
        schedule = learning_rate
        b_rate: optax.ScalarOrSchedule = lambda count: ratio * schedule(count)  # noqa: E731
    else:
        b_rate = ratio * learning_rate
    return optax.multi_transform(
        {
            "a": make_tx(learning_rate),
            "b": make_tx(b_rate),
            "embedding": make_tx(embedding_learning_rate),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )
