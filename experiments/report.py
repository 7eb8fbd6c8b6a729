"""The experiments' markdown report and plots, from the results ``run.py`` collected.

Every table shows the mean over seeds and, with more than one seed, the spread as +- one
standard deviation. Nothing here measures: it only lays out what ``run.py`` measured.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TARGET_ORDER = ("Q", "Q,K", "Q,K,V", "Q,K,V,O", "all")


def mean_spread(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when nothing was measured."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def fmt(values: Iterable[float | None], scale: float = 1.0, digits: int = 3, pct=False) -> str:
    m, s = mean_spread(values)
    if math.isnan(m):
        return "-"
    m, s = m * scale, s * scale
    unit = "%" if pct else ""
    if s == 0:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} ± {s:.{digits}f}"


def by_variant(runs: Sequence[dict]) -> dict[str, list[dict]]:
    """Runs grouped by variant, in the order they first appear."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["variant"]].append(r)
    return dict(groups)


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def quality_cells(group: list[dict]) -> list[str]:
    acc = [r.get("accuracy") for r in group]
    return [
        fmt(acc, 100, 1, pct=True) if any(a is not None for a in acc) else "-",
        fmt([r["perplexity"] for r in group], digits=3),
    ]


def rank_table(runs: Sequence[dict], before: dict | None = None) -> str:
    rows = []
    if before:  # the base itself, before adaptation
        rows.append(["base, not adapted", "0", "0.00%", *quality_cells([before])])
    for name, group in by_variant(runs).items():
        rows.append(
            [
                name,
                f"{group[0]['trainable']:,}",
                fmt([r["trainable_percent"] for r in group], digits=2, pct=True),
                *quality_cells(group),
            ]
        )
    return table(["run", "trainable", "trainable %", "held-out accuracy", "perplexity"], rows)


def memory_table(runs: Sequence[dict]) -> str:
    rows = []
    for name, group in by_variant(runs).items():
        ranks = group[0].get("final_ranks")
        label = name
        if ranks:
            label += f" (ranks kept {min(ranks.values())}-{max(ranks.values())})"
        rows.append(
            [
                label,
                f"{group[0]['trainable']:,}",
                fmt([r["peak_bytes"] for r in group], 1e-6, 2),
                *quality_cells(group),
                fmt([r["seconds_per_step"] for r in group], 1e3, 1),
                fmt([r["train_seconds"] for r in group], digits=1),
            ]
        )
    return table(
        [
            "run",
            "trainable",
            "peak memory (MB, XLA)",
            "held-out accuracy",
            "perplexity",
            "ms / step",
            "training s",
        ],
        rows,
    )


def targets_table(runs: Sequence[dict]) -> str:
    groups = by_variant(runs)
    order = sorted(groups.values(), key=lambda g: TARGET_ORDER.index(g[0]["targets"]))
    rows = [[g[0]["targets"], f"{g[0]['trainable']:,}", *quality_cells(g)] for g in order]
    return table(["targets", "trainable", "held-out accuracy", "perplexity"], rows)


def _module_means(report: dict[str, dict], key: str) -> list[float]:
    return [float(m[key]) for m in report.values() if key in m and m[key] is not None]


def delta_table(seeds: Sequence[dict]) -> str:
    names = [n for n in seeds[0] if n not in ("seed", "similarity")]
    ks = sorted(
        {
            int(k.split("@")[1])
            for n in names
            for m in seeds[0][n].values()
            for k in m
            if k.startswith("energy@")
        }
    )

    def per_seed(name: str, key: str) -> list[float]:  # mean over modules, a value per seed
        return [float(np.mean(_module_means(s[name], key))) for s in seeds if s[name]]

    rows = []
    for name in names:
        rows.append(
            [
                name,
                *[fmt(per_seed(name, f"energy@{k}"), 100, 1, pct=True) for k in ks],
                fmt(per_seed(name, "effective_rank"), digits=1),
                fmt(per_seed(name, "amplification"), digits=2),
            ]
        )
    return table(
        ["update", *[f"energy in top {k}" for k in ks], "effective rank", "amplification"], rows
    )


def similarity_summary(seeds: Sequence[dict]) -> tuple[str, np.ndarray | None]:
    """A table of phi(i, j) at a few (i, j), and the grid averaged over modules and seeds."""
    grids = [np.asarray(g) for s in seeds for g in s.get("similarity", {}).values()]
    if not grids:
        return "", None
    mean = np.mean(np.stack(grids), axis=0)
    r1, r2 = mean.shape
    points = sorted({(1, 1), (1, r2), (min(4, r1), min(4, r2)), (r1, r1), (r1, r2)})
    rows = [[f"phi({i}, {j})", f"{mean[i - 1, j - 1]:.3f}"] for i, j in points]
    return table(["subspace similarity, mean over modules", "value"], rows), mean


def spectra(seeds: Sequence[dict]) -> dict[str, np.ndarray]:
    """Each update's singular values normalised by the largest, mean over modules and seeds."""
    out = {}
    for name in (n for n in seeds[0] if n not in ("seed", "similarity")):
        curves = []
        for s in seeds:
            for m in s[name].values():
                sv = np.asarray(m["spectrum"], float).reshape(-1)
                if sv.size and sv[0] > 0:
                    curves.append(sv / sv[0])
        if curves:
            n = min(len(c) for c in curves)
            out[name] = np.mean([c[:n] for c in curves], axis=0)
    return out


def plots(out: Path, results: dict[str, Any]) -> list[str]:
    """The four figures, as PNG files in ``out``; their names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []

    def quality(group):
        acc = [r.get("accuracy") for r in group]
        if any(a is not None for a in acc):
            return mean_spread(acc), "held-out accuracy"
        return mean_spread([r["perplexity"] for r in group]), "perplexity"

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)

    if "rank" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, group in by_variant(results["rank"]["runs"]).items():
            (m, s), label = quality(group)
            ax.errorbar(group[0]["trainable"], m, yerr=s, fmt="o", capsize=3)
            ax.annotate(
                name,
                (group[0]["trainable"], m),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.set_title("quality vs trainable parameters")
        save(fig, "accuracy_vs_params.png")
    if "memory" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, group in by_variant(results["memory"]["runs"]).items():
            (m, s), label = quality(group)
            mb = mean_spread([r["peak_bytes"] for r in group])[0] / 1e6
            ax.errorbar(mb, m, yerr=s, fmt="o", capsize=3)
            ax.annotate(name, (mb, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("peak memory of a training step (MB, XLA)")
        ax.set_ylabel(label)
        ax.set_title("memory vs quality")
        save(fig, "memory_vs_accuracy.png")
    if "delta" in results and results["delta"]["seeds"]:
        seeds = results["delta"]["seeds"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in spectra(seeds).items():
            ax.plot(np.arange(1, len(curve) + 1), curve, marker=".", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("index k")
        ax.set_ylabel("sigma_k / sigma_1 (mean over modules)")
        ax.set_title("singular values of the learned update")
        ax.legend()
        save(fig, "singular_values.png")
        _, grid = similarity_summary(seeds)
        if grid is not None:
            fig, ax = plt.subplots(figsize=(7, 3))
            im = ax.imshow(
                grid,
                aspect="auto",
                vmin=0,
                vmax=1,
                cmap="viridis",
                extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5),
            )
            ax.set_xlabel(f"j (r={grid.shape[1]} adapter)")
            ax.set_ylabel(f"i (r={grid.shape[0]} adapter)")
            ax.set_title("subspace similarity phi(i, j), mean over modules")
            fig.colorbar(im, ax=ax)
            save(fig, "subspace_similarity.png")
    return written


def write(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> None:
    """Writes ``report.md`` and the plots into ``out``."""
    m = meta["machine"]
    sizes = meta["sizes"]
    parts = [
        "# lorax experiments",
        "",
        f"{m['date']}, {m['device']} ({m['platform']}, {m['cores']} cores), jax {m['jax']}, "
        f"lorax {m['lorax']}; {sizes['seeds']} seed(s), {sizes['steps']} steps per run; "
        f"{meta['seconds'] / 60:.1f} minutes in all.",
        "",
        f"Base: {meta['model'] or 'the small Llama trained on task A'}"
        + (f"; data {meta['data']}" if meta["data"] else "; task B, held-out pairs"),
    ]
    if meta["base"].get("task_a_accuracy") is not None:
        parts.append(
            f"(held-out task A accuracy of the base {meta['base']['task_a_accuracy']:.1%})."
        )
    if "rank" in results:
        before = meta["base"].get("before")
        parts += ["", "## 1. Rank", "", rank_table(results["rank"]["runs"], before)]
    if "memory" in results:
        parts += ["", "## 2. Memory vs quality", "", memory_table(results["memory"]["runs"])]
    if "targets" in results:
        parts += ["", "## 3. Target modules", "", targets_table(results["targets"]["runs"])]
    if "delta" in results and results["delta"]["seeds"]:
        seeds = results["delta"]["seeds"]
        sim, _ = similarity_summary(seeds)
        parts += ["", "## 4. The learned update", "", delta_table(seeds), "", sim]
    figures = plots(out, results)
    if figures:
        parts += ["", "## Plots", ""] + [f"![{f[:-4]}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(parts) + "\n")
