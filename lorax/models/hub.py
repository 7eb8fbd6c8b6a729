"""Hugging Face checkpoints in and out: config.json plus model.safetensors (or a sharded
index), read and written through a model's one table of Flax paths and Hugging Face names.

Each reference model owns that table (``hf_table``); this module knows no model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lorax.errors import (
    CheckpointError,
    LoraxError,
    LoraxFileNotFoundError,
    LoraxKeyError,
    LoraxNotADirectoryError,
    LoraxTypeError,
    LoraxValueError,
)
from lorax.leaf import is_lorax_leaf
from lorax.models import partitioning
from lorax.paths import path_str

CHECKPOINT_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]

# model_type -> the lorax.models module that loads it, to point a wrong loader at the right one
LOADER_OF = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "llama",
    "gemma2": "llama",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a model's table.

    Attributes:
      path: '/'-joined Flax parameter path, e.g. ``"h_0/attn/c_attn/kernel"``.
      name: Hugging Face tensor name, e.g. ``"transformer.h.0.attn.c_attn.weight"``.
      transpose: the tensor is stored transposed (torch ``Linear`` is ``[out, in]``, a Flax
        kernel ``[in, out]``).
      layer: for a scanned stack, the index along the parameter's leading layer axis.
    """

    path: str
    name: str
    transpose: bool = False
    layer: int | None = None


def stack_rows(
    block: Iterable[tuple[str, str, bool]],
    n_layers: int,
    scan_layers: bool,
    flax_prefix: str,
    hf_prefix: str,
) -> list[Entry]:
    """The entries of ``n_layers`` blocks of one kind.

    Args:
      block: ``(flax path inside a block, Hugging Face name inside a block, transposed)``.
      n_layers: how many blocks.
      scan_layers: the blocks are one ``ScanLayers`` stack (``layer`` set) rather than
        modules ``<flax_prefix>_<i>``.
      flax_prefix: the blocks' module name prefix (``"h"``: ``h_0``, ``h_1``, ...).
      hf_prefix: the blocks' Hugging Face prefix (``"transformer.h"``).

    Returns:
      The entries, block by block.

    Example:
      >>> from lorax.models import hub
      >>> rows = hub.stack_rows([("mlp/kernel", "mlp.weight", True)], 2, True, "h", "model.h")
      >>> [(e.path, e.name, e.layer) for e in rows][1]
      ('ScanLayers/mlp/kernel', 'model.h.1.mlp.weight', 1)
    """
    rows = []
    for i in range(n_layers):
        for path, name, transpose in block:
            flax_path = f"ScanLayers/{path}" if scan_layers else f"{flax_prefix}_{i}/{path}"
            rows.append(
                Entry(
                    flax_path,
                    f"{hf_prefix}.{i}.{name}",
                    transpose,
                    layer=i if scan_layers else None,
                )
            )
    return rows


def peft_modules(table: Iterable[Entry]) -> dict[str, list[tuple[str, int | None]]]:
    """The PEFT module names of a model's table: each kernel path with the module(s) whose
    ``.weight`` it is, and the layer along a scanned stack (None unscanned).

    Example:
      >>> from lorax.models import hub
      >>> hub.peft_modules([hub.Entry("q/kernel", "model.q.weight", True),
      ...                   hub.Entry("q/bias", "model.q.bias")])
      {'q/kernel': [('model.q', None)]}
    """
    out: dict[str, list[tuple[str, int | None]]] = {}
    for entry in table:
        if entry.path.endswith("/kernel") and entry.name.endswith(".weight"):
            out.setdefault(entry.path, []).append((entry.name[: -len(".weight")], entry.layer))
    return out


def peft_tensors(table: Iterable[Entry]) -> dict[str, list[tuple[str, int | None]]]:
    """Every path of a model's table with its Hugging Face tensor name(s): the ``tensors`` of
    a ``PeftModuleMap`` (what peft's ``modules_to_save`` and trained biases are named).

    Example:
      >>> from lorax.models import hub
      >>> hub.peft_tensors([hub.Entry("q/bias", "model.q.bias")])
      {'q/bias': [('model.q.bias', None)]}
    """
    out: dict[str, list[tuple[str, int | None]]] = {}
    for entry in table:
        out.setdefault(entry.path, []).append((entry.name, entry.layer))
    return out


def param_paths(params: Any) -> list[str]:
    """The '/'-joined path of every leaf of ``params`` (a lorax leaf is one leaf)."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lorax_leaf)[0]
    return [path_str(p) for p, _ in flat]


def layer_count(params: Any, paths: Iterable[str], flax_prefix: str) -> tuple[int, bool]:
    """How many blocks a parameter tree holds, read from its paths.

    Args:
      params: the tree (wrapped or not).
      paths: its leaf paths (:func:`param_paths`).
      flax_prefix: the blocks' module name prefix (``"h"`` for ``h_0``, ``h_1``, ...).

    Returns:
      ``(n_layers, scanned)``: the length of the ``ScanLayers`` stack when the tree has one,
      else 1 + the largest ``i`` of a path ``<flax_prefix>_<i>/...`` (0 when none).

    Example:
      >>> import numpy as np
      >>> from lorax.models import hub
      >>> tree = {"h_0": {"w": np.zeros(2)}, "h_3": {"w": np.zeros(2)}}
      >>> hub.layer_count(tree, hub.param_paths(tree), "h")
      (4, False)
    """
    paths = list(paths)
    if any(p.startswith("ScanLayers/") for p in paths):
        leaf = params["ScanLayers"]
        while isinstance(leaf, Mapping):
            leaf = next(iter(leaf.values()))
        return int(leaf.shape[0]), True
    block = re.compile(rf"{re.escape(flax_prefix)}_(\d+)/")
    return 1 + max((int(m.group(1)) for p in paths if (m := block.match(p))), default=-1), False


def resolve(name_or_dir: str | os.PathLike) -> Path:
    """A local checkpoint directory: ``name_or_dir`` itself, or the Hub snapshot of that
    repository name (downloaded when online, else taken from the local Hugging Face cache).

    Raises:
      FileNotFoundError: neither a directory nor a repository that can be read, with the
        steps to provide the files.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoraxNotADirectoryError(
            f"lorax.models: '{path}' is a file; pass the directory that "
            "holds config.json and model.safetensors."
        )
    how = (
        f"Provide the files as a local directory: on a machine with network run "
        f"`huggingface-cli download {name_or_dir} config.json model.safetensors` (or "
        f"huggingface_hub.snapshot_download('{name_or_dir}')) and pass the directory it "
        "prints to from_pretrained."
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise LoraxFileNotFoundError(
            f"lorax.models: '{name_or_dir}' is not a local directory and "
            f"huggingface_hub is not installed. {how}"
        ) from e
    try:
        return Path(snapshot_download(str(name_or_dir), allow_patterns=CHECKPOINT_FILES))
    except Exception as e:  # offline, not cached, no such repository, gated, ...
        raise LoraxFileNotFoundError(
            f"lorax.models: '{name_or_dir}' is not a local directory, and the Hugging Face Hub "
            f"could not provide it (offline and not in the cache, or no such repository): "
            f"{type(e).__name__}: {e}. {how}"
        ) from e


def read_json(file: Path) -> Any:
    """The parsed JSON of ``file``; a file that is not JSON (truncated, a Git LFS pointer, an
    HTML error page) is a :class:`CheckpointError` naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"lorax.models: '{file}' is not valid JSON ({e}); it is "
            "truncated or corrupt: download or write it again."
        ) from e


def read_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    file = directory / "config.json"
    if not file.is_file():
        raise LoraxFileNotFoundError(
            f"lorax.models: no config.json in '{directory}' (it has: "
            f"{sorted(p.name for p in directory.iterdir())})."
        )
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(
            f"lorax.models: '{file}' holds a JSON {type(config).__name__}, "
            "not an object of config keys."
        )
    return config


def check_model_type(
    hf: Mapping[str, Any], supported: tuple[str, ...], where: str, model: str
) -> None:
    """Refuses a config of another architecture (no ``model_type``: taken as supported),
    naming the lorax loader that reads it if there is one."""
    kind = hf.get("model_type")
    if kind is None or kind in supported:
        return
    other = LOADER_OF.get(kind)
    hint = (
        f"load it with lorax.models.{other}.from_pretrained"
        if other
        else f"lorax.models loads model_type {sorted(LOADER_OF)} only"
    )
    raise LoraxValueError(
        f"{where}: config key model_type={kind!r}: the directory holds a "
        f"model_type {kind!r} checkpoint, not {model} (supported model_type: "
        f"{list(supported)}); {hint}"
    )


def check_sizes(where: str, **sizes: Any) -> None:
    """Refuses a size that is not a positive int (None: unset, allowed)."""
    for key, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise LoraxTypeError(
                f"{where}: {key} must be a positive int; got {type(value).__name__} {value!r}"
            )
        if value <= 0:
            raise LoraxValueError(f"{where}: {key} must be a positive int; got {value}")


def check_positive(where: str, **numbers: Any) -> None:
    """Refuses a number that is not finite and > 0 (an epsilon, a RoPE base)."""
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoraxTypeError(
                f"{where}: {key} must be a positive number; got {type(value).__name__} {value!r}"
            )
        if not (math.isfinite(value) and value > 0):
            raise LoraxValueError(f"{where}: {key} must be a finite number > 0; got {value}")


def _open(file: Path) -> Any:
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # SafetensorError (not exported): the header does not parse
        raise CheckpointError(
            f"lorax.models: '{file}' is not a readable safetensors file "
            f"({type(e).__name__}: {e}); it is truncated or corrupt: "
            "download it again."
        ) from e


# safetensors dtypes read with plain file reads (others go through safetensors' own reader)
_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _layout(file: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """Where each tensor of a safetensors file lies: (start of the data, {name: (dtype,
    shape, begin, end)}), from the file's header (8 bytes of length, then JSON)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, {
        name: (t["dtype"], tuple(t["shape"]), *t["data_offsets"]) for name, t in header.items()
    }


class TensorFiles:
    """The tensors of model.safetensors or of the shards a model.safetensors.index.json
    names, read one at a time (a large checkpoint is never in memory as a whole).

    A tensor is read with a plain file read into memory of its own, not through a memory
    map of the file: the pages of a mapped file stay in the process's resident memory until
    the file is closed, so a mapped 2.5 GB checkpoint would be resident as a whole by the
    end of a load that keeps only its NF4 codes."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        self._handles: dict[Path, Any] = {}
        self._layouts: dict[Path, tuple[int, dict]] = {}
        if index.is_file():
            weight_map = read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise CheckpointError(
                    f"lorax.models: '{index}' has no \"weight_map\" object "
                    "{tensor name: shard file}."
                )
            self.file_of = {name: directory / file for name, file in weight_map.items()}
            lost = sorted({f.name for f in self.file_of.values() if not f.is_file()})
            if lost:
                raise LoraxFileNotFoundError(
                    f"lorax.models: '{index}' names shards that are not in '{directory}': "
                    f"{lost[:5]}; the download is incomplete."
                )
        elif not single.is_file():
            raise LoraxFileNotFoundError(
                f"lorax.models: no model.safetensors or model.safetensors.index.json in "
                f"'{directory}' (it has: {sorted(p.name for p in directory.iterdir())}). "
                "Only safetensors checkpoints are read; convert a pytorch_model.bin with "
                "transformers' save_pretrained(safe_serialization=True)."
            )
        # open every file now: a truncated shard fails here, not after the others are read
        try:
            if not index.is_file():
                self._handles[single] = _open(single)
                self.file_of = {name: single for name in self._handles[single].keys()}
            for file in sorted(set(self.file_of.values()) - set(self._handles)):
                self._handles[file] = _open(file)
                keys = set(self._handles[file].keys())
                absent = sorted(n for n, f in self.file_of.items() if f == file and n not in keys)
                if absent:
                    raise CheckpointError(
                        f"lorax.models: '{index}' puts {absent[:5]} in '{file}', which lacks them."
                    )
        except LoraxError:
            self.close()
            raise

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        if file not in self._layouts:  # the header was validated when the file was opened
            self._layouts[file] = _layout(file)
        start, tensors = self._layouts[file]
        kind, shape, begin, end = tensors[name]
        dtype = _NUMPY_DTYPES.get(kind)
        if dtype is not None and end - begin == math.prod(shape) * np.dtype(dtype).itemsize:
            with open(file, "rb") as f:
                f.seek(start + begin)
                array = np.fromfile(f, dtype=dtype, count=math.prod(shape))
            if array.size == math.prod(shape):
                return array.reshape(shape)
        try:  # other dtypes, and data that does not decode (safetensors says why)
            return self._handles[file].get_tensor(name)
        except Exception as e:  # SafetensorError: data that does not decode
            raise CheckpointError(
                f"lorax.models: tensor '{name}' of '{file}' cannot be read "
                f"({type(e).__name__}: {e})."
            ) from e

    def close(self):
        for handle in self._handles.values():
            if hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)
        self._handles.clear()


def params_from_tensors(
    table: Iterable[Entry],
    tensors: TensorFiles,
    shapes: Mapping[str, tuple[int, ...]],
    dtype: Any,
    strip_prefix: str = "",
    ignore: str | None = None,
    place: Any = None,
    convert: Any = None,
) -> dict:
    """The nested Flax params that ``table`` builds from ``tensors``.

    With ``place(path, host_array) -> array``, each parameter is placed (on a mesh) as soon
    as its tensors are read, and its host copy dropped: no host holds the whole model.
    ``convert(path, array) -> value`` then replaces it (e.g. quantizes it) right away, so
    the dense model never exists at once either.

    Args:
      table: the model's rows.
      tensors: the checkpoint.
      shapes: expected shape of every Flax path (scanned paths with their layer axis).
      dtype: dtype of the returned arrays.
      strip_prefix: a prefix that the checkpoint may lack (a base model saved without its
        head: ``transformer.`` for GPT-2, ``model.`` for Llama).
      ignore: regex of checkpoint names that are not parameters (e.g. attention buffers).

    Raises:
      KeyError: tensors the table needs are missing, or the checkpoint has tensors that
        nothing reads (a config that does not match the weights).
      ValueError: a tensor's shape does not match the config.
    """
    table = list(table)
    available = tensors.names()
    used, missing, values = set(), [], {}
    needed: dict[str, int] = {}
    for entry in table:
        needed[entry.path] = needed.get(entry.path, 0) + 1
    params: dict = {}

    def finish(path: str, by_layer: dict) -> None:
        if None in by_layer:
            array = by_layer[None]
        else:
            array = np.stack([by_layer[i] for i in range(len(by_layer))])
        node = params
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        if place is None:
            value = jnp.asarray(array, dtype=dtype)
        else:
            value = place(path, np.asarray(array).astype(jnp.dtype(dtype)))
        node[leaf] = value if convert is None else convert(path, value)

    for entry in table:
        name = entry.name
        if name not in available and name.startswith(strip_prefix):
            name = name[len(strip_prefix) :]
        if name not in available:
            missing.append(entry.name)
            continue
        used.add(name)
        array = tensors.get(name)
        array = array.T if entry.transpose else array
        expected = shapes[entry.path]
        layer_shape = expected[1:] if entry.layer is not None else expected
        if tuple(array.shape) != tuple(layer_shape):
            raise LoraxValueError(
                f"lorax.models: checkpoint tensor '{name}' has shape "
                f"{tuple(array.shape)} (after transpose: {entry.transpose}) but "
                f"parameter '{entry.path}' of this config needs "
                f"{tuple(layer_shape)}; does config.json match the weights?"
            )
        values.setdefault(entry.path, {})[entry.layer] = array
        if len(values[entry.path]) == needed[entry.path]:  # complete: on to the device
            finish(entry.path, values.pop(entry.path))
    if missing:
        raise LoraxKeyError(
            f"lorax.models: the checkpoint lacks {len(missing)} tensors this "
            f"config needs, e.g. {missing[:5]}; it has e.g. "
            f"{sorted(available)[:5]}."
        )
    unused = sorted(n for n in available - used if not (ignore and re.search(ignore, n)))
    if unused:
        raise LoraxKeyError(
            f"lorax.models: the checkpoint has {len(unused)} tensors this config "
            f"does not use, e.g. {unused[:5]}; does config.json match the weights?"
        )
    for path, by_layer in values.items():
        finish(path, by_layer)
    return params


def tensors_from_params(table: Iterable[Entry], params: Mapping) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of ``params`` (dense arrays), named and laid out by
    ``table``: the inverse of :func:`params_from_tensors`."""
    out = {}
    for entry in table:
        node = params
        for part in entry.path.split("/"):
            if part not in node:
                raise LoraxKeyError(
                    f"lorax.models: params have no '{entry.path}' (needed for "
                    f"'{entry.name}'); pass dense params (lorax.merge first)."
                )
            node = node[part]
        array = np.asarray(jax.device_get(node))
        array = array[entry.layer] if entry.layer is not None else array
        out[entry.name] = np.ascontiguousarray(array.T if entry.transpose else array)
    return out


def save_checkpoint(
    directory: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> Path:
    """Writes config.json and model.safetensors that transformers' from_pretrained reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.safetensors.tmp"
    save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")  # never a half-written checkpoint
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    return directory


def load_model(
    name_or_dir: str | os.PathLike,
    config_cls: Any,
    model_cls: Any,
    table: Any,
    *,
    dtype: Any,
    param_dtype: Any,
    strip_prefix: str,
    ignore: Any,
    mesh: Any = None,
    rules: Any = None,
    quantize: str | None = None,
    **model_options: Any,
) -> tuple[Any, dict]:
    """The shared body of the models' ``from_pretrained``: config, model, then params
    through ``table(config, scan_layers)``; ``ignore`` may be a function of the config."""
    directory = resolve(name_or_dir)
    hf = read_config(directory)
    if hf.get("quantization_config"):
        method = hf["quantization_config"]
        method = method.get("quant_method") if isinstance(method, dict) else method
        raise LoraxValueError(
            f"lorax.models: '{directory / 'config.json'}' has "
            f"quantization_config (quant_method {method!r}): a pre-quantized "
            "checkpoint; load the unquantized one and use lorax.quantize."
        )
    try:
        config = config_cls.from_hf(hf)
    except LoraxError as e:  # say which file holds the config that was refused
        raise type(e)(f"lorax.models: '{directory / 'config.json'}': {e}") from e
    model = model_cls(config, dtype=dtype, **model_options)
    tensors = TensorFiles(directory)
    try:
        params = params_from_tensors(
            table(config, model.scan_layers),
            tensors,
            abstract_shapes(model),
            param_dtype or dtype,
            strip_prefix=strip_prefix,
            ignore=ignore(config) if callable(ignore) else ignore,  # type: ignore[arg-type]
            place=None if mesh is None else partitioning.placer(mesh, rules),
            convert=None if quantize is None else quantizer(quantize, mesh, rules),
        )
    finally:
        tensors.close()
    return model, params


def quantizer(method: str, mesh: Any = None, rules: Any = None) -> Any:
    """``convert(path, array)`` for :func:`params_from_tensors`: the weight as
    ``lorax.quantize`` would quantize it in the whole tree (its default targets: every
    weight of rank >= 2 but embedding tables), one tensor at a time. On a mesh the
    quantization runs where the shards are and its codes leave with the specs
    ``lorax.partition_specs`` derives (each device quantizes and keeps its share)."""
    from jax.sharding import NamedSharding

    from lorax.quant.quantizers import quantize
    from lorax.sharding import partition_specs
    from lorax.targets import select

    rules = partitioning.RULES["fsdp_tp"] if rules is None else rules
    if method not in ("nf4", "int8"):
        raise LoraxValueError(f"lorax.models: quantize={method!r}; expected 'nf4', 'int8' or None")

    def convert(path: str, value: Any) -> Any:
        try:  # what the default targets would choose in the whole tree
            if not select(None, [path], [value]):
                return value
        except LoraxValueError:  # "matched nothing": an embedding, a norm, a bias
            return value
        tree: dict = {}
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        run = lambda t: quantize(t, method)  # noqa: E731
        if mesh is None:
            out = run(tree)
        else:
            spec = partitioning.logical_spec(path, tuple(value.shape))
            base = jax.tree.map(lambda _: spec, tree)
            specs = partition_specs(jax.eval_shape(run, tree), base, mesh=mesh, rules=rules)
            shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
            out = jax.jit(run, out_shardings=shardings)(tree)
        for part in path.split("/"):
            out = out[part]
        return out

    return convert


def save_model(directory: str | os.PathLike, model: Any, params: Mapping, table: Any) -> None:
    """The shared body of the models' ``save_pretrained``."""
    tensors = tensors_from_params(table(model.config, model.scan_layers), params)
    save_checkpoint(directory, model.config.to_hf(), tensors)


def abstract_shapes(model: Any, input_shape: tuple[int, int] = (1, 1)) -> dict[str, tuple]:
    """Every parameter path of ``model`` with its shape, without allocating anything."""
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.int32))
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
