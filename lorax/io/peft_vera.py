"""Hugging Face PEFT interop for VeRA adapters (``peft_type: "VERA"``);
:func:`lorax.export_peft` and :func:`lorax.import_peft` hand VeRA trees and directories here.

peft saves per module ``base_model.model.<module>.vera_lambda_b`` ``[out]`` and
``.vera_lambda_d`` ``[r]``, and once for the model the shared projections
``base_model.vera_A`` ``[r, max_in]`` and ``base_model.vera_B`` ``[max_out, r]``
(``save_projection: true``, its default). lorax's leaves hold their slices of that pair
(``a = vera_A[:, :in].T``, ``b = vera_B[:out].T``): export checks that they are slices of
one pair and writes it once; import slices it again. An adapter saved with
``save_projection: false`` holds no pair: peft redraws it from ``projection_prng_key`` with
torch's generator, and so does the import here (it needs torch).
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

from lorax.errors import LoraxValueError
from lorax.leaf import is_lorax_leaf
from lorax.methods.unfrozen import Unfrozen
from lorax.methods.vera import VeraWeight, vera_leaf
from lorax.paths import path_str
from lorax.tree import attach

PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")
VERA_KEY = re.compile(r"\.(vera_lambda_[bd]|vera_[AB])(\.[^.]+)?$")  # a key of the adapter


def split_vera(tensors: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``(VeRA tensors, full tensors)`` of a file's tensors (keys without peft's prefix)."""
    vera = {k: v for k, v in tensors.items() if VERA_KEY.search(k)}
    return vera, {k: v for k, v in tensors.items() if k not in vera}


def export_vera(directory: Path, tree: Any, modules: Any, base_model_name: str | None) -> Path:
    """Writes the VeRA leaves (and Unfrozen ones, as modules_to_save) of ``tree``;
    ``modules`` is the :class:`lorax.io.peft.PeftModuleMap`."""
    from lorax.io.checkpoint import host_value
    from lorax.io.peft import PREFIX
    from lorax.io.peft_saved import export_saved

    what = "lorax.export_peft"
    names = modules.modules
    tensors: dict[str, np.ndarray] = {}
    layers: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # (path, module, a, b)
    ranks, dropouts = set(), {0.0}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lorax_leaf)[0]:
        if not is_lorax_leaf(leaf) or isinstance(leaf, Unfrozen):
            continue
        path = path_str(key_path)
        if not isinstance(leaf, VeraWeight):
            raise LoraxValueError(
                f"{what}: '{path}' is a {type(leaf).__name__}; a tree with VeRA leaves "
                "exports as one peft VeRA adapter, which holds no other kind"
            )
        if path not in names:
            raise LoraxValueError(
                f"{what}: no Hugging Face module is known for '{path}'; pass a model "
                "matching the tree, or a mapping {flax_path: module_name}"
            )
        if any(getattr(leaf, n) is None for n in ("a", "b", "lambda_d", "lambda_b")):
            raise LoraxValueError(
                f"{what}: the VeraWeight at '{path}' lacks a field: export the whole "
                "tree, lorax.combine(trainable, frozen)"
            )
        stacked = names[path][0][1] is not None
        a, b = host_value(leaf.a), host_value(leaf.b)
        ld, lb = host_value(leaf.lambda_d), host_value(leaf.lambda_b)
        if (
            leaf.in_ndim != 1
            or leaf.ndim - leaf.stack_ndim != 2
            or leaf.stack_ndim != (1 if stacked else 0)
            or (stacked and a.shape[0] != len(names[path]))
        ):
            raise LoraxValueError(
                f"{what}: the VeraWeight at '{path}' has shape {leaf.shape} "
                f"({leaf.stack_ndim} stack axes); PEFT's VeRA adapts 2-D Linear weights, "
                f"{len(names[path])} per path here"
            )
        for name, layer in names[path]:
            pick = (lambda x: x) if layer is None else (lambda x, i=layer: x[i])  # noqa: E731
            tensors[f"{PREFIX}{name}.vera_lambda_b"] = np.ascontiguousarray(pick(lb))
            tensors[f"{PREFIX}{name}.vera_lambda_d"] = np.ascontiguousarray(pick(ld))
            layers.append((path, name, pick(a), pick(b)))
        ranks.add(leaf.rank)
        dropouts.add(leaf.dropout)
    if not layers:
        raise LoraxValueError(f"{what}: the tree has no VeRA leaves")
    if len(ranks) > 1:
        raise LoraxValueError(
            f"{what}: peft's VeRA shares one rank between all modules; the tree has ranks "
            f"{sorted(ranks)}"
        )
    a_full = max((a for *_, a, _ in layers), key=lambda a: a.shape[0])  # (max_in, r)
    b_full = max((b for *_, b in layers), key=lambda b: b.shape[1])  # (r, max_out)
    for path, name, a, b in layers:
        if not (
            np.array_equal(a, a_full[: a.shape[0]]) and np.array_equal(b, b_full[:, : b.shape[1]])
        ):
            raise LoraxValueError(
                f"{what}: the projections of '{path}' ({name}) are not slices of the "
                "pair the other VeRA leaves share; peft's format holds one shared pair "
                "(build the leaves with one lorax.vera call)"
            )
    tensors[PROJECTIONS[0]] = np.ascontiguousarray(a_full.T)
    tensors[PROJECTIONS[1]] = np.ascontiguousarray(b_full.T)
    targets = sorted({name for _, name, _, _ in layers})
    extra, saved, _ = export_saved(tree, modules, set(targets), what=what, bias_option=False)
    tensors.update(extra)
    config = {
        "peft_type": "VERA",
        "task_type": modules.task_type,
        "r": ranks.pop(),
        "target_modules": targets,
        "projection_prng_key": 0,  # unused: the projections are saved
        "save_projection": True,
        "vera_dropout": max(dropouts),
        "d_initial": 0.1,
        "fan_in_fan_out": modules.fan_in_fan_out,
        "bias": "none",
        "modules_to_save": saved,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "peft_version": "0.13.0",
    }
    from lorax.io.peft import write_adapter

    return write_adapter(directory, tensors, config)


def peft_projections(seed: int, rank: int, max_in: int, max_out: int) -> tuple[Any, Any]:
    """peft's ``vera_A`` ``[r, max_in]`` and ``vera_B`` ``[max_out, r]`` drawn from
    ``projection_prng_key`` as ``VeraModel._init_vera_A_vera_B`` draws them (torch's CPU
    generator, kaiming-uniform), as numpy float32."""
    try:
        import torch
    except ImportError as e:
        raise LoraxValueError(
            "lorax.import_peft: a VeRA adapter saved with save_projection=false holds no "
            "projections; peft redraws them with torch's generator, which needs torch "
            "installed (or save the adapter with save_projection=true)"
        ) from e
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    out = []
    for shape, fan_in in (((rank, max_in), max_in), ((max_out, rank), rank)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
        with torch.no_grad():
            out.append(torch.empty(shape).uniform_(-bound, bound, generator=generator).numpy())
    return out[0], out[1]


def import_vera(
    directory: Path,
    params: Any,
    names: Mapping[str, Any],
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    dtype: Any,
) -> Any:
    """``params`` with the VeRA adapter of ``directory`` on it (``tensors`` keyed by module
    path without peft's prefix)."""
    from lorax.io.peft import CONFIG_FILE, WEIGHTS_FILE

    what = "lorax.import_peft"
    file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    r = config.get("r", 256)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoraxValueError(f"{what}: '{file}': r must be a positive int; got {r!r}")
    dropout = config.get("vera_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LoraxValueError(
            f"{what}: '{file}': vera_dropout must be a number in [0, 1); got {dropout!r}"
        )
    tensors = {
        re.sub(r"\.(vera_lambda_[bd]|vera_[AB])(\.[^.]+)?$", r".\1", k): v
        for k, v in tensors.items()
    }  # keys saved with an adapter name
    used: set[str] = set()
    plan: dict[str, list[tuple[str, int | None]]] = {}
    sizes: list[tuple[int, int]] = []

    def per_layer(leaf: Any, stacked: bool) -> tuple[int, int]:
        shape = tuple(leaf.shape)
        return (shape[-2], shape[-1]) if len(shape) == (3 if stacked else 2) else (-1, -1)

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lorax_leaf)[0]
    bases = {path_str(k): x for k, x in flat}
    for path, entries in names.items():
        found = [(n, i) for n, i in entries if f"{n}.vera_lambda_d" in tensors]
        if found and path in bases:
            plan[path] = found
            sizes.append(per_layer(bases[path], found[0][1] is not None))
    if not plan:
        raise LoraxValueError(
            f"{what}: '{weights}' has no VeRA vectors for any module of this model"
        )
    max_in, max_out = max(i for i, _ in sizes), max(o for _, o in sizes)
    if config.get("save_projection", True):
        missing = [k for k in PROJECTIONS if k not in tensors]
        if missing:
            raise LoraxValueError(
                f"{what}: '{file}' says save_projection=true but '{weights}' lacks {missing}"
            )
        vera_a, vera_b = (tensors[k] for k in PROJECTIONS)
        used.update(PROJECTIONS)
    else:  # as peft: redrawn from the key, whatever the file holds
        used.update(k for k in PROJECTIONS if k in tensors)
        vera_a, vera_b = peft_projections(config.get("projection_prng_key", 0), r, max_in, max_out)
    if vera_a.ndim != 2 or vera_b.ndim != 2 or vera_a.shape[0] != r or vera_b.shape[1] != r:
        raise LoraxValueError(
            f"{what}: '{weights}' has vera_A {vera_a.shape} and vera_B {vera_b.shape}; with "
            f"r = {r} PEFT stores [{r}, max_in] and [max_out, {r}]"
        )
    a_shared, b_shared = vera_a.T, vera_b.T

    def build(path: str, leaf: Any) -> Any:
        if path not in plan:
            return None
        found = plan[path]
        if len(found) != len(names[path]):
            raise LoraxValueError(
                f"{what}: the adapter covers {len(found)} of the {len(names[path])} layers "
                f"stacked in '{path}'"
            )
        stacked = found[0][1] is not None
        n_in, n_out = per_layer(leaf, stacked)
        if n_in < 0 or (stacked and leaf.shape[0] != len(found)):
            raise LoraxValueError(
                f"{what}: the module map lists {len(found)} layers for '{path}', a base of "
                f"shape {tuple(leaf.shape)}"
            )
        if n_in > a_shared.shape[0] or n_out > b_shared.shape[1]:
            raise LoraxValueError(
                f"{what}: '{found[0][0]}' is a [{n_out}, {n_in}] weight; the shared vera_A "
                f"{vera_a.shape} / vera_B {vera_b.shape} of '{weights}' are too small for it"
            )
        ds, bs = [], []
        for name, _ in found:
            keys = (f"{name}.vera_lambda_d", f"{name}.vera_lambda_b")
            if keys[1] not in tensors:
                raise LoraxValueError(f"{what}: '{name}' lacks vera_lambda_b in '{weights}'")
            d, b = (tensors[k] for k in keys)
            used.update(keys)
            if d.shape != (r,) or b.shape != (n_out,):
                raise LoraxValueError(
                    f"{what}: '{name}' has vera_lambda_d {d.shape} and vera_lambda_b "
                    f"{b.shape}; with r = {r} and its base '{path}' {tuple(leaf.shape)} "
                    f"PEFT stores [{r}] and [{n_out}]"
                )
            ds.append(d)
            bs.append(b)
        cast = (lambda x: jnp.asarray(x, dtype)) if dtype else jnp.asarray
        lambda_d = np.stack(ds) if stacked else ds[0]
        lambda_b = np.stack(bs) if stacked else bs[0]
        return vera_leaf(
            leaf,
            cast(a_shared),
            cast(b_shared),
            cast(lambda_d),
            cast(lambda_b),
            stack=(len(found),) if stacked else (),
            ins=(n_in,),
            outs=(n_out,),
            dropout=float(dropout),
        )

    out, _ = attach(params, build, what=what)
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoraxValueError(
            f"{what}: {len(unused)} adapter tensors fit no parameter of this model, "
            f"e.g. {unused[:4]}"
        )
    return out
