"""Hugging Face PEFT interop for AdaLoRA adapters (``peft_type: "ADALORA"``);
:func:`lorax.export_peft` and :func:`lorax.import_peft` hand AdaLoRA trees and directories
here.

peft saves an AdaLoRA adapter with its pruned triplets cut out: per module
``base_model.model.<module>.lora_A`` ``[k, in]``, ``.lora_E`` ``[k, 1]`` and ``.lora_B``
``[out, k]`` (no ``.weight``), ``k`` the rank kept, and in adapter_config.json a
``rank_pattern`` ``{"<module>.lora_E": [bool] * init_r}`` saying which of the ``init_r``
triplets they are. The scaling stays ``lora_alpha / (init_r + 1e-5)`` whatever is kept.
lorax keeps the full ``init_r`` shapes and a mask: export cuts the masked triplets out and
writes the pattern, import puts the stored triplets back at their places with zeros (mask 0)
in the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.methods.adalora import AdaLoraWeight
from lorax.paths import path_str
from lorax.tree import attach

_FIELDS = ("lora_A", "lora_E", "lora_B")


def export_adalora(directory: Path, tree: Any, modules: Any, base_model_name: str | None) -> Path:
    """Writes the AdaLoRA leaves of ``tree``; ``modules`` is the :class:`PeftModuleMap`."""
    from lorax.io.checkpoint import host_value
    from lorax.io.peft import PREFIX

    what = "lorax.export_peft"
    names = modules.modules
    tensors: dict[str, np.ndarray] = {}
    pattern: dict[str, list[bool]] = {}
    ranks, alphas, targets, dropouts = set(), set(), [], {0.0}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]:
        if not is_lorax_leaf(leaf):
            continue
        path = path_str(key_path)
        if not isinstance(leaf, AdaLoraWeight):
            raise LoraxValueError(
                f"{what}: '{path}' is a {type(leaf).__name__}; a tree with AdaLoRA leaves "
                "exports as one peft AdaLoRA adapter, which holds no other kind"
            )
        if path not in names:
            raise LoraxValueError(
                f"{what}: no Hugging Face module is known for '{path}'; pass a model "
                "matching the tree, or a mapping {flax_path: module_name}"
            )
        if leaf.mask is None:
            raise LoraxValueError(
                f"{what}: the AdaLoraWeight at '{path}' has no mask: export the whole "
                "tree, lorax.combine(trainable, frozen)"
            )
        ns = leaf.stack_ndim
        a, e, b = host_value(leaf.a), host_value(leaf.e), host_value(leaf.b)
        mask = host_value(leaf.mask) > 0
        stacked = names[path][0][1] is not None
        if ns != (1 if stacked else 0) or (stacked and a.shape[0] != len(names[path])):
            raise LoraxValueError(
                f"{what}: the module map lists {len(names[path])} layers for '{path}', "
                f"whose factors have shape {a.shape} / {b.shape}"
            )
        for name, layer in names[path]:
            la, le, lb, keep = (
                (a, e, b, mask) if layer is None else (a[layer], e[layer], b[layer], mask[layer])
            )
            if la.ndim != 2 or lb.ndim != 2:
                raise LoraxValueError(
                    f"{what}: '{path}' has factors {la.shape} / {lb.shape} per layer; "
                    "PEFT stores 2-D Linear factors"
                )
            tensors[f"{PREFIX}{name}.lora_A"] = np.ascontiguousarray(la[:, keep].T)
            tensors[f"{PREFIX}{name}.lora_E"] = np.ascontiguousarray(le[keep][:, None])
            tensors[f"{PREFIX}{name}.lora_B"] = np.ascontiguousarray(lb[keep, :].T)
            pattern[f"{name}.lora_E"] = [bool(k) for k in keep]
            targets.append(name)
        ranks.add(leaf.rank)
        alphas.add(float(leaf.alpha))
        dropouts.add(leaf.dropout)
    if len(ranks) > 1 or len(alphas) > 1:
        raise LoraxValueError(
            f"{what}: peft's AdaLoRA has one init_r and one lora_alpha for every module; "
            f"the tree has ranks {sorted(ranks)} and alphas {sorted(alphas)}"
        )
    leaves = [x for x in jax.tree.leaves(tree, is_leaf=is_lorax_leaf) if is_lorax_leaf(x)]
    n_layers = len(targets)
    target_budget = sum(x.target_rank * max(1, int(np.prod(x.e.shape[:-1]))) for x in leaves)
    alpha = alphas.pop()
    config = {
        "peft_type": "ADALORA",
        "task_type": modules.task_type,
        "init_r": ranks.pop(),
        "target_r": max(1, round(target_budget / n_layers)),
        "r": 8,  # unused by AdaLoRA; peft warns when it is not its default
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": sorted(targets),
        "lora_dropout": max(dropouts),
        "bias": "none",
        "fan_in_fan_out": modules.fan_in_fan_out,
        "rank_pattern": pattern,
        # the schedule only matters to peft's training; AdaLoraConfig needs a valid one
        "total_step": 1,
        "tinit": 0,
        "tfinal": 0,
        "base_model_name_or_path": base_model_name,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "peft_version": "0.13.0",
    }
    from lorax.io.peft import write_adapter

    return write_adapter(directory, tensors, config)


def _rank_pattern(config: Mapping[str, Any], file: Path, init_r: int) -> dict[str, list[bool]]:
    """``{module: [kept] * init_r}`` from the config's ``rank_pattern`` (None: all kept)."""
    raw = config.get("rank_pattern") or {}
    if not isinstance(raw, dict):
        raise LoraxTypeError(
            f"lorax.import_peft: '{file}': an AdaLoRA rank_pattern is an object "
            f"{{'<module>.lora_E': [bool, ...]}}; got {raw!r}"
        )
    out = {}
    for key, kept in raw.items():
        module = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
        if (
            not isinstance(kept, list)
            or len(kept) != init_r
            or not all(isinstance(k, bool) for k in kept)
        ):
            raise LoraxValueError(
                f"lorax.import_peft: '{file}': rank_pattern[{key!r}] must list init_r = "
                f"{init_r} bools (which triplets are kept); got {kept!r}"
            )
        out[module] = kept
    return out


def import_adalora(
    directory: Path,
    params: Any,
    names: Mapping[str, Any],
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    dtype: Any,
) -> Any:
    """``params`` with the AdaLoRA adapter of ``directory`` on it (``tensors`` keyed by
    module path without peft's prefix)."""
    from lorax.io.peft import CONFIG_FILE, WEIGHTS_FILE, adapted_modules

    what = "lorax.import_peft"
    file = directory / CONFIG_FILE
    init_r = config.get("init_r", 12)
    alpha = config.get("lora_alpha", 8)
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < 1:
        raise LoraxValueError(f"{what}: '{file}': init_r must be a positive int; got {init_r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise LoraxValueError(f"{what}: '{file}': lora_alpha must be a number; got {alpha!r}")
    alpha = float(alpha) if alpha > 0 else float(init_r)  # peft: alpha <= 0 means r
    target_r = config.get("target_r", 8)
    target_r = target_r if isinstance(target_r, int) and 0 < target_r <= init_r else init_r
    dropout = float(config.get("lora_dropout") or 0.0)
    pattern = _rank_pattern(config, file, init_r)
    tensors = {
        re.sub(r"\.(lora_[AEB])(\.[^.]+)?$", r".\1", k): v for k, v in tensors.items()
    }  # keys saved with an adapter name or ".weight"
    used: set[str] = set()

    def layer(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        keys = [f"{name}.{f}" for f in _FIELDS]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise LoraxValueError(
                f"{what}: '{name}' lacks {missing} in '{directory / WEIGHTS_FILE}'"
            )
        la, le, lb = (tensors[k] for k in keys)
        used.update(keys)
        kept = np.asarray(pattern.get(name, [True] * init_r), bool)
        k = int(kept.sum())
        if la.ndim != 2 or lb.ndim != 2 or la.shape[0] != k or le.shape != (k, 1):
            raise LoraxValueError(
                f"{what}: '{name}' has lora_A {la.shape}, lora_E {le.shape}, lora_B "
                f"{lb.shape}; with {k} of init_r = {init_r} triplets kept (rank_pattern) "
                f"PEFT stores [{k}, in], [{k}, 1] and [out, {k}]"
            )
        if lb.shape[1] != k:
            raise LoraxValueError(f"{what}: '{name}' has lora_B {lb.shape}; expected [out, {k}]")
        a = np.zeros((la.shape[1], init_r), la.dtype)
        b = np.zeros((init_r, lb.shape[0]), lb.dtype)
        e = np.zeros((init_r,), le.dtype)
        a[:, kept], e[kept], b[kept, :] = la.T, le[:, 0], lb.T
        return a, e, b, kept.astype(e.dtype)

    def build(path: str, leaf: Any) -> Any:
        found = adapted_modules(what, names, path, lambda n: f"{n}.lora_A" in tensors)
        if found is None:
            return None
        parts = [layer(n) for n, _ in found]
        stacked = found[0][1] is not None
        a, e, b, mask = (np.stack(p) if stacked else p[0] for p in zip(*parts, strict=True))
        per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
        if (stacked and leaf.shape[0] != len(found)) or (a.shape[-2], b.shape[-1]) != per_layer:
            raise LoraxValueError(
                f"{what}: '{found[0][0]}' has factors for a [{a.shape[-2]}, {b.shape[-1]}] "
                f"weight, which do not fit the base '{path}' of shape {tuple(leaf.shape)}"
            )
        cast = (lambda x: jnp.asarray(x, dtype)) if dtype else jnp.asarray
        return AdaLoraWeight(
            leaf,
            cast(a),
            cast(e),
            cast(b),
            cast(mask),
            alpha=alpha,
            target_rank=target_r,
            dropout=dropout,
        )

    out, _ = attach(params, build, what=what)
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoraxValueError(
            f"{what}: {len(unused)} adapter tensors fit no parameter of this model, "
            f"e.g. {unused[:4]}"
        )
    return out
