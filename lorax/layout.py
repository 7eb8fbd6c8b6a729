"""Which weights of a parameter tree get adapted, and how their axes split.

Targets (see ``lorax.wrap``) select leaves by their '/'-joined key path
(``params/h_0/attn/c_attn/kernel``): a regex matched in full, a list of names matching any
path component, a callable ``(path, leaf) -> bool | LoraSpec``, or None for the default
(every floating weight of rank >= 2 except embedding tables).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lorax._checks import compile_regex
from lorax.errors import LoraxTypeError


def infer_stack_axes(path: str, shape: Sequence[int], siblings: Mapping[str, Any]) -> int:
    """Leading layer axes of a kernel: one under a module flax named ``Scan*`` (nn.scan),
    else as many as make a sibling ``bias`` line up with the kernel's output axes."""
    if any(c.startswith("Scan") for c in path.split("/")[:-1]):
        return 1
    bias = siblings.get("bias")
    if bias is not None and hasattr(bias, "shape") and len(bias.shape) >= 2:
        bshape, nd = tuple(bias.shape), len(shape)
        for nb in range(0, min(len(bshape), nd - 2) + 1):
            n_out = len(bshape) - nb
            if bshape[:nb] == tuple(shape[:nb]) and bshape[nb:] == tuple(shape[nd - n_out :]):
                return nb
    return 0


def infer_in_axes(shape: Sequence[int], siblings: Mapping[str, Any], stack: int) -> int:
    """Input axes of a (per-layer) kernel: all but the bias's axes when a bias is there,
    else the split into input and output sizes closest to square."""
    per_layer = tuple(shape[stack:])
    if len(per_layer) == 2:
        return 1
    bias = siblings.get("bias")
    if bias is not None and hasattr(bias, "shape"):
        n_out = len(bias.shape) - stack
        if 1 <= n_out < len(per_layer) and tuple(bias.shape[stack:]) == per_layer[-n_out:]:
            return len(per_layer) - n_out
    logs = [math.log(max(s, 1)) for s in per_layer]
    return min(range(1, len(per_layer)), key=lambda p: (abs(sum(logs[:p]) - sum(logs[p:])), p))


def stack_axes_for(stacked: Any, explicit: int | None, path: str) -> int | None:
    """The ``stacked=`` argument of wrap / quantize resolved for one path (None: infer)."""
    if explicit is not None:
        return explicit
    if stacked is None:
        return None
    if isinstance(stacked, (bool, np.bool_)):
        return int(stacked)
    if isinstance(stacked, numbers.Integral):
        return int(stacked)
    if isinstance(stacked, str):
        return 1 if compile_regex(stacked, "lorax: stacked").fullmatch(path) else 0
    raise LoraxTypeError(f"lorax: stacked must be None, an int or a regex; got {stacked!r}")
