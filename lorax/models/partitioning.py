"""How the reference models (GPT-2, Llama) shard: logical axis names for every parameter,
and the logical-to-mesh rule sets for FSDP, tensor parallelism and both.

Logical names (as MaxText writes them):

=========  ==========================================================================
``embed``  the model width (d_model)
``heads``  attention projections' head axis (q / k / v outputs, the o_proj input)
``mlp``    the MLP's hidden axis
``vocab``  the vocabulary
``layers`` the stack axis of ``scan_layers=True`` models
``norm``   norm scales and biases of width d_model
=========  ==========================================================================

Rule sets (mesh axes ``fsdp`` and ``tp``; the batch is split over ``fsdp``):

* ``"fsdp"``: every weight sharded along ``embed`` (ZeRO-3 style); activations all-gather
  each layer's weights as they are used.
* ``"tp"``: Megatron tensor parallelism: q / k / v / fc / gate / up are column-parallel
  (``heads`` / ``mlp`` / ``vocab`` split), o_proj / down / c_proj row-parallel.
* ``"fsdp_tp"``: both, on a 2-D mesh.

A LoRA factor follows its weight (``lorax.partition_specs``): on a column-parallel
projection ``a`` is replicated (or FSDP-sharded) and ``b`` column-split; on a row-parallel
one ``a`` is row-split and ``b`` replicated, so the low-rank path needs the same one
all-reduce as the base product.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from lorax.errors import LoraxValueError
from lorax.paths import path_str

__all__ = [
    "RULES",
    "logical_axes",
    "logical_spec",
    "placer",
    "make_mesh",
    "batch_spec",
    "sharded",
]

RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "fsdp": (("batch", "fsdp"), ("embed", "fsdp")),
    "tp": (("heads", "tp"), ("mlp", "tp"), ("vocab", "tp")),
    "fsdp_tp": (
        ("batch", "fsdp"),
        ("embed", "fsdp"),
        ("heads", "tp"),
        ("mlp", "tp"),
        ("vocab", "tp"),
    ),
}

# (path regex, logical names of the per-layer weight); the first match wins.
_TABLE: Sequence[tuple[str, tuple[str | None, ...]]] = (
    (r"(wte|embed_tokens)/embedding", ("vocab", "embed")),
    (r"wpe/embedding", (None, "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r".*(c_attn|q_proj|k_proj|v_proj)/kernel", ("embed", "heads")),
    (r".*(c_attn|q_proj|k_proj|v_proj)/bias", ("heads",)),
    (r".*(attn|self_attn)/(c_proj|o_proj)/kernel", ("heads", "embed")),
    (r".*(c_fc|gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r".*(c_fc|gate_proj|up_proj)/bias", ("mlp",)),
    (r".*(mlp/c_proj|down_proj)/kernel", ("mlp", "embed")),
    (r".*/(bias|scale)", ("norm",)),
)


def logical_axes(params: Any, /) -> Any:
    """Logical ``PartitionSpec``s for a GPT-2 or Llama parameter tree (plain, wrapped or
    abstract): one per parameter, with ``layers`` first on scanned stacks.

    Pass them, with a rule set, to ``lorax.partition_specs(wrapped, logical_axes(params),
    rules=RULES["fsdp_tp"])``.

    Raises:
      LoraxValueError: a parameter the table does not know (not a reference model's).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lorax.models import gpt2, partitioning
      >>> model = gpt2.GPT2(gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=32,
      ...                                   n_layer=1, n_head=2))
      >>> params = jax.eval_shape(model.init, jax.random.key(0),
      ...                         jnp.ones((1, 4), jnp.int32))["params"]
      >>> partitioning.logical_axes(params)["h_0"]["mlp"]["c_fc"]["kernel"]
      P('embed', 'mlp')
    """
    from lorax.leaf import is_lorax_leaf

    return jax.tree_util.tree_map_with_path(
        lambda key_path, x: logical_spec(path_str(key_path), tuple(x.shape)),
        params,
        is_leaf=is_lorax_leaf,
    )


def logical_spec(path: str, shape: tuple[int, ...]) -> PartitionSpec:
    """The logical spec of one reference-model parameter, by its '/'-joined path.

    Raises:
      LoraxValueError: a path the table does not know.
    """
    ndim = len(shape)
    for pattern, axes in _TABLE:
        if re.fullmatch(pattern, path):
            stack = ndim - len(axes)
            if stack < 0 or (stack and "ScanLayers" not in path):
                break
            return PartitionSpec(*(("layers",) * stack + axes))
    raise LoraxValueError(
        f"lorax.models.partitioning: no logical axes for '{path}' {tuple(shape)}: "
        "not a GPT-2 or Llama parameter"
    )


def placer(mesh: jax.sharding.Mesh, rules: Any = None) -> Any:
    """``place(path, host_array) -> jax.Array`` on ``mesh`` with the reference models'
    logical axes mapped by ``rules`` (default ``RULES["fsdp_tp"]``): what
    ``from_pretrained(mesh=...)`` calls on each tensor as it is read."""
    from lorax.sharding import shard

    rules = RULES["fsdp_tp"] if rules is None else rules

    def place(path: str, array: np.ndarray) -> jax.Array:
        return shard(array, logical_spec(path, array.shape), mesh=mesh, rules=rules)

    return place


def make_mesh(spec: str, /, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A mesh from a string such as ``"fsdp=4,tp=2"`` (axes ``fsdp`` and ``tp``; a missing
    one has size 1), over all devices (of every process) unless ``devices`` is given.

    Raises:
      LoraxValueError: an unknown axis, a size that is not a positive int, or sizes whose
        product is not the device count.
    """
    sizes = {"fsdp": 1, "tp": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise LoraxValueError(
                f"lorax: mesh spec {spec!r}: expected 'fsdp=N,tp=M' with positive sizes; "
                f"got {part!r}"
            )
        sizes[name] = int(value)
    devices = list(jax.devices() if devices is None else devices)
    if sizes["fsdp"] * sizes["tp"] != len(devices):
        raise LoraxValueError(
            f"lorax: mesh spec {spec!r} needs {sizes['fsdp'] * sizes['tp']} devices; "
            f"there are {len(devices)} (on CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)"
        )
    grid = np.array(devices).reshape(sizes["fsdp"], sizes["tp"])
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.sharding.Mesh(grid, ("fsdp", "tp"), axis_types=auto)


def batch_spec(mesh: jax.sharding.Mesh) -> PartitionSpec:
    """The spec of a ``[batch, ...]`` input: rows split over ``fsdp``."""
    return PartitionSpec("fsdp") if "fsdp" in mesh.axis_names else PartitionSpec()


@contextlib.contextmanager
def sharded(mesh: jax.sharding.Mesh, rules: Any = "fsdp_tp") -> Iterator[None]:
    """Sets ``mesh`` (``jax.set_mesh``) and the logical axis rules (a ``RULES`` key or a
    rules tuple) for what is traced inside: the reference models then keep their hidden
    states split over the batch (``layers.constrain``), which is what makes FSDP gather
    weights rather than split activations along the model width.

    Example:
      >>> from lorax.models import partitioning
      >>> mesh = partitioning.make_mesh(f"fsdp={len(jax.devices())}")
      >>> with partitioning.sharded(mesh, "fsdp"):
      ...     pass  # jax.jit(step)(...) traced here
    """
    import flax.linen as nn

    rules = RULES[rules] if isinstance(rules, str) else rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
