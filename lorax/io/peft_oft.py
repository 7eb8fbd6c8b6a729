"""Hugging Face PEFT interop for OFT adapters (``peft_type: "OFT"``); :func:`lorax.export_peft`
and :func:`lorax.import_peft` hand :class:`lorax.OftWeight` trees and OFT directories here.

peft stores one tensor per module, ``base_model.model.<module>.oft_R.weight``
``[n, b (b - 1) / 2]`` (``n`` blocks, 1 with ``block_share``), the same layout as
:class:`lorax.OftWeight`'s ``weight``; the options (``oft_block_size`` or ``r``, ``coft``,
``eps``, ``block_share``, ``use_cayley_neumann``, ``num_cayley_neumann_terms``,
``module_dropout``) are one per adapter. peft's OFT adapts ``torch.nn.Linear`` (and Conv2d,
Embedding) modules, not GPT-2's ``Conv1D``: such a model is refused both ways. COFT
parameters are written projected (the values peft computes with).
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
from lorax.methods.oft import OftWeight, block_size_of
from lorax.methods.unfrozen import Unfrozen
from lorax.paths import path_str
from lorax.tree import attach

_OPTIONS = (
    "coft",
    "eps",
    "block_share",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
    "module_dropout",
)
_CONV1D = (
    "peft's OFT adapts torch.nn.Linear modules (and Conv2d, Embedding), not the Conv1D of "
    "this model (fan_in_fan_out: GPT-2); it cannot hold this adapter"
)


def export_oft(directory: Path, tree: Any, modules: Any, base_model_name: str | None) -> Path:
    """Writes the OFT leaves (and Unfrozen ones, as modules_to_save) of ``tree``."""
    from lorax.io.checkpoint import host_value
    from lorax.io.peft import PREFIX
    from lorax.io.peft_saved import export_saved

    what = "lorax.export_peft"
    names = modules.modules
    tensors: dict[str, np.ndarray] = {}
    targets: list[str] = []
    options: dict[tuple, list[str]] = {}
    sizes, counts = set(), set()
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]:
        if not is_lorax_leaf(leaf) or isinstance(leaf, Unfrozen):
            continue
        path = path_str(key_path)
        if not isinstance(leaf, OftWeight):
            raise LoraxValueError(
                f"{what}: '{path}' is a {type(leaf).__name__}; a tree with OFT leaves "
                "exports as one peft OFT adapter, which holds no other kind"
            )
        if modules.fan_in_fan_out:
            raise LoraxValueError(f"{what}: '{path}': {_CONV1D}")
        if path not in names:
            raise LoraxValueError(
                f"{what}: no Hugging Face module is known for '{path}'; pass a model "
                "matching the tree, or a mapping {flax_path: module_name}"
            )
        stacked = names[path][0][1] is not None
        if leaf.stack_ndim != (1 if stacked else 0):
            raise LoraxValueError(
                f"{what}: the OftWeight at '{path}' has shape {leaf.shape}; the module map "
                f"lists {len(names[path])} layer(s) for it"
            )
        options.setdefault(tuple(getattr(leaf, o) for o in _OPTIONS), []).append(path)
        sizes.add(leaf.block_size)
        counts.add(leaf.n_blocks)
        w = host_value(leaf.parameters() if leaf.coft else leaf.weight)
        if stacked and w.shape[0] != len(names[path]):
            raise LoraxValueError(
                f"{what}: the module map lists {len(names[path])} layers for '{path}', "
                f"whose weight has shape {w.shape}"
            )
        for name, layer in names[path]:
            value = w if layer is None else w[layer]
            tensors[f"{PREFIX}{name}.oft_R.weight"] = np.ascontiguousarray(value)
            targets.append(name)
    if not tensors:
        raise LoraxValueError(f"{what}: the tree has no OFT leaves")
    if len(options) > 1:
        sample = {str(dict(zip(_OPTIONS, k, strict=True))): v[0] for k, v in options.items()}
        raise LoraxValueError(
            f"{what}: peft's OFT config holds one set of options per adapter; the OFT "
            f"leaves differ: {sample}"
        )
    if len(sizes) == 1:
        block_size, r = sizes.pop(), 0
    elif len(counts) == 1:
        block_size, r = 0, counts.pop()
    else:
        raise LoraxValueError(
            f"{what}: peft's OFT config gives one oft_block_size or one r for every module; "
            f"the leaves have block sizes {sorted(sizes)} and block counts {sorted(counts)}"
        )
    extra, saved, _ = export_saved(tree, modules, set(targets), what=what, bias_option=False)
    tensors.update(extra)
    config = {
        "peft_type": "OFT",
        "task_type": modules.task_type,
        "target_modules": sorted(targets),
        "fan_in_fan_out": False,
        "modules_to_save": saved,
        "base_model_name_or_path": base_model_name,
        "oft_block_size": block_size,
        "r": r,
        "bias": "none",
        "init_weights": True,
        "inference_mode": True,
        # the version that introduced the current Cayley-Neumann form (peft warns below it)
        "peft_version": "0.18.0",
        **dict(zip(_OPTIONS, next(iter(options)), strict=True)),
    }
    from lorax.io.peft import write_adapter

    return write_adapter(directory, tensors, config)


def import_oft(
    directory: Path,
    params: Any,
    modules: Any,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    dtype: Any,
) -> tuple[Any, set[str]]:
    """``params`` with the OFT rotations of ``tensors`` (keys without peft's prefix) on it,
    and the keys used."""
    from lorax.io.peft import CONFIG_FILE, WEIGHTS_FILE, adapted_modules

    what = "lorax.import_peft"
    names = modules.modules
    file = directory / WEIGHTS_FILE
    if "oft_block_size" not in config or any(".oft_r." in k for k in tensors):
        raise LoraxValueError(
            f"{what}: '{directory / CONFIG_FILE}' is an OFT adapter of peft <= 0.13 (no "
            "oft_block_size, or oft_r tensors), whose parametrization peft itself no longer "
            "loads; retrain it with a newer peft"
        )
    if config.get("bias", "none") not in ("none", "all"):
        raise LoraxValueError(
            f"{what}: '{directory / CONFIG_FILE}': bias={config.get('bias')!r}; lorax "
            "reproduces OFT's bias options 'none' and 'all'"
        )
    embedding = sorted(k for k in tensors if ".oft_embedding_R." in k)
    if embedding:
        raise LoraxValueError(
            f"{what}: '{file}' rotates embedding tables ({embedding[:2]}); lorax's OFT "
            "adapts [in, out] kernels only"
        )
    if modules.fan_in_fan_out:
        raise LoraxValueError(f"{what}: {_CONV1D}")
    if not any(k.endswith(".oft_R.weight") for k in tensors):
        raise LoraxValueError(
            f"{what}: '{file}' holds no OFT rotations (oft_R.weight), e.g. "
            f"{sorted(tensors)[:2]}; its peft_type 'OFT' does not match its tensors"
        )
    share = bool(config.get("block_share", False))
    opts = {
        "coft": bool(config.get("coft", False)),
        "eps": float(config.get("eps", 6e-5)),
        "block_share": share,
        "use_cayley_neumann": bool(config.get("use_cayley_neumann", True)),
        "num_cayley_neumann_terms": int(config.get("num_cayley_neumann_terms", 5)),
        "module_dropout": float(config.get("module_dropout", 0.0) or 0.0),
    }
    used: set[str] = set()

    def build(path: str, leaf: Any) -> Any:
        found = adapted_modules(what, names, path, lambda n: f"{n}.oft_R.weight" in tensors)
        if found is None:
            return None
        stacked = found[0][1] is not None
        per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
        if len(per_layer) != 2:
            raise LoraxValueError(
                f"{what}: the base '{path}' has shape {tuple(leaf.shape)}; peft's OFT "
                "rotations fit a 2-D weight per layer"
            )
        values = []
        for name, _ in found:
            key = f"{name}.oft_R.weight"
            v = np.asarray(tensors[key])
            b = block_size_of(v.shape[-1]) if v.ndim == 2 else None
            n = None if b is None else (1 if share else per_layer[0] // b)
            if b is None or per_layer[0] % b or v.shape[0] != n:
                raise LoraxValueError(
                    f"{what}: '{key}' of '{file}' has shape {v.shape}; the base '{path}' of "
                    f"shape {tuple(leaf.shape)} needs [n, b (b - 1) / 2] with b dividing "
                    f"{per_layer[0]} and n = {'1 (block_share)' if share else 'in / b'}"
                )
            used.add(key)
            values.append(v)
        if len({v.shape for v in values}) != 1:
            raise LoraxValueError(
                f"{what}: the layers stacked in '{path}' have rotations of different block "
                f"sizes: {[v.shape for v in values]}"
            )
        weight = np.stack(values) if stacked else values[0]
        b = block_size_of(weight.shape[-1])
        assert b is not None
        weight = jnp.asarray(weight, dtype) if dtype else jnp.asarray(weight)
        return OftWeight(leaf, weight, block_size=b, **opts)

    out, _ = attach(params, build, what=what)
    return out, used


def import_oft_directory(
    directory: Path, params: Any, modules: Any, config: Mapping[str, Any], dtype: Any
) -> Any:
    """:func:`lorax.import_peft` of a directory whose ``peft_type`` is ``OFT``: the rotations
    as :class:`lorax.OftWeight` leaves, full tensors (``modules_to_save``, ``bias="all"``)
    as :class:`lorax.Unfrozen` ones."""
    from lorax.io.peft import PREFIX, WEIGHTS_FILE, _read_tensors
    from lorax.io.peft_saved import check_options, import_saved, split_saved

    if config.get("bias", "none") != "oft_only":  # refused with its own message below
        check_options(config, directory / "adapter_config.json")
    tensors, full = split_saved(
        {
            k[len(PREFIX) :] if k.startswith(PREFIX) else k: v
            for k, v in _read_tensors(directory / WEIGHTS_FILE).items()
        }
    )
    tensors = {  # keys saved with an adapter name
        re.sub(r"\.oft_R(\.[^.]+)?\.weight$", ".oft_R.weight", k): v for k, v in tensors.items()
    }
    tree, used = import_oft(directory, params, modules, config, tensors, dtype)
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoraxValueError(
            f"lorax.import_peft: {len(unused)} adapter tensors fit no parameter of this "
            f"model, e.g. {unused[:4]}"
        )
    if full:
        tree = import_saved(tree, full, modules, file=directory / WEIGHTS_FILE, dtype=dtype)
    return tree
