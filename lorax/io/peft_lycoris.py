"""Hugging Face PEFT interop for LoHa and LoKr adapters (``peft_type`` ``"LOHA"`` /
``"LOKR"``); :func:`lorax.export_peft` and :func:`lorax.import_peft` hand
:class:`lorax.LohaWeight` / :class:`lorax.LokrWeight` trees and such directories here.

peft stores each factor of a ``torch.nn.Linear`` module in torch's ``[out, in]`` layout,
``base_model.model.<module>.hada_w1_a`` ... (see ``lorax/methods/hadamard_kron.py`` for the
table); the config gives ``r`` and ``alpha`` (per module through ``rank_pattern`` /
``alpha_pattern``), and for LoKr the ``decompose_factor`` and ``decompose_both`` from which
peft rebuilds each layer's factor shapes when it loads the file, so an export is refused
unless peft's rules give back exactly the leaf's shapes. peft's LoHa and LoKr adapt
``nn.Linear`` and ``nn.Conv1d/2d`` only: a model whose modules store ``[in, out]``
(``fan_in_fan_out``, GPT-2's ``Conv1D``) has no such adapter, and lorax refuses it both ways;
conv kernels and peft's CP-decomposed conv factors (``hada_t1``, ``lokr_t2``) are refused too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax.errors import LoraxTypeError, LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.methods.hadamard_kron import LohaWeight, LokrWeight, lokr_layout
from lorax.methods.unfrozen import Unfrozen
from lorax.paths import path_str
from lorax.tree import attach

KEY = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)(\.[^.]+)?$")
KINDS = {"LOHA": LohaWeight, "LOKR": LokrWeight}
_TYPE = {v: k for k, v in KINDS.items()}


def split_lycoris(tensors: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``(LoHa / LoKr factors, other tensors)`` of a file's tensors (keys without peft's
    prefix); the factors' keys lose any adapter-name suffix (``.hada_w1_a.default``)."""
    ours = {KEY.sub(r".\1", k): v for k, v in tensors.items() if KEY.search(k)}
    return ours, {k: v for k, v in tensors.items() if not KEY.search(k)}


def _torch_factors(leaf: Any, layer: int | None) -> dict[str, np.ndarray]:
    """The peft tensors (``[out, in]`` layout) of one layer of a leaf, by suffix."""
    from lorax.io.checkpoint import host_value

    def get(x: Any) -> np.ndarray:
        v = host_value(x)
        return np.ascontiguousarray((v if layer is None else v[layer]).T)

    if isinstance(leaf, LohaWeight):
        return {
            "hada_w1_a": get(leaf.b1),
            "hada_w1_b": get(leaf.a1),
            "hada_w2_a": get(leaf.b2),
            "hada_w2_b": get(leaf.a2),
        }
    out = {}
    for i, (w, b) in (("1", (leaf.w1, leaf.w1_b)), ("2", (leaf.w2, leaf.w2_b))):
        if b is None:
            out[f"lokr_w{i}"] = get(w)
        else:  # lokr_w_a [O, r] is the output side, lokr_w_b [r, I] the input side
            out[f"lokr_w{i}_a"], out[f"lokr_w{i}_b"] = get(b), get(w)
    return out


def _uniform(what: str, values: dict[str, Any], option: str) -> Any:
    if len(set(values.values())) > 1:
        raise LoraxValueError(
            f"{what}: peft's {option} is one value for the whole adapter; the leaves have "
            f"{sorted(set(values.values()))} (e.g. {sorted(values.items())[:3]})"
        )
    return next(iter(values.values()))


def export_lycoris(directory: Path, tree: Any, modules: Any, base_model_name: str | None) -> Path:
    """Writes the LoHa or LoKr leaves (and Unfrozen ones, as modules_to_save) of ``tree``."""
    from lorax.io.peft import PREFIX
    from lorax.io.peft_saved import export_saved

    what = "lorax.export_peft"
    names = modules.modules
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]
    leaves = {path_str(k): x for k, x in flat if is_lorax_leaf(x) and not isinstance(x, Unfrozen)}
    kind = next(type(x) for x in leaves.values() if type(x) in (LohaWeight, LokrWeight))
    bad = [p for p, x in leaves.items() if type(x) is not kind]
    if bad:
        raise LoraxValueError(
            f"{what}: '{bad[0]}' is a {type(leaves[bad[0]]).__name__}; a tree with "
            f"{kind.__name__} leaves exports as one peft {_TYPE[kind]} adapter, which holds "
            "no other kind"
        )
    if modules.fan_in_fan_out:
        raise LoraxValueError(
            f"{what}: this model's modules store their weight [in, out] (fan_in_fan_out, as "
            f"GPT-2's Conv1D); peft's {_TYPE[kind]} adapts torch.nn.Linear and Conv "
            "modules only, so no peft model could load this adapter"
        )
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    options: dict[str, dict[str, Any]] = {"rank_dropout": {}, "module_dropout": {}}
    if kind is LokrWeight:
        options.update(decompose_factor={}, rank_dropout_scale={})
    for path, leaf in leaves.items():
        if path not in names:
            raise LoraxValueError(
                f"{what}: no Hugging Face module is known for '{path}'; pass a model "
                "matching the tree, or a mapping {flax_path: module_name}"
            )
        stacked = names[path][0][1] is not None
        if (leaf.n_in, leaf.n_out) != (1, 1) or leaf.stack_ndim != int(stacked):
            raise LoraxValueError(
                f"{what}: the {type(leaf).__name__} at '{path}' has shape {leaf.shape} "
                f"({leaf.n_in} input and {leaf.n_out} output axes); peft's "
                f"{_TYPE[kind]} adapts 2-D Linear weights, {len(names[path])} per "
                "stacked path here"
            )
        if stacked and leaf.shape[0] != len(names[path]):
            raise LoraxValueError(
                f"{what}: the module map lists {len(names[path])} layers for '{path}', a "
                f"stack of {leaf.shape[0]}"
            )
        for name, layer in names[path]:
            for suffix, value in _torch_factors(leaf, layer).items():
                tensors[f"{PREFIX}{name}.{suffix}"] = value
            ranks[name] = leaf.rank
            alphas[name] = leaf.scale * leaf.rank
            options["rank_dropout"][name] = leaf.rank_dropout
            options["module_dropout"][name] = leaf.module_dropout
            if kind is LokrWeight:
                options["decompose_factor"][name] = leaf.factor
                options["rank_dropout_scale"][name] = leaf.rank_dropout_scale
    values = {key: _uniform(what, v, key) for key, v in options.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config: dict[str, Any] = {
        "peft_type": _TYPE[kind],
        "task_type": modules.task_type,
        "r": r,
        "alpha": alpha,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "use_effective_conv2d": False,
        "init_weights": True,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "peft_version": "0.13.0",
        **values,
    }
    if kind is LokrWeight:
        both = any(x.w1_b is not None for x in leaves.values())
        config["decompose_both"] = both
        for path, leaf in leaves.items():  # peft rebuilds the shapes from the config
            _check_lokr_layout(what, path, leaf, names[path][0][0], config)
    extra, saved, _ = export_saved(tree, modules, set(ranks), what=what, bias_option=False)
    tensors.update(extra)
    config["modules_to_save"] = saved
    from lorax.io.peft import write_adapter

    return write_adapter(directory, tensors, config)


def _check_lokr_layout(what: str, path: str, leaf: LokrWeight, name: str, config: Any) -> None:
    """Refuses a leaf whose factor shapes peft would not build from ``config``."""
    from lorax.io.peft import _pattern

    r = _pattern(config["rank_pattern"], name, config["r"])
    want = lokr_layout(
        leaf.fan_in,
        leaf.fan_out,
        rank=r,
        factor=config["decompose_factor"],
        decompose_both=config["decompose_both"],
    )
    w1, w2 = leaf.w1.shape[-2:], leaf.w2.shape[-2:]
    got_in = (w1[0], w2[0])
    got_out = (
        w1[1] if leaf.w1_b is None else leaf.w1_b.shape[-1],
        w2[1] if leaf.w2_b is None else leaf.w2_b.shape[-1],
    )
    got = (got_in, got_out, leaf.w1_b is None, leaf.w2_b is None)
    if got != want:
        raise LoraxValueError(
            f"{what}: the LokrWeight at '{path}' has (I1, I2) {got_in}, (O1, O2) {got_out}, "
            f"w1 {'full' if got[2] else 'decomposed'} and w2 "
            f"{'full' if got[3] else 'decomposed'}; peft rebuilds {want[:2]}, "
            f"{'full' if want[2] else 'decomposed'}, {'full' if want[3] else 'decomposed'} "
            f"from r={r}, decompose_factor={config['decompose_factor']} and "
            f"decompose_both={config['decompose_both']}, so it could not load the adapter"
        )


def _check_config(config: Mapping[str, Any], file: Path) -> None:
    what = f"lorax.import_peft: '{file}'"
    for key in ("r", "alpha"):
        entries = [(key, config.get(key, 8))]
        pattern = config.get(f"{key if key == 'alpha' else 'rank'}_pattern") or {}
        if not isinstance(pattern, dict):
            raise LoraxTypeError(f"{what}: {key}_pattern must be an object; got {pattern!r}")
        entries += [(f"pattern[{k!r}]", v) for k, v in pattern.items()]
        for name, v in entries:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise LoraxTypeError(f"{what}: {key} {name} must be a number; got {v!r}")
            if key == "r" and not (isinstance(v, int) and v > 0):
                raise LoraxValueError(f"{what}: {name} must be a positive int; got {v!r}")
            if key == "alpha" and not math.isfinite(v):
                raise LoraxValueError(f"{what}: {name} must be finite; got {v!r}")
    for key in ("rank_dropout", "module_dropout"):
        v = config.get(key) or 0.0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise LoraxValueError(f"{what}: {key} must be a number in [0, 1); got {v!r}")


def import_lycoris(
    directory: Path,
    params: Any,
    names: Mapping[str, Any],
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    dtype: Any,
) -> Any:
    """``params`` with the LoHa / LoKr factors of ``tensors`` (from :func:`split_lycoris`)."""
    from lorax.io.peft import CONFIG_FILE, WEIGHTS_FILE, _pattern, adapted_modules

    what = "lorax.import_peft"
    file = directory / WEIGHTS_FILE
    kind = KINDS[config["peft_type"]]
    _check_config(config, directory / CONFIG_FILE)
    prefix = "hada_" if kind is LohaWeight else "lokr_"
    conv = sorted(k for k in tensors if re.search(r"\.(hada_t[12]|lokr_t2)$", k))
    if conv:
        raise LoraxValueError(
            f"{what}: '{file}' holds peft's CP-decomposed conv factors {conv[:2]} "
            "(use_effective_conv2d); lorax's LoHa / LoKr leaves adapt Linear weights"
        )
    if not any(f".{prefix}" in k for k in tensors):
        raise LoraxValueError(
            f"{what}: '{file}' holds no {prefix}* factors, e.g. {sorted(tensors)[:2]}; its "
            f"peft_type {config['peft_type']!r} does not match its tensors"
        )
    factor = int(config.get("decompose_factor", -1))
    both = bool(config.get("decompose_both", False))
    static = {
        "rank_dropout": float(config.get("rank_dropout") or 0.0),
        "module_dropout": float(config.get("module_dropout") or 0.0),
    }
    if kind is LokrWeight:
        static.update(factor=factor, rank_dropout_scale=bool(config.get("rank_dropout_scale")))
    used: set[str] = set()

    def layer_factors(name: str, shape: tuple[int, ...], r: int) -> dict[str, Any]:
        """One module's factors in lorax's layout, checked against peft's rules."""
        fan_in, fan_out = shape
        keys = sorted(k for k in tensors if k.startswith(f"{name}.{prefix}"))
        got = {k[len(name) + 1 :]: tensors[k] for k in keys}

        def need(suffix: str, want: tuple[int, int]) -> np.ndarray:
            if suffix not in got:
                raise LoraxValueError(f"{what}: '{name}' has no {suffix} in '{file}'")
            used.add(f"{name}.{suffix}")
            if got[suffix].shape != want:
                raise LoraxValueError(
                    f"{what}: '{name}.{suffix}' of '{file}' has shape {got[suffix].shape}; "
                    f"peft builds {want} for a {fan_in} -> {fan_out} Linear with r={r}"
                )
            return got[suffix].T

        if kind is LohaWeight:
            return {
                "a1": need("hada_w1_b", (r, fan_in)),
                "b1": need("hada_w1_a", (fan_out, r)),
                "a2": need("hada_w2_b", (r, fan_in)),
                "b2": need("hada_w2_a", (fan_out, r)),
            }
        (i1, i2), (o1, o2), w1_full, w2_full = lokr_layout(
            fan_in, fan_out, rank=r, factor=factor, decompose_both=both
        )
        out: dict[str, Any] = {}
        for i, ii, oo, full in (("1", i1, o1, w1_full), ("2", i2, o2, w2_full)):
            if full:
                out[f"w{i}"], out[f"w{i}_b"] = need(f"lokr_w{i}", (oo, ii)), None
            else:
                out[f"w{i}"] = need(f"lokr_w{i}_b", (r, ii))
                out[f"w{i}_b"] = need(f"lokr_w{i}_a", (oo, r))
        return out

    def build(path: str, leaf: Any) -> Any:
        found = adapted_modules(
            what, names, path, lambda n: any(k.startswith(f"{n}.") for k in tensors)
        )
        if found is None:
            return None
        stacked = found[0][1] is not None
        per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
        if len(per_layer) != 2 or (stacked and leaf.shape[0] != len(found)):
            raise LoraxValueError(
                f"{what}: the base '{path}' has shape {tuple(leaf.shape)}; peft's "
                f"{config['peft_type']} factors of {len(found)} module(s) fit a 2-D weight "
                "per layer"
            )
        layers, scales, ranks = [], set(), set()
        for name, _ in found:
            r = _pattern(config.get("rank_pattern"), name, config.get("r", 8))
            alpha = _pattern(config.get("alpha_pattern"), name, config.get("alpha", 8))
            layers.append(layer_factors(name, per_layer, r))
            scales.add(alpha / r)
            ranks.add(r)
        if len(scales) != 1 or len(ranks) != 1:
            raise LoraxValueError(
                f"{what}: the layers stacked in '{path}' have different ranks {sorted(ranks)} "
                f"or scales {sorted(scales)}"
            )

        def field(key: str) -> Any:
            values = [f[key] for f in layers]
            if values[0] is None:
                return None
            value = np.stack(values) if stacked else values[0]
            return jnp.asarray(value, dtype) if dtype else jnp.asarray(value)

        fields = {key: field(key) for key in layers[0]}
        extra = {"rank": ranks.pop()} if kind is LokrWeight else {}
        return kind(leaf, **fields, scale=scales.pop(), **extra, **static)

    out, _ = attach(params, build, what=what)
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoraxValueError(
            f"{what}: {len(unused)} adapter tensors fit no parameter of this model, e.g. "
            f"{unused[:4]}"
        )
    return out
