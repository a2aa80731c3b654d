"""The robustness-vs-bytes front of esq-report: worst case and clean accuracy against the packed model bytes.

Runs of a compression preset (conf/compress/*.yaml: results.json `compression.preset`) are grouped by (dataset, model,
threat model); one line per preset (and method, where a preset was run with several), one point per budget level:
mean and sample std over seeds of clean and robust accuracy, x = the mean `model_bytes` (the payload esq-export
writes). The Pareto front is the set of points no other point beats on both axes (bytes no larger, robust accuracy
no lower, one strictly); the table lists, per budget (the byte budgets the runs were given, and the sizes of the
presets that have none, e.g. one width everywhere), the most robust point whose bytes fit it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esq_lightning.reporting.curves import WandbPanel, _mean_std, log_panels_wandb, metric_title, robust_metric
from esq_lightning.reporting.formats import _pct, format_eps

__all__ = [
    "Front",
    "FrontPoint",
    "build_fronts",
    "front_markdown",
    "log_fronts_wandb",
    "pareto",
    "plot_front",
    "write_fronts",
]

PRESET_TITLES = {
    "uniform": "uniform k-bit",
    "mixed": "mixed precision (sensitivity)",
    "magnitude": "magnitude pruning",
    "hydra": "HYDRA pruning",
    "hydra_u4": "HYDRA pruning + 4-bit",
}


@dataclass
class FrontPoint:
    label: str
    budget: int
    model_bytes: list[float] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    robust: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    settings: set[str] = field(default_factory=set)

    @property
    def x(self) -> float:
        return statistics.fmean(self.model_bytes)

    @property
    def y(self) -> float:
        return statistics.fmean(self.robust)


@dataclass
class Front:
    dataset: str
    model: str
    norm: str
    eps: float
    robust_metric: str
    lines: dict[str, list[FrontPoint]]
    budgets: list[float]

    @property
    def points(self) -> list[FrontPoint]:
        return [p for pts in self.lines.values() for p in pts]


def _label(res: dict[str, Any]) -> str:
    # The preset and the method that trained it: "HYDRA pruning, adversarial".
    preset = str(res["compression"]["preset"])
    method = {"esq": "ESQ", "adversarial": "adversarial", "natural": "natural", "trades": "TRADES"}.get(
        str(res.get("method")), str(res.get("method"))
    )
    return f"{PRESET_TITLES.get(preset, preset)}, {method}"


def _budget_bytes(res: dict[str, Any]) -> float | None:
    comp = res.get("compression") or {}
    for part in ("prune", "allocation"):
        value = (comp.get(part) or {}).get("budget_bytes")
        if value is not None:
            return float(value)
    return None


def pareto(points: Sequence[FrontPoint]) -> list[FrontPoint]:
    """The points no other point dominates (bytes <=, robust >=, one strict), by bytes."""
    front = [
        p
        for p in points
        if not any(q is not p and q.x <= p.x and q.y >= p.y and (q.x < p.x or q.y > p.y) for q in points)
    ]
    return sorted(front, key=lambda p: p.x)


def build_fronts(records: Iterable[tuple[Path, dict[str, Any]]]) -> list[Front]:
    """One Front per (dataset, model, threat model) with runs of a compression preset; newest run per seed and point."""
    groups: dict[tuple[str, str, str, float], list[tuple[Path, dict[str, Any]]]] = {}
    for run_dir, res in records:
        comp = res.get("compression") or {}
        if res.get("task", "train") != "train" or not comp.get("preset") or res.get("model_bytes") is None:
            continue
        tm = res.get("threat_model") or {}
        key = (str(res.get("dataset")), str(res.get("model")), str(tm.get("norm", "linf")), float(tm.get("eps", 0.0)))
        groups.setdefault(key, []).append((run_dir, res))
    fronts = []
    for (dataset, model, norm, eps), items in sorted(groups.items()):
        metric = robust_metric([r for _, r in items])
        if metric is None:
            continue
        newest: dict[tuple[str, int, int], tuple[float, dict[str, Any]]] = {}
        for run_dir, res in items:
            try:
                mtime = (run_dir / "results.json").stat().st_mtime
            except OSError:
                mtime = 0.0
            k = (_label(res), int(res["compression"].get("budget") or 0), int(res.get("seed", 0)))
            if k not in newest or mtime >= newest[k][0]:
                newest[k] = (mtime, res)
        lines: dict[str, dict[int, FrontPoint]] = {}
        budgets: set[float] = set()
        for (label, budget, seed), (_, res) in sorted(newest.items()):
            pt = lines.setdefault(label, {}).setdefault(budget, FrontPoint(label, budget))
            pt.model_bytes.append(float(res["model_bytes"]))
            pt.clean.append(float(res["clean_acc"]))
            pt.robust.append(float(res["robust_acc"][metric]))
            pt.seeds.append(seed)
            pt.settings.add(str(res.get("setting")))
            b = _budget_bytes(res)
            if b is not None:
                budgets.add(b)
        # A preset without a byte budget (one width everywhere) adds its points' sizes as budgets of the table.
        budgetless = {
            (_label(r), int(r["compression"].get("budget") or 0)) for _, r in items if _budget_bytes(r) is None
        }
        budgets |= {p.x for label, pts in lines.items() for p in pts.values() if (label, p.budget) in budgetless}
        fronts.append(
            Front(
                dataset,
                model,
                norm,
                eps,
                metric,
                {k: sorted(v.values(), key=lambda p: p.x) for k, v in sorted(lines.items())},
                sorted(budgets),
            )
        )
    return fronts


def plot_front(front: Front, path: str | Path) -> Path:
    """Clean and robust accuracy (%) against model bytes, one line per preset; the Pareto front of the robust
    panel drawn as a dashed step and ringed points."""
    from matplotlib.figure import Figure

    from esq_lightning.figures import save_figure as _save  # matplotlib loads only when a figure is drawn

    fig = Figure(figsize=(10.4, 4.0))
    axes = fig.subplots(1, 2, sharex=True)
    for label, pts in front.lines.items():
        xs = [p.x for p in pts]
        for ax, attr in zip(axes, ("clean", "robust")):
            stats = [_mean_std(getattr(p, attr)) for p in pts]
            ax.errorbar(
                xs,
                [100 * m for m, _ in stats],
                yerr=[100 * s for _, s in stats],
                marker="o",
                markersize=4,
                capsize=3,
                label=label,
            )
    best = pareto(front.points)
    axes[1].plot(
        [p.x for p in best], [100 * p.y for p in best], "k--", drawstyle="steps-post", linewidth=1, label="Pareto front"
    )
    axes[1].scatter([p.x for p in best], [100 * p.y for p in best], s=110, facecolors="none", edgecolors="k")
    threat = f"{front.norm} eps={format_eps(front.eps)}"
    axes[0].set_ylabel("clean accuracy (%)")
    axes[1].set_ylabel(f"robust accuracy (%)\n{metric_title(front.robust_metric)}, {threat}")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("model bytes (packed payload of esq-export)")
        ax.grid(alpha=0.3)
    n = sorted({len(p.seeds) for p in front.points})
    fig.suptitle(
        f"{front.dataset} / {front.model}: robustness vs bytes (mean ± std over {'/'.join(map(str, n))} "
        "seeds; eval mode, full quantization)",
        fontsize=9,
    )
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def front_markdown(front: Front, figure: str | None) -> str:
    def cell(p: FrontPoint) -> str:
        (c, cs), (r, rs) = _mean_std(p.clean), _mean_std(p.robust)
        spread = f" (±{_pct(cs, 1)} / ±{_pct(rs, 1)})" if len(p.seeds) > 1 else ""
        return f"{p.x:,.0f} B: {_pct(c, 1)} / {_pct(r, 1)}{spread} n={len(p.seeds)}"

    on_front = {id(p) for p in pareto(front.points)}
    lines = [
        f"### Robustness vs bytes: {front.dataset} / {front.model}",
        "",
        "| method | settings | points (model bytes: clean / robust %) |",
        "|---|---|---|",
    ]
    for label, pts in front.lines.items():
        settings = ", ".join(sorted(set().union(*(p.settings for p in pts))))
        lines.append(
            f"| {label} | {settings} | "
            + "; ".join(("**" + cell(p) + "**") if id(p) in on_front else cell(p) for p in pts)
            + " |"
        )
    lines += [
        "",
        "Bold: on the Pareto front (no point with fewer or equal bytes has a higher robust accuracy).",
        "",
        "| budget (bytes) | best method | model bytes | clean / robust % |",
        "|---|---|---|---|",
    ]
    for budget in front.budgets:
        fits = [p for p in front.points if p.x <= budget]
        if not fits:
            lines.append(f"| {budget:,.0f} | none fits | – | – |")
            continue
        best = max(fits, key=lambda p: (p.y, -p.x))
        (c, _), (r, _) = _mean_std(best.clean), _mean_std(best.robust)
        lines.append(f"| {budget:,.0f} | {best.label} | {best.x:,.0f} | {_pct(c, 1)} / {_pct(r, 1)} |")
    lines += [
        "",
        f"Clean / robust accuracy (%), robust = {metric_title(front.robust_metric)} under {front.norm} "
        f"eps={format_eps(front.eps)}; mean (± sample std) over n seeds; model bytes = the packed payload "
        "(results.json model_bytes).",
        "",
    ]
    if figure:
        lines += [f"![robustness vs bytes]({figure})", ""]
    return "\n".join(lines)


def write_fronts(records: Sequence[tuple[Path, dict[str, Any]]], out: Path) -> tuple[str, list[Path], list[Front]]:
    """(markdown section, files written, fronts): front_<dataset>_<model>.png per group of preset runs."""
    fronts = build_fronts(records)
    files: list[Path] = []
    parts = []
    for front in fronts:
        png = plot_front(front, out / f"front_{front.dataset}_{front.model}.png")
        files.append(png)
        parts.append(front_markdown(front, png.name))
    md = ("## Robustness vs bytes (compression front)\n\n" + "\n".join(parts)) if parts else ""
    return md, files, fronts


def log_fronts_wandb(fronts: Sequence[Front], pngs: Sequence[Path], project: str, mode: str | None = None) -> str:
    """One W&B run (job_type report): per front the robust-vs-bytes line plot, its table and the PNG."""
    panels = []
    for front, png in zip(fronts, pngs):
        on_front = {id(p) for p in pareto(front.points)}
        labels = list(front.lines)
        panels.append(
            WandbPanel(
                key=f"front/{front.dataset}_{front.model}",
                columns=[
                    "method",
                    "budget",
                    "mean_model_bytes",
                    "seed",
                    "model_bytes",
                    "clean_acc",
                    f"robust_acc_{front.robust_metric}",
                    "pareto",
                ],
                rows=[
                    [label, p.budget, p.x, seed, b, c, r, id(p) in on_front]
                    for label, pts in front.lines.items()
                    for p in pts
                    for seed, b, c, r in zip(p.seeds, p.model_bytes, p.clean, p.robust)
                ],
                png=png,
                xs=[[p.x for p in front.lines[k]] for k in labels],
                ys=[[p.y for p in front.lines[k]] for k in labels],
                labels=labels,
                xname="model bytes",
                title=f"{front.dataset}/{front.model}: robust accuracy ({metric_title(front.robust_metric)})",
            )
        )
    return log_panels_wandb(panels, project, mode)
