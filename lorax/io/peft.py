"""Hugging Face PEFT interop: LoRA adapters out to, and in from, the directory layout that
``peft.PeftModel.from_pretrained`` (and vLLM) read: adapter_config.json plus
adapter_model.safetensors with ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``lora_B.weight`` ``[out, r]``.

This module knows no model. What it needs of one, which PyTorch module each Flax kernel path
is and how PEFT's config describes the base, is a :class:`PeftModuleMap`. The ``model``
argument of :func:`export_peft` and :func:`import_peft` gives one in any of four ways:

- a :class:`PeftModuleMap` itself;
- a model family (:class:`PeftFamily`): anything with a method
  ``peft_modules(params) -> PeftModuleMap``, such as the reference models
  ``lorax.models.gpt2.GPT2`` and ``lorax.models.llama.Llama``;
- the name of a registered family (:func:`register_peft_family`): ``import lorax.models``
  registers ``"gpt2"`` and ``"llama"``, which read the layer count from the paths;
- a plain mapping ``{flax_path: module_name}`` (unscanned, ``fan_in_fan_out`` false).

The reference models build their maps from their one table of Flax paths and Hugging Face
names (``hf_table``), the same one their checkpoint loaders read, so a path such as
``h_3/attn/c_attn/kernel`` (or the layer-3 slice of ``ScanLayers/attn/c_attn/kernel``) is
``transformer.h.3.attn.c_attn`` in both places.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lorax.errors import (
    CheckpointError,
    LoraxFileNotFoundError,
    LoraxTypeError,
    LoraxValueError,
    NonFiniteError,
)
from lorax.io.peft_saved import check_options, export_saved, import_saved, split_saved
from lorax.leaf import is_lorax_leaf
from lorax.methods.dora import DoraWeight
from lorax.methods.ia3 import IA3Weight
from lorax.methods.lora import LoraWeight
from lorax.methods.unfrozen import Unfrozen
from lorax.paths import path_str
from lorax.tree import attach

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def write_adapter(
    directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> Path:
    """Writes a peft adapter directory (``adapter_model.safetensors`` and
    ``adapter_config.json``): the end of every method's export.

    Process 0 writes (every process has gathered the full arrays); each file goes to a
    temporary name first and is renamed into place, so an export that is interrupted never
    leaves a truncated file under the name peft reads, and the weights are in place before
    the config that describes them. Every process waits until the files exist.

    Args:
      directory: the adapter directory (created if needed).
      tensors: peft's tensor names to arrays.
      config: the adapter_config.json content.

    Returns:
      ``directory`` as a ``Path``.

    Example:
      >>> import numpy as np, tempfile, pathlib
      >>> from lorax.io.peft import write_adapter
      >>> d = write_adapter(tempfile.mkdtemp(), {"w": np.ones(2, np.float32)}, {"r": 1})
      >>> sorted(p.name for p in pathlib.Path(d).iterdir())
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    directory = Path(directory)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        weights, settings = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        partial = directory / f".{WEIGHTS_FILE}.partial"
        save_file(dict(tensors), str(partial), metadata={"format": "pt"})
        os.replace(partial, weights)
        partial = directory / f".{CONFIG_FILE}.partial"
        partial.write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        os.replace(partial, settings)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lorax.export_peft {directory}")
    return directory


# flax path -> (HF module name, layer index along a scanned stack or None)
ModuleMap = Mapping[str, list[tuple[str, int | None]]]


def adapted_modules(
    what: str, names: ModuleMap, path: str, holds: Callable[[str], bool]
) -> list[tuple[str, int | None]] | None:
    """The modules of the Flax kernel ``path`` that an adapter holds tensors for.

    Args:
      what: the calling function's name, for the error message.
      names: ``{flax_kernel_path: [(module name, layer), ...]}``, a module map's
        ``modules``.
      path: the kernel's '/'-joined path.
      holds: whether the adapter's tensors include a module's (by module name).

    Returns:
      ``[(module name, layer), ...]``, or None when ``path`` is not in the map or the
      adapter holds none of its modules.

    Raises:
      LoraxValueError: the adapter holds some but not all of the layers stacked in
        ``path`` (a partial adapter cannot be one stacked leaf).

    Example:
      >>> adapted_modules("f", {"h/kernel": [("h.0", 0), ("h.1", 1)]}, "h/kernel",
      ...                 lambda n: True)
      [('h.0', 0), ('h.1', 1)]
    """
    if path not in names:
        return None
    found = [(n, layer) for n, layer in names[path] if holds(n)]
    if not found:
        return None
    if len(found) != len(names[path]):
        raise LoraxValueError(
            f"{what}: the adapter covers {len(found)} of the {len(names[path])} layers "
            f"stacked in '{path}'"
        )
    return found


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftModuleMap:
    """What PEFT interop needs to know of a model: the PyTorch module of each adapted Flax
    kernel, and the options of adapter_config.json that describe the base.

    Attributes:
      modules: ``{flax_kernel_path: module}``, the path '/'-joined as
        ``"h_0/attn/c_attn/kernel"``. ``module`` is a PyTorch module name
        (``"transformer.h.0.attn.c_attn"``), or for a scanned stack (a kernel with a leading
        layer axis) the list ``[(module_name, layer_index), ...]`` of every layer, indices
        ``0 .. n-1``. Stored normalized: each value a tuple of ``(name, layer)`` pairs
        sorted by layer, ``layer`` None for an unstacked kernel.
      fan_in_fan_out: written to adapter_config.json: the base module stores its weight
        ``[in, out]`` (GPT-2's ``Conv1D``), not ``[out, in]`` as ``torch.nn.Linear``.
      task_type: PEFT's ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ... or None).
      tensors: ``{flax_path: tensor}`` for any parameter (biases, norms, heads): its full
        Hugging Face tensor name (``"transformer.ln_f.weight"``), or for a stacked one the
        list ``[(name, layer), ...]``; normalized as ``modules``. What peft's
        ``modules_to_save`` and trained biases (:class:`lorax.Unfrozen` leaves) are named;
        a ``/kernel`` tensor is stored transposed unless ``fan_in_fan_out``. Default: none.

    Raises:
      LoraxTypeError: a field of the wrong type (a module name that is not a string, a layer
        that is not an int).
      LoraxValueError: an empty name or list, a negative or repeated layer index, indices
        that are not ``0 .. n-1``, or an unstacked entry beside others for one path.

    Example:
      >>> from lorax.io.peft import PeftModuleMap
      >>> m = PeftModuleMap(modules={"dense/kernel": "dense",
      ...                            "ScanLayers/proj/kernel": [("blocks.1.proj", 1),
      ...                                                       ("blocks.0.proj", 0)]})
      >>> m.modules["dense/kernel"], m.modules["ScanLayers/proj/kernel"]
      ((('dense', None),), (('blocks.0.proj', 0), ('blocks.1.proj', 1)))
      >>> m.fan_in_fan_out, m.task_type
      (False, 'CAUSAL_LM')
    """

    modules: Mapping[str, Any]
    fan_in_fan_out: bool = False
    task_type: str | None = "CAUSAL_LM"
    tensors: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        where = "lorax.io.peft.PeftModuleMap"
        if not isinstance(self.modules, Mapping):
            raise LoraxTypeError(
                f"{where}: modules must be a mapping {{flax_kernel_path: "
                f"module name or [(module name, layer), ...]}}; got "
                f"{type(self.modules).__name__}"
            )
        if not isinstance(self.fan_in_fan_out, bool):
            raise LoraxTypeError(
                f"{where}: fan_in_fan_out must be True or False; got "
                f"{type(self.fan_in_fan_out).__name__} {self.fan_in_fan_out!r}"
            )
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise LoraxTypeError(
                f"{where}: task_type must be a string or None; got "
                f"{type(self.task_type).__name__} {self.task_type!r}"
            )
        modules = {path: _entries(where, path, value) for path, value in self.modules.items()}
        object.__setattr__(self, "modules", types.MappingProxyType(modules))
        if not isinstance(self.tensors, Mapping):
            raise LoraxTypeError(
                f"{where}: tensors must be a mapping {{flax_path: tensor name or "
                f"[(tensor name, layer), ...]}}; got {type(self.tensors).__name__}"
            )
        tensors = {path: _entries(where, path, value) for path, value in self.tensors.items()}
        object.__setattr__(self, "tensors", types.MappingProxyType(tensors))


def _entries(where: str, path: Any, value: Any) -> tuple[tuple[str, int | None], ...]:
    """One value of :attr:`PeftModuleMap.modules`, checked and normalized."""
    if not isinstance(path, str) or not path:
        raise LoraxTypeError(
            f"{where}: a key of modules is {type(path).__name__} {path!r}; "
            "keys are '/'-joined Flax kernel paths such as 'dense/kernel'"
        )
    if isinstance(value, str):
        value = [(value, None)]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise LoraxValueError(
            f"{where}: modules['{path}'] must be a module name or a non-empty "
            f"list [(module name, layer), ...]; got {value!r}"
        )
    out = []
    for entry in value:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise LoraxTypeError(
                f"{where}: modules['{path}'] holds {entry!r}; each entry is a "
                "pair (module name, layer index or None)"
            )
        name, layer = entry
        if not isinstance(name, str) or not name:
            raise LoraxTypeError(
                f"{where}: modules['{path}'] names module {name!r}; module "
                "names are non-empty strings such as 'model.layers.0.q_proj'"
            )
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise LoraxTypeError(
                f"{where}: modules['{path}'] gives '{name}' layer "
                f"{type(layer).__name__} {layer!r}; a layer is an int or None"
            )
        out.append((name, layer))
    layers = [layer for _, layer in out]
    if None in layers:
        if len(out) > 1:
            raise LoraxValueError(
                f"{where}: modules['{path}'] has {len(out)} entries, one "
                "without a layer index; an unstacked kernel is one module, "
                "a stacked one lists (name, layer) for each layer"
            )
        return tuple(out)
    if sorted(layers) != list(range(len(layers))):
        raise LoraxValueError(
            f"{where}: modules['{path}'] gives layers {layers}; a stacked "
            f"kernel lists each layer 0 .. n-1 once"
        )
    return tuple(sorted(out, key=lambda e: e[1]))


@runtime_checkable
class PeftFamily(Protocol):
    """A model family, or a model instance, that knows its PEFT module map.

    Any object with this method is one; ``lorax.models.gpt2.GPT2`` and
    ``lorax.models.llama.Llama`` instances are.

    Example:
      >>> from lorax.io.peft import PeftFamily, PeftModuleMap
      >>> class Tiny:
      ...     def peft_modules(self, params):
      ...         return PeftModuleMap(modules={"proj/kernel": "proj"})
      >>> isinstance(Tiny(), PeftFamily)
      True
    """

    def peft_modules(self, params: Any) -> PeftModuleMap:
        """The module map for ``params`` (a parameter tree of this family, wrapped or not).

        Args:
          params: the tree being exported, or the base that an adapter is imported onto.

        Returns:
          The :class:`PeftModuleMap` of its kernels.
        """
        ...


FamilyLike = PeftFamily | Callable[[Any], PeftModuleMap]
_FAMILIES: dict[str, FamilyLike] = {}


def register_peft_family(name: str, family: FamilyLike) -> None:
    """Makes ``model=name`` in :func:`export_peft` / :func:`import_peft` mean ``family``.

    ``import lorax.models`` registers ``"gpt2"`` and ``"llama"``. Registering a name again
    replaces its family.

    Args:
      name: the string callers pass as ``model``.
      family: a :class:`PeftFamily`, or a function ``params -> PeftModuleMap``.

    Raises:
      LoraxTypeError: ``name`` is not a non-empty string, or ``family`` has no
        ``peft_modules`` method and is not callable.

    Example:
      >>> from lorax.io.peft import PeftModuleMap, register_peft_family
      >>> register_peft_family("tiny-doc", lambda params: PeftModuleMap(modules={
      ...     "proj/kernel": "proj"}))
      >>> import lorax.io.peft
      >>> lorax.io.peft.peft_module_map({}, "tiny-doc").modules
      mappingproxy({'proj/kernel': (('proj', None),)})
    """
    where = "lorax.io.peft.register_peft_family"
    if not isinstance(name, str) or not name:
        raise LoraxTypeError(
            f"{where}: name must be a non-empty string; got {type(name).__name__} {name!r}"
        )
    if not (isinstance(family, PeftFamily) or callable(family)):
        raise LoraxTypeError(
            f"{where}: family for {name!r} must have a method "
            "peft_modules(params) or be a function params -> PeftModuleMap; "
            f"got {type(family).__name__} {family!r}"
        )
    _FAMILIES[name] = family


def _model_help() -> str:
    return (
        f"registered names: {sorted(_FAMILIES)} (`import lorax.models` registers 'gpt2' "
        "and 'llama'; lorax.io.peft.register_peft_family adds one); or pass a model with a "
        "peft_modules(params) method, a lorax.io.peft.PeftModuleMap, or a mapping "
        "{flax_path: module_name}"
    )


def peft_module_map(
    params: Any, model: Any, where: str = "lorax.io.peft.peft_module_map"
) -> PeftModuleMap:
    """The :class:`PeftModuleMap` that ``model`` gives for ``params``.

    Args:
      params: a parameter tree, wrapped (for export) or a base (for import).
      model: a :class:`PeftModuleMap`, a :class:`PeftFamily` (e.g. a reference model
        instance), the name of a registered family, or a mapping ``{flax_path: module_name}``.
      where: the caller, named in errors.

    Returns:
      The module map.

    Raises:
      LoraxValueError: a name that no family is registered under (the error lists those that
        are).
      LoraxTypeError: ``model`` of another kind, or a family that does not return a
        :class:`PeftModuleMap`.

    Example:
      >>> from lorax.io.peft import peft_module_map
      >>> peft_module_map({}, {"dense/kernel": "dense"}).modules["dense/kernel"]
      (('dense', None),)
    """
    if isinstance(model, PeftModuleMap):
        return model
    if isinstance(model, str):
        if model not in _FAMILIES:
            raise LoraxValueError(
                f"{where}: no model family {model!r} is registered; {_model_help()}"
            )
        family, what = _FAMILIES[model], f"family {model!r}"
    elif isinstance(model, Mapping):
        return PeftModuleMap(modules=model)
    elif isinstance(model, PeftFamily):
        family, what = model, f"{type(model).__name__}.peft_modules"
    else:
        raise LoraxTypeError(
            f"{where}: model must name a family or map modules; got "
            f"{type(model).__name__} {model!r}; {_model_help()}"
        )
    out = family.peft_modules(params) if isinstance(family, PeftFamily) else family(params)
    if not isinstance(out, PeftModuleMap):
        raise LoraxTypeError(
            f"{where}: {what} returned {type(out).__name__}, not a lorax.io.peft.PeftModuleMap"
        )
    return out


def module_map(params: Any, model: Any) -> dict[str, list[tuple[str, int | None]]]:
    """Each kernel path of ``params`` with its Hugging Face module name(s) for ``model``: the
    ``modules`` of :func:`peft_module_map`, as lists (the 0.1 form).

    Example:
      >>> from lorax.io.peft import module_map
      >>> module_map({}, {"dense/kernel": "dense"})
      {'dense/kernel': [('dense', None)]}
    """
    return {path: list(entries) for path, entries in peft_module_map(params, model).modules.items()}


def export_peft(
    directory: str | os.PathLike,
    tree: Any,
    /,
    *,
    model: Any = "gpt2",
    base_model_name: str | None = None,
) -> Path:
    """Writes the LoRA leaves of ``tree`` as a Hugging Face PEFT adapter directory.

    A tree of :class:`lorax.AdaLoraWeight` leaves is written as peft's AdaLoRA adapter
    (``peft_type`` ``ADALORA``: the masked triplets cut out, a ``rank_pattern`` of those
    kept; see ``lorax/io/peft_adalora.py``), one of :class:`lorax.IA3Weight` leaves as
    peft's IA3 adapter (``peft_type`` ``IA3``, input-scaled leaves as
    ``feedforward_modules``; see ``lorax/io/peft_ia3.py``), one of :class:`lorax.VeraWeight`
    leaves as peft's VeRA adapter (``peft_type`` ``VERA``, the shared projections saved
    once; see ``lorax/io/peft_vera.py``). :class:`lorax.Unfrozen` leaves
    (``lorax.unfreeze``) beside them are written as peft writes fully trained tensors (see
    ``lorax/io/peft_saved.py``): the bias of a LoRA-adapted module as a trained bias
    (``bias="lora_only"``), the lone bias of another module too (``bias="all"``), and any
    other module with an Unfrozen tensor as a ``modules_to_save`` entry, every tensor of it
    written. They need the model map's ``tensors`` (the reference models give them).

    Args:
      directory: where adapter_config.json and adapter_model.safetensors go.
      tree: a wrapped tree (from ``lorax.wrap`` or ``lorax.combine``).
      model: what names the modules (see :func:`peft_module_map`): a registered family
        name (``"gpt2"``, ``"llama"`` once ``lorax.models`` is imported), a model with
        ``peft_modules(params)`` (a reference model instance), a :class:`PeftModuleMap`, or
        a mapping ``{flax_path: torch_module_name}``.
      base_model_name: recorded as ``base_model_name_or_path``.

    Returns:
      The directory.

    Raises:
      LoraxValueError: a leaf that PEFT's LoRA cannot express (not a 2-D kernel per layer),
        an Unfrozen tensor peft cannot hold (a weight of an adapted module, a bias of an
        IA3- or AdaLoRA-adapted one, a path the map names no tensor for), an output-scaled
        IA3 leaf on a module with a bias (peft scales the bias too),
        a path the module map does not know, a stacked path whose map lists another number of
        layers than its factors hold, or a family name that is not registered.
      LoraxTypeError: a ``model`` that is neither of the kinds above.

    Example:
      >>> import tempfile, jax.numpy as jnp, lorax
      >>> lp = lorax.wrap({"proj": {"kernel": jnp.ones((4, 3))}}, rank=2)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lorax.export_peft(d, lp, model={"proj/kernel": "proj"})
      ...     back = lorax.import_peft(d, {"proj": {"kernel": jnp.ones((4, 3))}},
      ...                              model={"proj/kernel": "proj"})
      >>> back["proj"]["kernel"].a.shape
      (4, 2)
    """
    from lorax.io.checkpoint import host_value
    from lorax.sharding import unbox

    tree = unbox(tree)
    modules = peft_module_map(tree, model, "lorax.export_peft")
    names = modules.modules
    if any(
        getattr(x, "kind", None) == "adalora" for x in jax.tree.leaves(tree, is_leaf=is_lorax_leaf)
    ):
        from lorax.io.peft_adalora import export_adalora  # peft_type ADALORA

        return export_adalora(Path(directory), tree, modules, base_model_name)
    if any(
        getattr(x, "kind", None) == "vera" for x in jax.tree.leaves(tree, is_leaf=is_lorax_leaf)
    ):
        from lorax.io.peft_vera import export_vera  # peft_type VERA

        return export_vera(Path(directory), tree, modules, base_model_name)
    if any(
        getattr(x, "kind", None) in ("loha", "lokr")
        for x in jax.tree.leaves(tree, is_leaf=is_lorax_leaf)
    ):
        from lorax.io.peft_lycoris import export_lycoris  # peft_type LOHA / LOKR

        return export_lycoris(Path(directory), tree, modules, base_model_name)
    if any(isinstance(x, IA3Weight) for x in jax.tree.leaves(tree, is_leaf=is_lorax_leaf)):
        from lorax.io.peft_ia3 import export_ia3  # peft_type IA3

        return export_ia3(Path(directory), tree, modules, base_model_name)
    if any(getattr(x, "kind", None) == "oft" for x in jax.tree.leaves(tree, is_leaf=is_lorax_leaf)):
        from lorax.io.peft_oft import export_oft  # peft_type OFT

        return export_oft(Path(directory), tree, modules, base_model_name)
    tensors, ranks, alphas, kinds, dropouts = {}, {}, {}, set(), {0.0}
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]
    for key_path, leaf in flat:
        if not is_lorax_leaf(leaf) or isinstance(leaf, Unfrozen):
            continue  # Unfrozen: modules_to_save or a trained bias, below
        path = path_str(key_path)
        if type(leaf) not in (LoraWeight, DoraWeight):
            raise LoraxValueError(
                f"lorax.export_peft: '{path}' is a {type(leaf).__name__}; only "
                "LoRA, DoRA, AdaLoRA and IA3 leaves (and Unfrozen ones beside them) are "
                "exported"
            )
        kinds.add(type(leaf))
        dropouts.add(leaf.dropout)
        if path not in names:
            raise LoraxValueError(
                f"lorax.export_peft: no Hugging Face module is known for "
                f"'{path}'; pass ... matching the tree, or a mapping"
            )
        a, b = host_value(leaf.a), host_value(leaf.b)  # gathered when sharded
        stacked = names[path][0][1] is not None
        if stacked and (a.ndim < 3 or a.shape[0] != len(names[path])):
            raise LoraxValueError(
                f"lorax.export_peft: the module map lists {len(names[path])} "
                f"stacked layers for '{path}', whose factors have shape "
                f"{a.shape} / {b.shape}"
            )
        for name, layer in names[path]:
            la, lb = (a, b) if layer is None else (a[layer], b[layer])
            if la.ndim != 2 or lb.ndim != 2:
                raise LoraxValueError(
                    f"lorax.export_peft: '{path}' has factors {la.shape} / "
                    f"{lb.shape} per layer; PEFT stores 2-D Linear factors"
                )
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(la.T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lb.T)
            if isinstance(leaf, DoraWeight):
                m = host_value(leaf.magnitude)
                m = m if layer is None else m[layer]
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m)
            ranks[name], alphas[name] = leaf.rank, leaf.scale * leaf.rank
    if not tensors:
        raise LoraxValueError("lorax.export_peft: the tree has no LoRA leaves")
    if len(kinds) > 1:
        raise LoraxValueError(
            "lorax.export_peft: PEFT's use_dora applies to every module; the "
            "tree mixes LoRA and DoRA leaves"
        )
    extra, saved, bias = export_saved(
        tree, modules, set(ranks), what="lorax.export_peft", bias_option=True
    )
    tensors.update(extra)
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": modules.task_type,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "lora_dropout": max(dropouts),
        "bias": bias,
        "fan_in_fan_out": modules.fan_in_fan_out,
        "use_rslora": False,  # lora_alpha = scale * r reproduces any scaling
        "use_dora": DoraWeight in kinds,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "base_model_name_or_path": base_model_name,
        "init_lora_weights": True,
        "modules_to_save": saved,
        "inference_mode": True,
        "peft_version": "0.13.0",
    }
    return write_adapter(directory, tensors, config)


def _pattern(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """peft's rule: a key applies to a module whose name it matches in full or as a suffix
    after a dot."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _read_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"lorax.import_peft: '{file}' is not valid JSON ({e}); it is "
            "truncated or corrupt: save or download it again"
        ) from e
    if not isinstance(config, dict):
        raise CheckpointError(
            f"lorax.import_peft: '{file}' holds a JSON "
            f"{type(config).__name__}, not an object of LoRA options"
        )
    return config


def _check_config(config: Mapping[str, Any], file: Path) -> None:
    """Refuses ranks, alphas and dropouts that would make the scale (alpha / r) or the
    dropout silently wrong."""

    def number(key: str, value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoraxTypeError(
                f"lorax.import_peft: '{file}': {key} must be {what}; got "
                f"{type(value).__name__} {value!r}"
            )

    ranks = [("r", config.get("r", 8))]
    alphas = [("lora_alpha", config.get("lora_alpha", 8))]
    for key, out in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise LoraxTypeError(
                f"lorax.import_peft: '{file}': {key} must be an object "
                f"{{module name: value}}; got {pattern!r}"
            )
        out += [(f"{key}[{k!r}]", v) for k, v in pattern.items()]
    for key, r in ranks:
        number(key, r, "a positive int")
        if not (isinstance(r, int) and r > 0):
            raise LoraxValueError(
                f"lorax.import_peft: '{file}': {key} must be a positive int; got {r!r}"
            )
    for key, alpha in alphas:
        number(key, alpha, "a finite number")
        if not math.isfinite(alpha):
            raise LoraxValueError(
                f"lorax.import_peft: '{file}': {key} must be a finite number; got {alpha!r}"
            )
    dropout = config.get("lora_dropout") or 0.0
    number("lora_dropout", dropout, "a number in [0, 1)")
    if not 0.0 <= dropout < 1.0:
        raise LoraxValueError(
            f"lorax.import_peft: '{file}': lora_dropout must be in [0, 1); got {dropout!r}"
        )
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config.get(flag) or False, bool):
            raise LoraxTypeError(
                f"lorax.import_peft: '{file}': {flag} must be true or false; got {config[flag]!r}"
            )


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``file``, checked to be finite floating point (bfloat16 included)."""
    try:
        with safe_open(file, framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError (not exported): the file does not parse
        raise CheckpointError(
            f"lorax.import_peft: '{file}' is not a readable safetensors file "
            f"({type(e).__name__}: {e}); it is truncated or corrupt: save or "
            "download it again"
        ) from e
    for key, value in tensors.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise LoraxTypeError(
                f"lorax.import_peft: tensor '{key}' of '{file}' is "
                f"{value.dtype}; LoRA factors are floating point"
            )
        values = value if value.dtype.kind == "f" else value.astype(np.float32)  # bfloat16
        if not np.isfinite(values).all():
            raise NonFiniteError(f"lorax.import_peft: tensor '{key}' of '{file}' holds inf or NaN")
    return tensors


def import_peft(
    directory: str | os.PathLike, params: Any, /, *, model: Any = "gpt2", dtype: Any = None
) -> Any:
    """Puts the LoRA (AdaLoRA, IA3) adapter in a Hugging Face PEFT directory onto ``params``.

    Full tensors in the file, peft's ``modules_to_save`` copies and the biases of
    ``bias="all"`` / ``"lora_only"``, become :class:`lorax.Unfrozen` leaves (a stacked path
    whose file holds only some layers keeps the base's values in the others).

    Args:
      directory: holds adapter_config.json and adapter_model.safetensors; or a Hub
        repository name (downloaded when online, else read from the cache).
      params: the base parameters (dense or NF4), as from ``from_pretrained``.
      model: as for :func:`export_peft`.
      dtype: dtype of the factors; default: as stored.

    Returns:
      ``params`` with :class:`lorax.LoraWeight` leaves where the adapter has factors
      (:class:`lorax.AdaLoraWeight` leaves for a ``peft_type`` ``ADALORA`` adapter, the
      triplets its ``rank_pattern`` prunes present as zeros with mask 0;
      :class:`lorax.IA3Weight` leaves for ``IA3``, :class:`lorax.VeraWeight` leaves for
      ``VERA``, :class:`lorax.LohaWeight` /
      :class:`lorax.LokrWeight` leaves for ``LOHA`` /
      ``LOKR``, see ``lorax/io/peft_lycoris.py``), and :class:`lorax.Unfrozen` leaves for
      the full tensors.

    Raises:
      ValueError: not a LoRA, AdaLoRA or IA3 adapter, an option lorax does not reproduce
        (``lora_bias``, a ``bias`` not ``none`` / ``all`` / ``lora_only``, IA3 scaling the
        output of a module with a bias), a full tensor for a parameter the adapter also
        adapts, an ``r`` / ``rank_pattern`` that disagrees with the factors' rank
        or an ``r``, ``lora_alpha`` or ``lora_dropout`` out of range, factors whose shapes do
        not fit the base (naming both), non-finite factors, or tensors that no parameter takes
        (nothing is dropped silently). :class:`lorax.CheckpointError` (a ValueError) names a
        file that is not valid JSON or safetensors (truncated, corrupt).
      TypeError: a config value or a factor of the wrong type (``lora_alpha`` a string,
        integer factors), or a ``model`` of no kind :func:`peft_module_map` takes.

    The errors are lorax's (:class:`lorax.LoraxError`); a ``model`` name that no family is
    registered under is a ValueError listing the names that are, raised before any file is
    read.

    Example:
      :func:`export_peft`'s example exports an adapter and imports it back.
    """
    pmap = peft_module_map(params, model, "lorax.import_peft")
    names = pmap.modules
    directory = Path(directory)
    if not directory.is_dir() and not directory.exists():  # a Hub name: download or cache
        try:
            from huggingface_hub import snapshot_download

            directory = Path(
                snapshot_download(str(directory), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
            )
        except Exception as e:
            raise LoraxFileNotFoundError(
                f"lorax.import_peft: '{directory}' is not a local directory and the Hugging "
                f"Face Hub could not provide it ({type(e).__name__}: {e}); download "
                f"{CONFIG_FILE} and {WEIGHTS_FILE} and pass their directory"
            ) from e
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file).is_file():
            raise LoraxFileNotFoundError(f"lorax.import_peft: no {file} in '{directory}'")
    config = _read_config(directory / CONFIG_FILE)
    if config.get("peft_type") == "OFT":
        from lorax.io.peft_oft import import_oft_directory  # peft_type OFT

        return import_oft_directory(directory, params, pmap, config, dtype)
    if config.get("peft_type") not in ("LORA", "ADALORA", "IA3", "VERA", "LOHA", "LOKR"):
        raise LoraxValueError(
            f"lorax.import_peft: peft_type {config.get('peft_type')!r} is not LORA, ADALORA, "
            "IA3, VERA, LOHA or LOKR"
        )
    if config["peft_type"] == "VERA" and config.get("bias") == "vera_only":
        config = {**config, "bias": "lora_only"}  # VeRA's name for it
    check_options(config, directory / CONFIG_FILE)
    tensors, full = split_saved(
        {
            k[len(PREFIX) :] if k.startswith(PREFIX) else k: v
            for k, v in _read_tensors(directory / WEIGHTS_FILE).items()
        }
    )  # full: modules_to_save copies and trained biases, Unfrozen leaves

    def with_saved(tree: Any) -> Any:
        if not full:
            return tree
        return import_saved(tree, full, pmap, file=directory / WEIGHTS_FILE, dtype=dtype)

    if config["peft_type"] == "ADALORA":
        from lorax.io.peft_adalora import import_adalora

        return with_saved(import_adalora(directory, params, names, config, tensors, dtype))
    if config["peft_type"] == "VERA":
        from lorax.io.peft_vera import import_vera, split_vera

        vera, full = split_vera({**tensors, **full})
        return with_saved(import_vera(directory, params, names, config, vera, dtype))
    if config["peft_type"] in ("LOHA", "LOKR"):
        from lorax.io.peft_lycoris import import_lycoris, split_lycoris

        factors, full = split_lycoris({**tensors, **full})
        return with_saved(import_lycoris(directory, params, names, config, factors, dtype))
    if config["peft_type"] == "IA3":
        from lorax.io.peft_ia3 import import_ia3

        tree, used_ia3 = import_ia3(directory, params, names, config, tensors, dtype)
        unused = sorted(set(tensors) - used_ia3)
        if unused:
            raise LoraxValueError(
                f"lorax.import_peft: {len(unused)} adapter tensors fit no parameter "
                f"of this model, e.g. {unused[:4]}"
            )
        return with_saved(tree)
    _check_config(config, directory / CONFIG_FILE)
    tensors = {
        re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k): v
        for k, v in tensors.items()
    }  # keys saved with an adapter name
    tensors = {
        re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", ".lora_magnitude_vector", k): v
        for k, v in tensors.items()
    }
    dropout = float(config.get("lora_dropout") or 0.0)
    used: set[str] = set()

    def build(path: str, leaf: Any) -> Any:
        found = adapted_modules(
            "lorax.import_peft", names, path, lambda n: f"{n}.lora_A.weight" in tensors
        )
        if found is None:
            return None
        a_list, b_list, m_list, scales = [], [], [], set()
        dora = bool(config.get("use_dora"))
        for name, _ in found:
            if f"{name}.lora_B.weight" not in tensors:
                raise LoraxValueError(
                    f"lorax.import_peft: '{name}' has lora_A but no lora_B in "
                    f"'{directory / WEIGHTS_FILE}'"
                )
            la, lb = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
            used.update({f"{name}.lora_A.weight", f"{name}.lora_B.weight"})
            if la.ndim != 2 or lb.ndim != 2 or la.shape[0] != lb.shape[1]:
                raise LoraxValueError(
                    f"lorax.import_peft: '{name}' has lora_A {la.shape} and "
                    f"lora_B {lb.shape}; PEFT's factors are [r, in] and "
                    "[out, r]"
                )
            r = _pattern(config.get("rank_pattern"), name, config.get("r", 8))
            if r != la.shape[0]:  # PEFT's own loader would refuse it; the scale would be off
                source = (
                    "rank_pattern"
                    if _pattern(config.get("rank_pattern"), name, None) is not None
                    else "r"
                )
                raise LoraxValueError(
                    f"lorax.import_peft: module '{name}' has rank "
                    f"{la.shape[0]} factors (lora_A {la.shape}) but "
                    f"'{directory / CONFIG_FILE}' gives it r={r} (from "
                    f"{source}); the scale lora_alpha / r would be wrong"
                )
            alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
            scales.add(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
            a_list.append(la.T)
            b_list.append(lb.T)
            if dora:
                key = f"{name}.lora_magnitude_vector"
                if key not in tensors:
                    raise LoraxValueError(
                        f"lorax.import_peft: use_dora is set but '{key}' is missing"
                    )
                used.add(key)
                if tensors[key].shape != (lb.shape[0],):
                    raise LoraxValueError(
                        f"lorax.import_peft: '{key}' has shape "
                        f"{tensors[key].shape}; the module's output needs "
                        f"({lb.shape[0]},)"
                    )
                m_list.append(tensors[key])
        if len(scales) != 1:
            raise LoraxValueError(
                f"lorax.import_peft: the layers stacked in '{path}' have "
                f"different scalings {sorted(scales)}"
            )
        stacked = found[0][1] is not None
        a = np.stack(a_list) if stacked else a_list[0]
        b = np.stack(b_list) if stacked else b_list[0]
        if stacked and (len(leaf.shape) != 3 or leaf.shape[0] != len(found)):
            raise LoraxValueError(
                f"lorax.import_peft: the module map lists {len(found)} "
                f"stacked layers for '{path}', a base of shape "
                f"{tuple(leaf.shape)}"
            )
        per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
        if (a.shape[-2], b.shape[-1]) != per_layer or a.shape[-1] != b.shape[-2]:
            raise LoraxValueError(
                f"lorax.import_peft: '{found[0][0]}' has lora_A "
                f"{a_list[0].T.shape} and lora_B {b_list[0].T.shape}, which do "
                f"not fit the base '{path}' of shape {tuple(leaf.shape)}"
            )
        cast = (lambda x: jnp.asarray(x, dtype)) if dtype else jnp.asarray
        if dora:
            m = np.stack(m_list) if stacked else m_list[0]
            return DoraWeight(
                leaf, cast(a), cast(b), scale=scales.pop(), dropout=dropout, magnitude=cast(m)
            )
        return LoraWeight(leaf, cast(a), cast(b), scale=scales.pop(), dropout=dropout)

    out, _ = attach(params, build, what="lorax.import_peft")
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoraxValueError(
            f"lorax.import_peft: {len(unused)} adapter tensors fit no parameter "
            f"of this model, e.g. {unused[:4]}"
        )
    return with_saved(out)
