"""Hugging Face PEFT interop: LoRA adapters out to, and in from, the directory layout that
``peft.PeftModel.from_pretrained`` (and vLLM) read: adapter_config.json plus
adapter_model.safetensors with ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
``lora_B.weight`` ``[out, r]``.

Module names come from the reference model's one table (``hf_table``), the same one its
checkpoint loader reads, so a path such as ``h_3/attn/c_attn/kernel`` (or the layer-3 slice
of ``ScanLayers/attn/c_attn/kernel``) is ``transformer.h.3.attn.c_attn`` in both places.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

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
from lorax.leaf import is_lorax_leaf
from lorax.methods.dora import DoraWeight
from lorax.methods.lora import LoraWeight
from lorax.paths import path_str

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

# flax path -> (HF module name, layer index along a scanned stack or None)
ModuleMap = Mapping[str, list[tuple[str, int | None]]]


def module_map(params: Any, model: Any) -> dict[str, list[tuple[str, int | None]]]:
    """Each kernel path of ``params`` with its Hugging Face module name(s) for ``model``:
    ``"gpt2"``, ``"llama"``, a reference model instance, or a mapping
    ``{flax_path: module_name}`` for other models (unscanned)."""
    if isinstance(model, Mapping):
        return {path: [(name, None)] for path, name in model.items()}
    from lorax.models import gpt2, llama  # the models import lorax, not the reverse

    paths = [path_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lorax_leaf)[0]]
    if isinstance(model, (gpt2.GPT2, llama.Llama)):
        module, config, scan = (gpt2 if isinstance(model, gpt2.GPT2) else llama,
                                model.config, model.scan_layers)
    elif model in ("gpt2", "llama"):
        module = gpt2 if model == "gpt2" else llama
        scan = any(p.startswith("ScanLayers/") for p in paths)
        config = _config_from_paths(module, params, paths, scan)
    else:
        raise LoraxValueError(f"lorax.peft: model must be 'gpt2', 'llama', a reference model or a "
                              f"mapping {{flax_path: module_name}}; got {model!r}")
    out: dict[str, list[tuple[str, int | None]]] = {}
    for entry in module.hf_table(config, scan):
        if entry.path.endswith("/kernel") and entry.name.endswith(".weight"):
            out.setdefault(entry.path, []).append((entry.name[:-len(".weight")], entry.layer))
    return out


def _config_from_paths(module, params, paths, scan):
    prefix = "h" if module.__name__.endswith("gpt2") else "layers"
    if scan:
        leaf = params["ScanLayers"]
        while isinstance(leaf, Mapping):
            leaf = next(iter(leaf.values()))
        n_layers = int(leaf.shape[0])
    else:
        n_layers = 1 + max((int(m.group(1)) for p in paths
                            if (m := re.match(rf"{prefix}_(\d+)/", p))), default=-1)
    if module.__name__.endswith("gpt2"):
        return module.GPT2Config(n_layer=n_layers)
    return module.LlamaConfig(num_hidden_layers=n_layers,
                              tie_word_embeddings=not any(p.startswith("lm_head/") for p in paths))


def export_peft(directory: str | os.PathLike, tree: Any, model: Any = "gpt2",
                base_model_name: str | None = None) -> Path:
    """Writes the LoRA leaves of ``tree`` as a Hugging Face PEFT adapter directory.

    Args:
      directory: where adapter_config.json and adapter_model.safetensors go.
      tree: a wrapped tree (from ``lorax.wrap`` or ``lorax.combine``).
      model: ``"gpt2"``, ``"llama"``, the reference model instance, or a mapping
        ``{flax_path: torch_module_name}``.
      base_model_name: recorded as ``base_model_name_or_path``.

    Returns:
      The directory.

    Raises:
      ValueError: a leaf that PEFT's LoRA cannot express (not a 2-D kernel per layer), or a
        path the model's table does not know.
    """
    names = module_map(tree, model)
    tensors, ranks, alphas, kinds, dropouts = {}, {}, {}, set(), {0.0}
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]
    for key_path, leaf in flat:
        if not is_lorax_leaf(leaf):
            continue
        path = path_str(key_path)
        if type(leaf) not in (LoraWeight, DoraWeight):
            raise LoraxValueError(f"lorax.export_peft: '{path}' is a {type(leaf).__name__}; only "
                                  "LoRA and DoRA leaves are exported")
        kinds.add(type(leaf))
        dropouts.add(leaf.dropout)
        if path not in names:
            raise LoraxValueError(f"lorax.export_peft: no Hugging Face module is known for "
                                  f"'{path}'; pass model=... matching the tree, or a mapping")
        a, b = np.asarray(jax.device_get(leaf.a)), np.asarray(jax.device_get(leaf.b))
        for name, layer in names[path]:
            la, lb = (a, b) if layer is None else (a[layer], b[layer])
            if la.ndim != 2 or lb.ndim != 2:
                raise LoraxValueError(f"lorax.export_peft: '{path}' has factors {la.shape} / "
                                      f"{lb.shape} per layer; PEFT stores 2-D Linear factors")
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(la.T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lb.T)
            if isinstance(leaf, DoraWeight):
                m = np.asarray(jax.device_get(leaf.magnitude))
                m = m if layer is None else m[layer]
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m)
            ranks[name], alphas[name] = leaf.rank, leaf.scale * leaf.rank
    if not tensors:
        raise LoraxValueError("lorax.export_peft: the tree has no LoRA leaves")
    if len(kinds) > 1:
        raise LoraxValueError("lorax.export_peft: PEFT's use_dora applies to every module; the "
                              "tree mixes LoRA and DoRA leaves")
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": sorted(ranks), "lora_dropout": max(dropouts), "bias": "none",
        "fan_in_fan_out": model == "gpt2" or type(model).__name__ == "GPT2",
        "use_rslora": False,  # lora_alpha = scale * r reproduces any scaling
        "use_dora": DoraWeight in kinds,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "base_model_name_or_path": base_model_name, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True, "peft_version": "0.13.0",
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def _pattern(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
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
        raise CheckpointError(f"lorax.import_peft: '{file}' is not valid JSON ({e}); it is "
                              "truncated or corrupt: save or download it again") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"lorax.import_peft: '{file}' holds a JSON "
                              f"{type(config).__name__}, not an object of LoRA options")
    return config


def _check_config(config: Mapping[str, Any], file: Path) -> None:
    """Refuses ranks, alphas and dropouts that would make the scale (alpha / r) or the
    dropout silently wrong."""
    def number(key: str, value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoraxTypeError(f"lorax.import_peft: '{file}': {key} must be {what}; got "
                                 f"{type(value).__name__} {value!r}")

    ranks = [("r", config.get("r", 8))]
    alphas = [("lora_alpha", config.get("lora_alpha", 8))]
    for key, out in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise LoraxTypeError(f"lorax.import_peft: '{file}': {key} must be an object "
                                 f"{{module name: value}}; got {pattern!r}")
        out += [(f"{key}[{k!r}]", v) for k, v in pattern.items()]
    for key, r in ranks:
        number(key, r, "a positive int")
        if not (isinstance(r, int) and r > 0):
            raise LoraxValueError(f"lorax.import_peft: '{file}': {key} must be a positive int; "
                                  f"got {r!r}")
    for key, alpha in alphas:
        number(key, alpha, "a finite number")
        if not math.isfinite(alpha):
            raise LoraxValueError(f"lorax.import_peft: '{file}': {key} must be a finite number; "
                                  f"got {alpha!r}")
    dropout = config.get("lora_dropout") or 0.0
    number("lora_dropout", dropout, "a number in [0, 1)")
    if not 0.0 <= dropout < 1.0:
        raise LoraxValueError(f"lorax.import_peft: '{file}': lora_dropout must be in [0, 1); got "
                              f"{dropout!r}")
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config.get(flag) or False, bool):
            raise LoraxTypeError(f"lorax.import_peft: '{file}': {flag} must be true or false; "
                                 f"got {config[flag]!r}")


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``file``, checked to be finite floating point (bfloat16 included)."""
    try:
        with safe_open(file, framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError (not exported): the file does not parse
        raise CheckpointError(f"lorax.import_peft: '{file}' is not a readable safetensors file "
                              f"({type(e).__name__}: {e}); it is truncated or corrupt: save or "
                              "download it again") from e
    for key, value in tensors.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise LoraxTypeError(f"lorax.import_peft: tensor '{key}' of '{file}' is "
                                 f"{value.dtype}; LoRA factors are floating point")
        values = value if value.dtype.kind == "f" else value.astype(np.float32)  # bfloat16
        if not np.isfinite(values).all():
            raise NonFiniteError(f"lorax.import_peft: tensor '{key}' of '{file}' holds inf or "
                                 "NaN")
    return tensors


def import_peft(directory: str | os.PathLike, params: Any, model: Any = "gpt2",
                dtype: Any = None) -> Any:
    """Puts the LoRA adapter in a Hugging Face PEFT directory onto ``params``.

    Args:
      directory: holds adapter_config.json and adapter_model.safetensors; or a Hub
        repository name (downloaded when online, else read from the cache).
      params: the base parameters (dense or NF4), as from ``from_pretrained``.
      model: as for :func:`export_peft`.
      dtype: dtype of the factors; default: as stored.

    Returns:
      ``params`` with :class:`lorax.LoraWeight` leaves where the adapter has factors.

    Raises:
      ValueError: not a LoRA adapter, an option lorax does not reproduce (bias training,
        modules_to_save), an ``r`` / ``rank_pattern`` that disagrees with the factors' rank
        or an ``r``, ``lora_alpha`` or ``lora_dropout`` out of range, factors whose shapes do
        not fit the base (naming both), non-finite factors, or tensors that no parameter takes
        (nothing is dropped silently). :class:`lorax.CheckpointError` (a ValueError) names a
        file that is not valid JSON or safetensors (truncated, corrupt).
      TypeError: a config value or a factor of the wrong type (``lora_alpha`` a string,
        integer factors).
    """
    directory = Path(directory)
    if not directory.is_dir() and not directory.exists():  # a Hub name: download or cache
        try:
            from huggingface_hub import snapshot_download
            directory = Path(snapshot_download(str(directory),
                                               allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
        except Exception as e:
            raise LoraxFileNotFoundError(
                f"lorax.import_peft: '{directory}' is not a local directory and the Hugging "
                f"Face Hub could not provide it ({type(e).__name__}: {e}); download "
                f"{CONFIG_FILE} and {WEIGHTS_FILE} and pass their directory") from e
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file).is_file():
            raise LoraxFileNotFoundError(f"lorax.import_peft: no {file} in '{directory}'")
    config = _read_config(directory / CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise LoraxValueError(f"lorax.import_peft: peft_type {config.get('peft_type')!r} is not "
                              "LORA")
    for option, ok in [("bias", "none"), ("modules_to_save", None)]:
        if config.get(option, ok) not in (ok, [] if ok is None else ok):
            raise LoraxValueError(f"lorax.import_peft: {option}={config[option]!r} is not "
                                  "supported yet")
    _check_config(config, directory / CONFIG_FILE)
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v
               for k, v in _read_tensors(directory / WEIGHTS_FILE).items()}
    tensors = {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k): v
               for k, v in tensors.items()}  # keys saved with an adapter name
    tensors = {re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$",
                      ".lora_magnitude_vector", k): v for k, v in tensors.items()}
    names = module_map(params, model)
    dropout = float(config.get("lora_dropout") or 0.0)
    used: set[str] = set()

    def attach(key_path, leaf):
        path = path_str(key_path)
        if path not in names:
            return leaf
        found = [(n, layer) for n, layer in names[path] if f"{n}.lora_A.weight" in tensors]
        if not found:
            return leaf
        if len(found) != len(names[path]):
            raise LoraxValueError(f"lorax.import_peft: the adapter covers {len(found)} of the "
                                  f"{len(names[path])} layers stacked in '{path}'")
        a_list, b_list, m_list, scales = [], [], [], set()
        dora = bool(config.get("use_dora"))
        for name, _ in found:
            if f"{name}.lora_B.weight" not in tensors:
                raise LoraxValueError(f"lorax.import_peft: '{name}' has lora_A but no lora_B in "
                                      f"'{directory / WEIGHTS_FILE}'")
            la, lb = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
            used.update({f"{name}.lora_A.weight", f"{name}.lora_B.weight"})
            if la.ndim != 2 or lb.ndim != 2 or la.shape[0] != lb.shape[1]:
                raise LoraxValueError(f"lorax.import_peft: '{name}' has lora_A {la.shape} and "
                                      f"lora_B {lb.shape}; PEFT's factors are [r, in] and "
                                      "[out, r]")
            r = _pattern(config.get("rank_pattern"), name, config.get("r", 8))
            if r != la.shape[0]:  # PEFT's own loader would refuse it; the scale would be off
                source = ("rank_pattern" if _pattern(config.get("rank_pattern"), name, None)
                          is not None else "r")
                raise LoraxValueError(f"lorax.import_peft: module '{name}' has rank "
                                      f"{la.shape[0]} factors (lora_A {la.shape}) but "
                                      f"'{directory / CONFIG_FILE}' gives it r={r} (from "
                                      f"{source}); the scale lora_alpha / r would be wrong")
            alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
            scales.add(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
            a_list.append(la.T)
            b_list.append(lb.T)
            if dora:
                key = f"{name}.lora_magnitude_vector"
                if key not in tensors:
                    raise LoraxValueError(f"lorax.import_peft: use_dora is set but '{key}' is "
                                          "missing")
                used.add(key)
                if tensors[key].shape != (lb.shape[0],):
                    raise LoraxValueError(f"lorax.import_peft: '{key}' has shape "
                                          f"{tensors[key].shape}; the module's output needs "
                                          f"({lb.shape[0]},)")
                m_list.append(tensors[key])
        if len(scales) != 1:
            raise LoraxValueError(f"lorax.import_peft: the layers stacked in '{path}' have "
                                  f"different scalings {sorted(scales)}")
        stacked = found[0][1] is not None
        a = np.stack(a_list) if stacked else a_list[0]
        b = np.stack(b_list) if stacked else b_list[0]
        per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
        if (a.shape[-2], b.shape[-1]) != per_layer or a.shape[-1] != b.shape[-2]:
            raise LoraxValueError(f"lorax.import_peft: '{found[0][0]}' has lora_A "
                                  f"{a_list[0].T.shape} and lora_B {b_list[0].T.shape}, which do "
                                  f"not fit the base '{path}' of shape {tuple(leaf.shape)}")
        cast = (lambda x: jnp.asarray(x, dtype)) if dtype else jnp.asarray
        if dora:
            m = np.stack(m_list) if stacked else m_list[0]
            return DoraWeight(leaf, cast(a), cast(b), scale=scales.pop(), dropout=dropout,
                              magnitude=cast(m))
        return LoraWeight(leaf, cast(a), cast(b), scale=scales.pop(), dropout=dropout)

    out = jax.tree_util.tree_map_with_path(attach, params, is_leaf=is_lorax_leaf)
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoraxValueError(f"lorax.import_peft: {len(unused)} adapter tensors fit no parameter "
                              f"of this model, e.g. {unused[:4]}")
    return out
