"""Optax glue: train the adapter leaves of a wrapped tree and nothing else."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lorax.errors import LoraxValueError
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
