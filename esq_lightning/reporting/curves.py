"""The robustness-compression curve of esq-report: clean and robust accuracy against bit width (or model bytes).

One line per training method (and model width / activation bits where the runs differ), mean and sample std
over seeds, from the training runs' results.json. Robust accuracy is `robust_acc.worst_case` (the per-sample
worst case over the evaluation's attacks) where every run has it, else the strongest attack every run has.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esq_lightning.reporting.formats import _pct, attack_title, format_eps

# Robust-accuracy columns from the most to the least trustworthy: the first one every run of a curve has is used.
ROBUST_PREFERENCE = (
    "worst_case",
    "autoattack",
    "apgd_dlr",
    "apgd_ce",
    "pgd100",
    "pgd50",
    "pgd20",
    "pgd10",
    "cw",
    "ddn",
    "fgsm",
)
METHOD_TITLES = {"natural": "vanilla (natural)", "adversarial": "adversarial", "esq": "error-silenced (ESQ)"}
FULL_BITS = 32


@dataclass
class Point:
    x: float
    bits: int
    clean: list[float] = field(default_factory=list)
    robust: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    model_bytes: list[float] = field(default_factory=list)


@dataclass
class Curve:
    """The curves of one (dataset, model, threat model): lines keyed by their label."""

    dataset: str
    model: str
    norm: str
    eps: float
    robust_metric: str
    x_axis: str
    lines: dict[str, list[Point]]
    # The attacks of the worst case (when that is the metric), as the runs recorded them.
    attacks: str = ""


def robust_metric(records: Sequence[dict[str, Any]]) -> str | None:
    """The robust-accuracy column every record has: worst_case, else the strongest attack (ROBUST_PREFERENCE)."""
    common = set.intersection(*(set(r.get("robust_acc") or {}) for r in records)) if records else set()
    for name in ROBUST_PREFERENCE:
        if name in common:
            return name
    return sorted(common)[0] if common else None


def _pairing(res: dict[str, Any]) -> str:
    """An error-silenced run's pairing as the record states it ('kl, lambda 1'); '' for other methods."""
    pairing = res.get("pairing") or {}
    if res.get("method") != "esq" or not pairing:
        return ""
    lambdas = "/".join(f"{v:g}" for v in pairing.get("lambdas") or [])
    return f"{pairing.get('distance') or 'relative_l2'}, lambda {lambdas}"


# Keys of a training config that move along a curve (the weight width and its quantizer family), differ per seed, or
# name the start (the line's `start`): the rest must be equal for runs to be points of one line.
ALONG_THE_LINE = ("seed", "init_from", "init_seed", "quant.bits", "quant.kind")


def _other_config(res: dict[str, Any]) -> dict[str, Any]:
    """The run's training config (results.json train_config) without the keys a curve runs along."""
    return {k: v for k, v in (res.get("train_config") or {}).items() if k not in ALONG_THE_LINE}


def _line_label(res: dict[str, Any], varying: Sequence[str], config_keys: Sequence[str] = ()) -> str:
    label = METHOD_TITLES.get(str(res.get("method")), str(res.get("method")))
    extra = []
    if _pairing(res):  # an error-silenced line always names its pairing
        extra.append(_pairing(res))
    if "width" in varying:
        extra.append(", ".join(f"{k} {v}" for k, v in sorted((res.get("model_width") or {}).items())) or "width ?")
    if "act_bits" in varying:
        extra.append(f"A{res.get('act_bits', 32)}")
    if "init_from" in varying:
        extra.append(f"from {res.get('start', '?')}")
    other = _other_config(res)
    extra += [f"{k}={other.get(k, '(absent)')}" for k in config_keys]
    return label + (f" ({'; '.join(extra)})" if extra else "")


def build_curves(records: Iterable[tuple[Path, dict[str, Any]]], x_axis: str = "bits") -> list[Curve]:
    """Curves of the training runs that span more than one bit width; newest run per seed and point."""
    if x_axis not in ("bits", "bytes"):
        raise ValueError(f"x axis {x_axis!r}; allowed: bits, bytes")
    groups: dict[tuple[str, str, str, float], list[tuple[Path, dict[str, Any]]]] = {}
    for run_dir, res in records:
        if res.get("task", "train") != "train" or "clean_acc" not in res or "bits" not in res:
            continue
        if beyond_bits(res):
            continue  # pruned or mixed-precision runs: a point of the front (reporting/front.py), not of one width
        tm = res.get("threat_model") or {}
        key = (str(res.get("dataset")), str(res.get("model")), str(tm.get("norm", "linf")), float(tm.get("eps", 0.0)))
        groups.setdefault(key, []).append((run_dir, {**res, "start": _start(res)}))
    curves = []
    for (dataset, model, norm, eps), items in sorted(groups.items()):
        if len({int(r["bits"]) for _, r in items}) < 2:
            continue

        # A configuration seen at one width only (e.g. the full-precision start itself) is a point, not a line.
        def config(r: dict[str, Any]) -> tuple[str, ...]:
            return (
                str(r.get("method")),
                str(r.get("model_width")),
                str(r.get("act_bits", 32)),
                r["start"],
                _pairing(r),
                json.dumps(_other_config(r), sort_keys=True, default=str),
            )

        spans: dict[tuple[str, ...], set[int]] = {}
        for _, r in items:
            spans.setdefault(config(r), set()).add(int(r["bits"]))
        items = [(d, r) for d, r in items if len(spans[config(r)]) > 1]
        if not items:
            continue
        metric = robust_metric([r for _, r in items])
        if metric is None:
            continue
        varying = [
            name
            for name, get in (
                ("pairing", _pairing),
                ("width", lambda r: str(r.get("model_width"))),
                ("act_bits", lambda r: r.get("act_bits", 32)),
                ("init_from", lambda r: r["start"]),
            )
            if len({get(r) for _, r in items} - {""}) > 1
        ]  # "": no pairing (methods other than esq)
        # Any other training key that differs between the runs of this group (a schedule, an optimizer) names the line.
        others = [_other_config(r) for _, r in items]
        shown = {
            "method.name",
            "pairing.layers",
            "pairing.lambdas",
            "pairing.distance",
            "pairing.p",
            "quant.act_bits",
            "model.width",
            "model.widen_factor",
        }
        config_keys = sorted(
            k
            for k in {k for o in others for k in o} - shown
            if len({json.dumps(o.get(k), default=str) for o in others}) > 1
        )
        newest: dict[tuple[str, int, int], tuple[float, dict[str, Any]]] = {}
        for run_dir, res in items:
            try:
                mtime = (run_dir / "results.json").stat().st_mtime
            except OSError:
                mtime = 0.0
            k = (_line_label(res, varying, config_keys), int(res["bits"]), int(res.get("seed", 0)))
            if k not in newest or mtime >= newest[k][0]:
                newest[k] = (mtime, res)
        lines: dict[str, dict[int, Point]] = {}
        for (label, bits, seed), (_, res) in sorted(newest.items()):
            size = res.get("model_bytes")
            if x_axis == "bytes" and size is None:
                continue
            pt = lines.setdefault(label, {}).setdefault(bits, Point(x=float(bits), bits=bits))
            pt.clean.append(float(res["clean_acc"]))
            pt.robust.append(float(res["robust_acc"][metric]))
            pt.seeds.append(seed)
            if size is not None:
                pt.model_bytes.append(float(size))
        for pts in lines.values():
            for pt in pts.values():
                if x_axis == "bytes":
                    pt.x = statistics.fmean(pt.model_bytes)
        attacks = ""
        if metric == "worst_case":
            sets = {tuple(sorted((r.get("worst_case") or {}).get("attacks") or [])) for _, r in newest.values()}
            attacks = (
                ", ".join(attack_title(a) for a in sets.pop()) if len(sets) == 1 else "the runs' attack sets differ"
            )
        curves.append(
            Curve(
                dataset,
                model,
                norm,
                eps,
                metric,
                x_axis,
                {label: sorted(pts.values(), key=lambda p: p.x) for label, pts in sorted(lines.items())},
                attacks,
            )
        )
    return curves


def beyond_bits(res: dict[str, Any]) -> bool:
    """True for a run compressed by more than its one bit width: pruned, bits per layer, or a front preset."""
    comp = res.get("compression") or {}
    return bool(
        comp.get("preset")
        or comp.get("sparsity")
        or comp.get("allocation")
        or comp.get("prune")
        or "-MP" in str(res.get("setting", ""))
    )


def _start(res: dict[str, Any]) -> str:
    # The setting name of the start, where init_from named one (setting:AF); else whether there was one.
    spec = res.get("init_from")
    return "scratch" if not spec else (str(spec).split(":", 1)[1] if str(spec).startswith("setting:") else "file")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric_title(metric: str) -> str:
    return "worst case over the attacks" if metric == "worst_case" else attack_title(metric)


def plot_curve(curve: Curve, path: str | Path) -> Path:
    """Two panels sharing x (clean, robust accuracy in %), one line per method, error bars = sample std over seeds."""
    from matplotlib.figure import Figure

    from esq_lightning.figures import save_figure as _save  # matplotlib loads only when a figure is drawn

    fig = Figure(figsize=(12.0, 4.2))
    axes = fig.subplots(1, 2, sharex=True)
    bits = sorted({p.bits for pts in curve.lines.values() for p in pts})
    colors = [f"C{i % 10}" for i in range(len(curve.lines))]
    for (label, pts), color in zip(curve.lines.items(), colors):
        xs = [p.x for p in pts]
        for ax, attr in zip(axes, ("clean", "robust")):
            stats = [_mean_std(getattr(p, attr)) for p in pts]
            means = [100 * m for m, _ in stats]
            # Error bars (sample std over seeds) clipped to the range accuracy can take.
            low = [min(100 * s, m) for (_, s), m in zip(stats, means)]
            high = [min(100 * s, 100 - m) for (_, s), m in zip(stats, means)]
            ax.errorbar(xs, means, yerr=[low, high], fmt="o", markersize=4, capsize=3, color=color, label=label)
            # Lines join only points at neighbouring widths of the figure: no line crosses a width this line lacks.
            for a, b in zip(range(len(pts) - 1), range(1, len(pts))):
                if curve.x_axis != "bits" or bits.index(pts[b].bits) == bits.index(pts[a].bits) + 1:
                    ax.plot([xs[a], xs[b]], [means[a], means[b]], color=color, linewidth=1.2)
    threat = f"{curve.norm} eps={format_eps(curve.eps)}"
    axes[0].set_ylabel("clean accuracy (%)")
    axes[1].set_ylabel(f"robust accuracy (%), {threat}")
    axes[1].set_title(
        metric_title(curve.robust_metric) + (f": {curve.attacks}" if curve.attacks else ""), fontsize=8, wrap=True
    )
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 100)
        if curve.x_axis == "bits":
            ax.set_xticks(bits)
            ax.set_xticklabels([f"{b} (FP)" if b == FULL_BITS else str(b) for b in bits])
            ax.set_xlabel("weight bits")
        else:
            ax.set_xlabel("model bytes (packed)")
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    n = sorted({len(p.seeds) for pts in curve.lines.values() for p in pts})
    fig.suptitle(
        f"{curve.dataset} / {curve.model}: robustness vs compression\n(mean ± std over "
        f"{'/'.join(map(str, n))} seeds; eval mode, full quantization)",
        fontsize=9,
    )
    # The legend beside the panels, never over the data; the labels name each line's pairing.
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.subplots_adjust(left=0.06, right=0.72, top=0.82, wspace=0.25)
    return _save(fig, path)


def curve_markdown(curve: Curve, figure: str | None) -> str:
    bits = sorted({p.bits for pts in curve.lines.values() for p in pts})
    head = ["method", *(f"{b} bits" for b in bits)]
    lines = [
        f"### Robustness vs compression: {curve.dataset} / {curve.model}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, pts in curve.lines.items():
        by_bits = {p.bits: p for p in pts}
        cells = []
        for b in bits:
            p = by_bits.get(b)
            if p is None:
                cells.append("–")
                continue
            (c, cs), (r, rs) = _mean_std(p.clean), _mean_std(p.robust)
            cells.append(
                f"{_pct(c, 1)} / {_pct(r, 1)}"
                + (f" (±{_pct(cs, 1)} / ±{_pct(rs, 1)})" if len(p.seeds) > 1 else "")
                + f" n={len(p.seeds)}"
            )
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += [
        "",
        f"Clean / robust accuracy (%), robust = {metric_title(curve.robust_metric)} under {curve.norm} "
        f"eps={format_eps(curve.eps)}; mean (± sample std) over n seeds.",
        "",
    ]
    if figure:
        lines += [f"![robustness vs compression]({figure})", ""]
    return "\n".join(lines)


def write_curves(
    records: Sequence[tuple[Path, dict[str, Any]]], out: Path, x_axis: str = "bits"
) -> tuple[str, list[Path], list[Curve]]:
    """(markdown section, files written, curves): bits_curve_<dataset>_<model>.png per group spanning 2+ widths."""
    curves = build_curves(records, x_axis)
    files: list[Path] = []
    parts = []
    for curve in curves:
        png = plot_curve(curve, out / f"bits_curve_{curve.dataset}_{curve.model}.png")
        files.append(png)
        parts.append(curve_markdown(curve, png.name))
    md = ("## Robustness vs compression\n\n" + "\n".join(parts)) if parts else ""
    return md, files, curves


@dataclass
class WandbPanel:
    """One figure of a report on W&B: its table (one row per run), its PNG and a line plot of robust accuracy."""

    key: str
    columns: list[str]
    rows: list[list[Any]]
    png: Path
    xs: list[list[float]]
    ys: list[list[float]]
    labels: list[str]
    xname: str
    title: str


def log_panels_wandb(panels: Sequence[WandbPanel], project: str, mode: str | None = None) -> str:
    """One W&B run (job_type report) holding each panel's table, PNG and line plot; returns the run's folder."""
    import wandb

    run = wandb.init(project=project, job_type="report", mode=mode, reinit=True)
    try:
        for panel in panels:
            run.log(
                {
                    f"{panel.key}/table": wandb.Table(columns=panel.columns, data=panel.rows),
                    f"{panel.key}/png": wandb.Image(str(panel.png)),
                    f"{panel.key}/robust": wandb.plot.line_series(
                        xs=panel.xs, ys=panel.ys, keys=panel.labels, xname=panel.xname, title=panel.title
                    ),
                }
            )
        return str(run.dir)
    finally:
        run.finish()


def log_curves_wandb(curves: Sequence[Curve], pngs: Sequence[Path], project: str, mode: str | None = None) -> str:
    """One W&B run (job_type report): per curve a line plot of robust accuracy vs bits, its table and the PNG."""
    panels = []
    for curve, png in zip(curves, pngs):
        labels = list(curve.lines)
        panels.append(
            WandbPanel(
                key=f"bits_curve/{curve.dataset}_{curve.model}",
                columns=["method", "bits", "x", "seed", "clean_acc", f"robust_acc_{curve.robust_metric}"],
                rows=[
                    [label, p.bits, p.x, seed, c, r]
                    for label, pts in curve.lines.items()
                    for p in pts
                    for seed, c, r in zip(p.seeds, p.clean, p.robust)
                ],
                png=png,
                xs=[[p.x for p in curve.lines[k]] for k in labels],
                ys=[[statistics.fmean(p.robust) for p in curve.lines[k]] for k in labels],
                labels=labels,
                xname="bits" if curve.x_axis == "bits" else "model bytes",
                title=f"{curve.dataset}/{curve.model}: robust accuracy ({metric_title(curve.robust_metric)})",
            )
        )
    return log_panels_wandb(panels, project, mode)


__all__ = [
    "Curve",
    "Point",
    "ROBUST_PREFERENCE",
    "WandbPanel",
    "build_curves",
    "curve_markdown",
    "log_curves_wandb",
    "log_panels_wandb",
    "plot_curve",
    "robust_metric",
    "write_curves",
]
