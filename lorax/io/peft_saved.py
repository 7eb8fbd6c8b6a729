"""Hugging Face PEFT interop for fully trained tensors: peft's ``modules_to_save`` and LoRA's
``bias="all"`` / ``"lora_only"``, both as :class:`lorax.Unfrozen` leaves.

peft saves a module of ``modules_to_save`` as a full copy of its tensors, named as in the base
model (``base_model.model.<module>.weight``: the ``modules_to_save.<adapter>`` part is dropped),
and a trained bias as ``<module>.bias``, or ``<module>.base_layer.bias`` for a LoRA-adapted
module. Which Flax path each tensor is comes from the ``tensors`` of the
:class:`lorax.io.peft.PeftModuleMap` (the reference models give every parameter's); a
``/kernel`` tensor is stored transposed unless the map's ``fan_in_fan_out`` is true.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxValueError
from lorax.leaf import is_lorax_leaf, materialize
from lorax.methods.unfrozen import Unfrozen
from lorax.paths import path_str
from lorax.tree import attach

# a key of an adapter, not a copy
ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+|ia3_l|oft_R|oft_r|oft_embedding_R)(\.|$)")


def _layout(path: str, value: np.ndarray, fan_in_fan_out: bool) -> np.ndarray:
    """A Flax value in PyTorch's layout (and back: the same transpose)."""
    return value.T if path.endswith("/kernel") and not fan_in_fan_out else value


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def export_saved(
    tree: Any, modules: Any, adapted: set[str], *, what: str, bias_option: bool
) -> tuple[dict[str, np.ndarray], list[str] | None, str]:
    """The tensors, ``modules_to_save`` and ``bias`` option that the :class:`Unfrozen` leaves
    of ``tree`` need (``adapted``: the modules that carry an adapter; ``bias_option``: the
    method has peft's ``bias`` option, as LoRA has)."""
    from lorax.io.checkpoint import host_value
    from lorax.io.peft import PREFIX

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]
    values = {path_str(k): leaf for k, leaf in flat}
    unfrozen = [p for p, leaf in values.items() if isinstance(leaf, Unfrozen)]
    if not unfrozen:
        return {}, None, "none"
    table = modules.tensors
    members: dict[str, list[tuple[str, str, int | None]]] = {}  # module -> its tensors
    for path, entries in table.items():
        for name, layer in entries:
            members.setdefault(_module(name), []).append((path, name, layer))
    chosen: dict[str, list[tuple[str, str, int | None]]] = {}
    for path in unfrozen:
        if path not in table:
            raise LoraxValueError(
                f"{what}: no Hugging Face tensor is known for the Unfrozen leaf '{path}'; "
                "pass a model whose PeftModuleMap has tensors= (the reference models "
                "lorax.models.gpt2 / llama give every parameter's)"
            )
        for name, layer in table[path]:
            chosen.setdefault(_module(name), []).append((path, name, layer))

    def value(path: str, layer: int | None) -> np.ndarray:
        v = host_value(materialize(values[path]))
        v = v if layer is None else v[layer]
        return np.ascontiguousarray(_layout(path, v, modules.fan_in_fan_out))

    tensors: dict[str, np.ndarray] = {}
    saved, bias = [], "none"
    for module, entries in sorted(chosen.items()):
        only_bias = all(name.endswith(".bias") for _, name, _ in entries)
        if module in adapted:
            if not (only_bias and bias_option):
                raise LoraxValueError(
                    f"{what}: '{entries[0][0]}' is Unfrozen and its module '{module}' carries "
                    "an adapter; peft can train only the bias of an adapted module, and only "
                    "with LoRA's bias option (not IA3's or AdaLoRA's)"
                )
            for path, _, layer in entries:
                tensors[f"{PREFIX}{module}.base_layer.bias"] = value(path, layer)
            bias = "all" if bias == "all" else "lora_only"
        elif only_bias and bias_option and len(members[module]) > len(entries):
            for path, name, layer in entries:  # a trained bias beside a frozen weight
                tensors[f"{PREFIX}{name}"] = value(path, layer)
            bias = "all"
        else:  # a full copy of the module: every tensor of it, frozen ones included
            saved.append(module)
            for path, name, layer in members[module]:
                tensors[f"{PREFIX}{name}"] = value(path, layer)
    return tensors, saved or None, bias


def check_options(config: Mapping[str, Any], file: Any) -> None:
    """Refuses ``bias`` / ``modules_to_save`` / ``lora_bias`` values lorax cannot reproduce."""
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise LoraxValueError(
            f"lorax.import_peft: '{file}': bias={bias!r}; peft's options are 'none', 'all' "
            "and 'lora_only'"
        )
    saved = config.get("modules_to_save")
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(s, str) for s in saved)
    ):
        raise LoraxValueError(
            f"lorax.import_peft: '{file}': modules_to_save must be a list of module names or "
            f"null; got {saved!r}"
        )
    if config.get("lora_bias"):
        raise LoraxValueError(
            f"lorax.import_peft: '{file}': lora_bias=true (a bias on lora_B) has no lorax "
            "leaf; it is not supported"
        )


def import_saved(
    params: Any,
    tensors: Mapping[str, np.ndarray],
    modules: Any,
    *,
    file: Any,
    dtype: Any,
) -> Any:
    """``params`` with :class:`Unfrozen` leaves for the full tensors of an adapter file
    (``tensors``: the keys without peft's prefix that hold no adapter factor)."""
    what = "lorax.import_peft"
    where: dict[str, tuple[str, int | None]] = {}
    for path, entries in modules.tensors.items():
        for name, layer in entries:
            where[name] = (path, layer)
    found: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in tensors.items():
        if ".original_module." in key:  # peft's copy of the base module: the base itself
            continue
        name = key.replace(".base_layer.", ".")
        if ".modules_to_save." in name:
            plain = name.replace(".modules_to_save.", ".")
            named = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)  # with an adapter name
            name = plain if plain in where else named
        if name not in where:
            unknown.append(key)
            continue
        if name in found and not np.array_equal(found[name], value):
            raise LoraxValueError(f"{what}: '{file}' holds two different values for '{name}'")
        found[name] = value
    if unknown:
        raise LoraxValueError(
            f"{what}: {len(unknown)} adapter tensors fit no parameter of this model, e.g. "
            f"{sorted(unknown)[:4]}"
        )
    by_path: dict[str, list[tuple[int | None, str]]] = {}
    for name in found:
        path, layer = where[name]
        by_path.setdefault(path, []).append((layer, name))

    def build(path: str, leaf: Any) -> Any:
        if path not in by_path:
            return None
        if is_lorax_leaf(leaf):
            raise LoraxValueError(
                f"{what}: '{path}' is both adapted and saved in full by '{file}'; a "
                "parameter is one or the other"
            )
        stored = [_layout(path, found[n], modules.fan_in_fan_out) for _, n in by_path[path]]
        out_dtype = dtype or stored[0].dtype
        value = np.array(leaf, dtype=out_dtype)  # layers the file lacks keep the base
        for (layer, name), v in zip(by_path[path], stored, strict=True):
            want = value.shape if layer is None else value.shape[1:]
            if v.shape != want:
                raise LoraxValueError(
                    f"{what}: '{name}' has shape {v.shape} in '{file}'; the parameter "
                    f"'{path}' needs {want}"
                )
            if layer is None:
                value = v.astype(out_dtype)
            else:
                value[layer] = v
        return Unfrozen(jnp.asarray(value))

    out, _ = attach(params, build, what=what)
    return out


def split_saved(tensors: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``(adapter tensors, full tensors)`` of a file's tensors."""
    adapter = {k: v for k, v in tensors.items() if ADAPTER_KEY.search(k)}
    return adapter, {k: v for k, v in tensors.items() if k not in adapter}
