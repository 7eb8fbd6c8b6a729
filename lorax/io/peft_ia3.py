"""Hugging Face PEFT interop for IA3 adapters (``peft_type: "IA3"``); :func:`lorax.export_peft`
and :func:`lorax.import_peft` hand :class:`lorax.IA3Weight` trees and IA3 directories here.

peft stores one vector per module, ``base_model.model.<module>.ia3_l``: ``[out, 1]`` for a
module whose output is scaled, ``[1, in]`` for one of ``feedforward_modules``, whose input is
scaled (whatever the base's layout, GPT-2's ``Conv1D`` included). lorax's
:class:`lorax.IA3Weight` holds the same vector flat, ``on="out"`` or ``on="in"``.

One case differs and is refused both ways: peft scales an output-scaled module's whole
output, bias included (``(x·W + b)·l``), lorax's leaf its kernel only (``x·(W·l) + b``). A
module with a bias is exported and imported only as a feedforward (input-scaled) module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.methods.ia3 import IA3Weight
from lorax.methods.unfrozen import Unfrozen
from lorax.paths import path_str
from lorax.tree import attach


def export_ia3(directory: Path, tree: Any, modules: Any, base_model_name: str | None) -> Path:
    """Writes the IA3 leaves (and Unfrozen ones, as modules_to_save) of ``tree``."""
    from lorax.io.checkpoint import host_value
    from lorax.io.peft import PREFIX
    from lorax.io.peft_saved import export_saved

    what = "lorax.export_peft"
    names = modules.modules
    tensors: dict[str, np.ndarray] = {}
    targets, feedforward = [], []
    paths = set(_paths(tree))
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]:
        if not is_lorax_leaf(leaf) or isinstance(leaf, Unfrozen):
            continue
        path = path_str(key_path)
        if not isinstance(leaf, IA3Weight):
            raise LoraxValueError(
                f"{what}: '{path}' is a {type(leaf).__name__}; a tree with IA3 leaves "
                "exports as one peft IA3 adapter, which holds no other kind"
            )
        if path not in names:
            raise LoraxValueError(
                f"{what}: no Hugging Face module is known for '{path}'; pass a model "
                "matching the tree, or a mapping {flax_path: module_name}"
            )
        if leaf.on == "out":
            _refuse_bias(what, path, paths)
        stacked = names[path][0][1] is not None
        if (leaf.n_in, leaf.n_out) != (1, 1) or leaf.stack_ndim != (1 if stacked else 0):
            raise LoraxValueError(
                f"{what}: the IA3Weight at '{path}' has shape {leaf.shape} ({leaf.n_in} input "
                f"and {leaf.n_out} output axes); PEFT's IA3 scales 2-D Linear weights, "
                f"{len(names[path])} per stacked path here"
            )
        v = host_value(leaf.vector)
        if stacked and v.shape[0] != len(names[path]):
            raise LoraxValueError(
                f"{what}: the module map lists {len(names[path])} layers for '{path}', "
                f"whose vector has shape {v.shape}"
            )
        for name, layer in names[path]:
            vec = v if layer is None else v[layer]
            col = vec[None, :] if leaf.on == "in" else vec[:, None]
            tensors[f"{PREFIX}{name}.ia3_l"] = np.ascontiguousarray(col)
            targets.append(name)
            if leaf.on == "in":
                feedforward.append(name)
    if not tensors:
        raise LoraxValueError(f"{what}: the tree has no IA3 leaves")
    extra, saved, _ = export_saved(tree, modules, set(targets), what=what, bias_option=False)
    tensors.update(extra)
    config = {
        "peft_type": "IA3",
        "task_type": modules.task_type,
        "target_modules": sorted(targets),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": modules.fan_in_fan_out,
        "modules_to_save": saved,
        "base_model_name_or_path": base_model_name,
        "init_ia3_weights": True,
        "inference_mode": True,
        "peft_version": "0.13.0",
    }
    from lorax.io.peft import write_adapter

    return write_adapter(directory, tensors, config)


def _paths(tree: Any) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]
    return [path_str(k) for k, _ in flat]


def _refuse_bias(what: str, path: str, paths: set[str]) -> None:
    """An output-scaled module with a bias: peft and lorax would compute different things."""
    bias = path.rsplit("/", 1)[0] + "/bias"
    if path.endswith("/kernel") and bias in paths:
        raise LoraxValueError(
            f"{what}: '{path}' has IA3 scaling its output and a bias '{bias}'; peft's IA3 "
            "scales the whole output, (x·W + b)·l, lorax's IA3Weight the kernel only, "
            "x·(W·l) + b; such a module is supported as a feedforward one (input scaled: "
            "lorax.ia3(..., feedforward=[...]), peft's feedforward_modules)"
        )


def _feedforward(config: Mapping[str, Any], name: str) -> bool:
    """peft's rule: a regex matches the module name in full, a list entry as a suffix."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(key) for key in ff)


def import_ia3(
    directory: Path,
    params: Any,
    names: Mapping[str, Any],
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    dtype: Any,
) -> tuple[Any, set[str]]:
    """``params`` with the IA3 vectors of ``tensors`` (keys without peft's prefix) on it, and
    the keys used."""
    from lorax.io.peft import WEIGHTS_FILE, adapted_modules

    what = "lorax.import_peft"
    if not any(re.search(r"\.ia3_l(\.[^.]+)?$", k) for k in tensors):
        raise LoraxValueError(
            f"{what}: '{directory / WEIGHTS_FILE}' holds no IA3 vectors (ia3_l), e.g. "
            f"{sorted(tensors)[:2]}; its peft_type 'IA3' does not match its tensors"
        )
    tensors = {re.sub(r"\.ia3_l(\.[^.]+)?$", ".ia3_l", k): v for k, v in tensors.items()}
    used: set[str] = set()
    paths = set(_paths(params))

    def build(path: str, leaf: Any) -> Any:
        found = adapted_modules(what, names, path, lambda n: f"{n}.ia3_l" in tensors)
        if found is None:
            return None
        stacked = found[0][1] is not None
        per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
        if len(per_layer) != 2 or (stacked and leaf.shape[0] != len(found)):
            raise LoraxValueError(
                f"{what}: the base '{path}' has shape {tuple(leaf.shape)}; peft's IA3 "
                f"vectors of {len(found)} module(s) fit a 2-D weight per layer"
            )
        ons = {_feedforward(config, n) for n, _ in found}
        if len(ons) != 1:
            raise LoraxValueError(
                f"{what}: feedforward_modules names some but not all of the layers stacked "
                f"in '{path}'"
            )
        on_input = ons.pop()
        if not on_input:
            _refuse_bias(what, path, paths)
        vectors = []
        for name, _ in found:
            key = f"{name}.ia3_l"
            v = tensors[key]
            want = (1, per_layer[0]) if on_input else (per_layer[1], 1)
            if v.shape != want:
                raise LoraxValueError(
                    f"{what}: '{key}' of '{directory / WEIGHTS_FILE}' has shape {v.shape}; "
                    f"the base '{path}' of shape {tuple(leaf.shape)} needs {want} "
                    f"({'a feedforward module: input' if on_input else 'output'} scaled)"
                )
            used.add(key)
            vectors.append(v.reshape(-1))
        vector = np.stack(vectors) if stacked else vectors[0]
        return IA3Weight(
            leaf,
            jnp.asarray(vector, dtype) if dtype else jnp.asarray(vector),
            on="in" if on_input else "out",
        )

    out, _ = attach(params, build, what=what)
    return out, used
