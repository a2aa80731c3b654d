"""esq-report: the paper's tables (white-box mean ± std over seeds, transfer, amplification, black-box) from run directories.

This module collects the runs into tables (reporting/tables.py) and writes the report; the output formats (Markdown,
LaTeX, CSV) are reporting/formats.py, the robustness-compression curve reporting/curves.py.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from esq_lightning.artifacts.results import train_attack_label
from esq_lightning.artifacts.runs import RECORD_REQUIRED, iter_results, read_json_record, stored_training_config
from esq_lightning.atomic import atomic_write, atomic_write_text
from esq_lightning.errors import ESQUserError, show_value
from esq_lightning.reporting.curves import log_curves_wandb, write_curves
from esq_lightning.reporting.formats import (
    _title,
    amplification_latex,
    amplification_markdown,
    blackbox_latex,
    blackbox_markdown,
    format_eps,
    table_latex,
    table_markdown,
    tables_csv,
    transfer_latex,
    transfer_markdown,
)
from esq_lightning.reporting.front import log_fronts_wandb, write_fronts
from esq_lightning.reporting.tables import Cell, Row, Table

__all__ = [
    "PAPER_SETTINGS",
    "build_tables",
    "find_extras",
    "make_report",
    "row_label",
    "table_markdown",
]

# The paper's settings in the order of its tables; everything else follows, sorted by name.
PAPER_SETTINGS = ["NF", "AF", "NVB", "NEB", "AVB", "AEB", "AET", "NVT", "NET", "AVT", "NAB", "NAT", "AAB", "AAT"]
# The extra JSON files esq-eval's multi-model modes write (docs/evaluation.md).
EXTRA_FILES = ("transfer.json", "amplification.json", "blackbox.json")
# Hydra overrides that never tell two configurations apart: they change per seed, or only where and how a job runs.
IGNORED_OVERRIDES = (
    "seed",
    "ckpt_path",
    "ckpts",
    "init_from",
    "threads",
    "progress",
    "tags",
    "sweep",
    "hparams_search",
    "experiment",
    "experiment_name",
    "logger",
    "hydra",
    "paths",
    "eval.n_samples",
    "trainer.enable_progress_bar",
    "trainer.accelerator",
    "trainer.devices",
)


# ----------------------------------------------------------------------------------------------- collecting

# A key one run of a row has and another lacks (an older record, a key added since) names the row as absent.
ABSENT = "(absent)"


# Overrides whose effect the results.json record states (method, quant, and the pairing's layers, lambdas, distance).
# Overrides that results.json train_attack states (the training attack's name, steps, step size, noise, ...).
ATTACK_OVERRIDES = (
    "attack",
    "callbacks.pgd.name",
    "callbacks.pgd.steps",
    "callbacks.pgd.step_size",
    "callbacks.pgd.noise",
    "callbacks.pgd.project",
    "callbacks.pgd.random_start",
    "callbacks.pgd.gradalign",
)
RECORDED_OVERRIDES = (
    "method",
    "quant",
    "pairing",
    "pairing.layers",
    "pairing.lambdas",
    "pairing.distance",
    "pairing.p",
)


def _overrides(run_dir: Path) -> dict[str, str]:
    """The Hydra command-line overrides of a run (from .hydra/overrides.yaml), without those that never matter."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml

        items = yaml.safe_load(path.read_text()) or []
    except Exception:  # a half-written file of a running job: treat as no overrides
        return {}
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        bare = key.lstrip("+~")
        # The experiment is the row label and n_samples is stated in the caption; the rest never tell configs apart.
        if sep and not any(bare == p or bare.startswith((p + ".", p + "/")) for p in IGNORED_OVERRIDES):
            out[bare] = value
    return out


def _natural(value: Any) -> tuple[tuple[int, float, str], ...]:
    """Sort key that orders numbers in a value by size: lambdas 1, 3, 10, 30 rather than 1, 10, 3, 30."""
    parts = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", str(value))
    return tuple((1, float(p), "") if i % 2 else (0, 0.0, p) for i, p in enumerate(parts) if p)


def row_label(res: dict[str, Any]) -> str:
    """A row's name: the paper's setting, or the experiment name when the setting is `custom`."""
    setting = res.get("setting")
    if setting and setting != "custom":
        return str(setting)
    return str(res.get("experiment") or setting or "run")


# Keys of a training config that never split a row: the seed (rows are means over seeds) and the start, whose path
# differs per seed (its setting is part of the row's label).
NOT_ROW_KEYS = ("seed", "init_from", "init_seed")


def _variant(res: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """What, besides the seed, makes a run's configuration: its whole training config (results.json train_config, or
    the run's .hydra/config.yaml); for records without either, method, quant, pairing and the Hydra overrides."""
    config = stored_training_config(res, run_dir)
    if config:
        return {k: show_value(v) if not isinstance(v, str) else v for k, v in config.items() if k not in NOT_ROW_KEYS}
    pairing = res.get("pairing") or {}
    variant = {"method": str(res.get("method")), "quant": str(res.get("quant"))}
    if res.get("method") == "esq" and pairing:
        variant["pairing"] = ",".join(pairing.get("layers", []))
        variant["lambdas"] = ",".join(f"{v:g}" for v in pairing.get("lambdas", []))
        # What the run trained with, from its record (relative_l2 is the paper's distance).
        variant["distance"] = str(pairing.get("distance") or "relative_l2")
    # The training attack, from the record (results.json train_attack): rows of one setting trained with PGD-10
    # and with FGSM-RS are two rows, `attack=pgd10` and `attack=fgsm_rs`.
    attack = train_attack_label(res.get("train_attack"))
    if attack is not None:
        variant["attack"] = attack
    # Overrides of what the record states already would name a row twice (and by the spelling, not the value).
    recorded = RECORDED_OVERRIDES if res.get("method") == "esq" and pairing else ("method", "quant")
    if attack is not None:
        recorded = (*recorded, *ATTACK_OVERRIDES)
    variant.update({k: v for k, v in _overrides(run_dir).items() if k not in recorded})
    return variant


def _setting_order(label: str) -> tuple[int, str]:
    return (PAPER_SETTINGS.index(label), "") if label in PAPER_SETTINGS else (len(PAPER_SETTINGS), label)


def _newest_per_seed(runs: list[tuple[Path, dict[str, Any]]]) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """One run per seed (the newest results.json), so n counts seeds, not repeats of the same run."""

    def mtime(item: tuple[Path, dict[str, Any]]) -> float:
        try:
            return (item[0] / "results.json").stat().st_mtime
        except OSError:
            return 0.0

    newest: dict[int, tuple[Path, dict[str, Any]]] = {}
    dropped: list[str] = []
    for item in sorted(runs, key=mtime):
        seed = int(item[1].get("seed", 0))
        if seed in newest:
            dropped.append(str(newest[seed][0]))
        newest[seed] = item
    return [newest[s] for s in sorted(newest)], dropped


def build_tables(records: Iterable[tuple[Path, dict[str, Any]]], task: str) -> list[Table]:
    """Aggregate results records of one task over seeds into tables, one per dataset/model/threat model."""
    groups: dict[tuple[str, str, str, float], list[tuple[Path, dict[str, Any]]]] = {}
    for run_dir, res in records:
        if res.get("task", "train") != task or "clean_acc" not in res:
            continue
        tm = res.get("threat_model") or {}
        key = (str(res.get("dataset")), str(res.get("model")), str(tm.get("norm", "linf")), float(tm.get("eps", 0.0)))
        groups.setdefault(key, []).append((run_dir, res))
    tables = []
    for (dataset, model, norm, eps), items in sorted(groups.items()):
        columns: list[str] = []
        for _, res in items:
            for name in _robust_columns(res, eps):
                if name not in columns:
                    columns.append(name)
        # The per-sample worst case is the headline: first, whatever order the runs listed their attacks in.
        columns.sort(key=lambda c: c != "worst_case")
        # Rows: runs with the same label and configuration (all but the seed) are one row.
        by_label: dict[str, list[tuple[Path, dict[str, Any], dict[str, str]]]] = {}
        for run_dir, res in items:
            by_label.setdefault(row_label(res), []).append((run_dir, res, _variant(res, run_dir)))
        rows: list[Row] = []
        for label in sorted(by_label, key=_setting_order):
            members = by_label[label]
            # Only the keys that differ between runs of one label name a row; the rest are shared.
            keys = sorted({k for _, _, v in members for k in v})
            varying = [k for k in keys if len({v.get(k, ABSENT) for _, _, v in members}) > 1]
            sub: dict[tuple[str, ...], list[tuple[Path, dict[str, Any]]]] = {}
            for run_dir, res, v in members:
                sub.setdefault(tuple(v.get(k, ABSENT) for k in varying), []).append((run_dir, res))
            for values, runs in sorted(sub.items(), key=lambda kv: tuple(_natural(x) for x in kv[0])):
                runs, dropped = _newest_per_seed(runs)
                variant = {k: str(val) for k, val in zip(varying, values)}
                name = label + (" (" + ", ".join(f"{k}={val}" for k, val in variant.items()) + ")" if variant else "")
                cells = {"clean": Cell([float(r["clean_acc"]) for _, r in runs])}
                for col in columns:
                    vals = [float(v) for _, r in runs for c, v in _robust_columns(r, eps).items() if c == col]
                    if vals:
                        cells[col] = Cell(vals)
                rows.append(
                    Row(
                        name,
                        cells,
                        [str(d) for d, _ in runs],
                        [int(r.get("seed", 0)) for _, r in runs],
                        variant,
                        dropped,
                    )
                )
        n_samples = sorted({int(r["n_samples"]) for _, r in items if r.get("n_samples") is not None})
        tables.append(Table(task, dataset, model, norm, eps, columns, rows, n_samples))
    return tables


def _robust_columns(res: dict[str, Any], eps: float) -> dict[str, float]:
    """robust_acc keyed by column: an attack that ran at another eps than the table's threat model (FGSM at 2x eps)
    is its own column, `name (eps=...)`, so a column's eps is always its header's."""
    out: dict[str, float] = {}
    for name, value in (res.get("robust_acc") or {}).items():
        a_eps = ((res.get("attacks") or {}).get(name) or {}).get("eps")
        norm = ((res.get("attacks") or {}).get(name) or {}).get("norm")
        tm_norm = (res.get("threat_model") or {}).get("norm", "linf")
        if (
            name == "worst_case"
            or a_eps is None
            or (norm in (None, tm_norm) and math.isclose(float(a_eps), eps, rel_tol=1e-6))
        ):
            out[name] = value
        else:
            out[f"{name} ({norm + ' ' if norm and norm != tm_norm else ''}eps={format_eps(float(a_eps))})"] = value
    return out


def find_extras(
    root: Path, skip: Path | None = None, unreadable: list[tuple[Path, str]] | None = None
) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """The transfer / amplification / blackbox records under root, by kind (file stem); the files that cannot
    be read are appended to `unreadable` as (path, why)."""
    found: dict[str, list[tuple[Path, dict[str, Any]]]] = {name.split(".")[0]: [] for name in EXTRA_FILES}
    for name in EXTRA_FILES:
        for path in sorted(root.rglob(name)):
            if skip is not None and skip in path.resolve().parents:
                continue
            record = read_json_record(path, unreadable)
            if record is not None:
                found[name.split(".")[0]].append((path, record))
    return found


# ----------------------------------------------------------------------------------------------- the report


def default_out(roots: Sequence[Path]) -> Path:
    """Where a report goes without out=: <folder>/report for one folder; for several, report/ in the deepest folder
    they share (./report when they share only the filesystem root)."""
    if len(roots) == 1:
        return roots[0] / "report"
    common = Path(os.path.commonpath([str(r.resolve()) for r in roots]))
    return (common if common != Path(common.anchor) else Path.cwd()) / "report"


def make_report(
    root: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    fmt: str = "both",
    digits: int = 2,
    curve_x: str = "bits",
    wandb_project: str | None = None,
    wandb_mode: str | None = None,
) -> dict[str, Any]:
    """Collect every results record (and transfer/amplification/blackbox file) under root, write the tables to out.

    root is one folder or several (out defaults to default_out); a run found under two of them counts once.

    Training runs of more than one bit width also give the robustness-compression curve (esq_lightning.reporting.curves:
    bits_curve_<dataset>_<model>.png, x = bits or model bytes), logged to W&B too with wandb_project.
    Returns {"markdown": the whole report as markdown, "tables": {task: [Table]}, "files": [written paths],
    "unreadable": [(path, why)] of the files it could not read and left out}.
    """
    if fmt not in ("md", "latex", "both"):
        raise ESQUserError(f"format={fmt}: allowed: md, latex, both")
    roots = [Path(r) for r in ([root] if isinstance(root, (str, Path)) else root)]
    if not roots:
        raise ESQUserError("runs: give at least one run or multirun directory")
    for r in roots:
        if not r.exists():
            raise ESQUserError(f"{r}: no such run or multirun directory")
    out = Path(out) if out is not None else default_out(roots)
    unreadable: list[tuple[Path, str]] = []
    records, extras, seen = [], {}, set()
    for r in roots:
        for d, rec in iter_results(r, unreadable, required=RECORD_REQUIRED):
            if out.resolve() not in d.resolve().parents and d.resolve() not in seen:
                seen.add(d.resolve())
                records.append((d, rec))
        for kind, items in find_extras(r, skip=out.resolve(), unreadable=unreadable).items():
            have = extras.setdefault(kind, [])
            have += [(p, rec) for p, rec in items if p.resolve() not in {q.resolve() for q, _ in have}]
    where = ", ".join(str(r) for r in roots)
    if not records and not any(extras.values()):
        if unreadable:
            raise ESQUserError(
                f"{where}: no readable results; cannot read " + "; ".join(f"{path} ({why})" for path, why in unreadable)
            )
        raise ESQUserError(
            f"{where}: no results.json (nor transfer/amplification/blackbox.json) found; "
            "give a run or multirun directory of esq-train / esq-eval"
        )
    out.mkdir(parents=True, exist_ok=True)
    tables = {task: build_tables(records, task) for task in ("train", "eval")}
    md_parts = [f"# Results: {where}", ""]
    tex_parts = ["% esq-report: needs \\usepackage{booktabs} and \\usepackage{graphicx}", ""]
    files: list[Path] = []
    for task, ts in tables.items():
        if not ts:
            continue
        md = f"## {_title(task)}\n\n" + "\n".join(table_markdown(t, digits) for t in ts)
        tex = "\n".join(table_latex(t, digits) for t in ts)
        md_parts.append(md)
        tex_parts.append(tex)
        files += _write(out, f"whitebox_{task}", md, tex, fmt)
    for kind in ("transfer", "amplification", "blackbox"):
        items = extras.get(kind) or []
        if not items:
            continue
        md_sec, tex_sec = [], []
        for i, (path, rec) in enumerate(items, start=1):
            figure = _copy_figure(rec, path, out, f"{kind}_{i}") if kind != "transfer" else None
            if kind == "transfer":
                md_sec.append(transfer_markdown(path, rec, digits))
                tex_sec.append(transfer_latex(path, rec, digits))
            elif kind == "amplification":
                md_sec.append(amplification_markdown(path, rec, figure))
                tex_sec.append(amplification_latex(path, rec, figure))
            else:
                md_sec.append(blackbox_markdown(path, rec, figure))
                tex_sec.append(blackbox_latex(path, rec, figure))
        heading = {
            "transfer": "Transfer matrices",
            "amplification": "Error amplification",
            "blackbox": "Black-box attacks",
        }[kind]
        md = f"## {heading}\n\n" + "\n".join(md_sec)
        tex = "\n".join(tex_sec)
        md_parts.append(md)
        tex_parts.append(tex)
        files += _write(out, kind, md, tex, fmt)
    # ---- the robustness-compression curve (issue: bit-width sweeps) ----
    curve_md, curve_files, curves = write_curves(records, out, curve_x)
    if curve_md:
        md_parts.append(curve_md)
        files += curve_files
        files += _write(out, "bits_curve", curve_md, "", "md")
        if wandb_project:
            log_curves_wandb(curves, curve_files, wandb_project, wandb_mode)
    # ---- end of the curve ----
    # ---- the robustness-vs-bytes front of the compression presets (docs/compression.md) ----
    front_md, front_files, fronts = write_fronts(records, out)
    if front_md:
        md_parts.append(front_md)
        files += front_files
        files += _write(out, "front", front_md, "", "md")
        if wandb_project:
            log_fronts_wandb(fronts, front_files, wandb_project, wandb_mode)
    markdown = "\n".join(md_parts)
    files += _write(out, "report", markdown, "\n".join(tex_parts), fmt)
    csv_path = out / "whitebox.csv"
    atomic_write_text(csv_path, tables_csv([t for ts in tables.values() for t in ts]))
    files.append(csv_path)
    return {
        "markdown": markdown,
        "tables": tables,
        "files": files,
        "out": out,
        "n_runs": len(records),
        "extras": {k: [str(p) for p, _ in v] for k, v in extras.items()},
        "unreadable": unreadable,
    }


def _write(out: Path, stem: str, md: str, tex: str, fmt: str) -> list[Path]:
    written = []
    if fmt in ("md", "both"):
        atomic_write_text(out / f"{stem}.md", md if md.endswith("\n") else md + "\n")
        written.append(out / f"{stem}.md")
    if fmt in ("latex", "both"):
        atomic_write_text(out / f"{stem}.tex", tex if tex.endswith("\n") else tex + "\n")
        written.append(out / f"{stem}.tex")
    return written


def _copy_figure(rec: dict[str, Any], path: Path, out: Path, stem: str) -> str | None:
    """Copy the mode's PNG next to the report, so the markdown and LaTeX reference a file beside them."""
    candidates = [Path(rec["figure"])] if rec.get("figure") else []
    candidates.append(path.with_suffix(".png"))
    for fig in candidates:
        if fig.is_file():
            target = out / f"{stem}.png"
            atomic_write(target, lambda f, fig=fig: f.write(fig.read_bytes()))
            return target.name
    return None
