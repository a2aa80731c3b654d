"""esq-report: the paper's tables (white-box mean ± std over seeds, transfer, amplification, black-box) from run directories."""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from esq_lightning.errors import ESQUserError
from esq_lightning.artifacts.runs import iter_results, read_json_record

# The paper's settings in the order of its tables; everything else follows, sorted by name.
PAPER_SETTINGS = ["NF", "AF", "NVB", "NEB", "AVB", "AEB", "AET", "NVT", "NET", "AVT", "NAB", "NAT", "AAB", "AAT"]
# The extra JSON files esq-eval's multi-model modes write (docs/evaluation.md).
EXTRA_FILES = ("transfer.json", "amplification.json", "blackbox.json")
# Hydra overrides that never tell two configurations apart: they change per seed, or only where and how a job runs.
IGNORED_OVERRIDES = ("seed", "ckpt_path", "ckpts", "init_from", "threads", "progress", "tags", "sweep",
                     "hparams_search", "experiment", "experiment_name", "logger", "hydra", "paths", "eval.n_samples",
                     "trainer.enable_progress_bar", "trainer.accelerator", "trainer.devices")


@dataclass
class Cell:
    """One metric of one row: the per-seed values (fractions) and their summary."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        # The sample standard deviation (n - 1) over seeds; undefined for one seed, reported as 0.
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


@dataclass
class Row:
    label: str
    cells: dict[str, Cell]
    runs: list[str]
    seeds: list[int]
    variant: dict[str, str]
    # Older runs of a seed this row already has (a sweep run twice into one directory): left out of the statistics.
    dropped: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs)


@dataclass
class Table:
    """Rows of one (task, dataset, model, threat model): one table of the report."""

    task: str
    dataset: str
    model: str
    norm: str
    eps: float
    columns: list[str]
    rows: list[Row]
    n_samples: list[int]


# ----------------------------------------------------------------------------------------------- collecting


# Overrides whose effect the results.json record states (method, quant, and the pairing's layers, lambdas, distance).
RECORDED_OVERRIDES = ("method", "quant", "pairing", "pairing.layers", "pairing.lambdas", "pairing.distance", "pairing.p")


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


def _variant(res: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """What, besides the seed, makes a run's configuration: method, quant, pairing and the Hydra overrides."""
    pairing = res.get("pairing") or {}
    variant = {"method": str(res.get("method")), "quant": str(res.get("quant"))}
    if res.get("method") == "esq" and pairing:
        variant["pairing"] = ",".join(pairing.get("layers", []))
        variant["lambdas"] = ",".join(f"{v:g}" for v in pairing.get("lambdas", []))
        # What the run trained with, from its record (relative_l2 is the paper's distance).
        variant["distance"] = str(pairing.get("distance") or "relative_l2")
    # Overrides of what the record states already would name a row twice (and by the spelling, not the value).
    recorded = RECORDED_OVERRIDES if res.get("method") == "esq" and pairing else ("method", "quant")
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
            varying = [k for k in keys if len({v.get(k) for _, _, v in members}) > 1]
            sub: dict[tuple[str | None, ...], list[tuple[Path, dict[str, Any]]]] = {}
            for run_dir, res, v in members:
                sub.setdefault(tuple(v.get(k) for k in varying), []).append((run_dir, res))
            for values, runs in sorted(sub.items(), key=lambda kv: tuple(_natural(x) for x in kv[0])):
                runs, dropped = _newest_per_seed(runs)
                variant = {k: str(val) for k, val in zip(varying, values)}
                name = label + (" (" + ", ".join(f"{k}={val}" for k, val in variant.items()) + ")" if variant else "")
                cells = {"clean": Cell([float(r["clean_acc"]) for _, r in runs])}
                for col in columns:
                    vals = [float(v) for _, r in runs for c, v in _robust_columns(r, eps).items() if c == col]
                    if vals:
                        cells[col] = Cell(vals)
                rows.append(Row(name, cells, [str(d) for d, _ in runs], [int(r.get("seed", 0)) for _, r in runs],
                                variant, dropped))
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
        if name == "worst_case" or a_eps is None or (norm in (None, tm_norm) and math.isclose(float(a_eps), eps,
                                                                                              rel_tol=1e-6)):
            out[name] = value
        else:
            out[f"{name} ({norm + ' ' if norm and norm != tm_norm else ''}eps={format_eps(float(a_eps))})"] = value
    return out


def attack_title(column: str) -> str:
    """The header of a column: `FGSM` (the attack's AttackSpec.title), or `FGSM (eps=16/255)` for an attack at its
    own threat model; `worst case` for the per-sample worst case."""
    base, sep, rest = column.partition(" (")
    if base == "worst_case":
        return "worst case" + (sep + rest if sep else "")
    from esq_lightning.attacks import attack_title as title

    return title(base) + (sep + rest if sep else "")


def find_extras(root: Path, skip: Path | None = None, unreadable: list[tuple[Path, str]] | None = None
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


# ----------------------------------------------------------------------------------------------- formatting


def format_eps(eps: float) -> str:
    """8/255 for 0.0313..., else the number: the paper states L_inf budgets in 1/255 units."""
    frac = Fraction(eps).limit_denominator(255)
    if eps > 0 and frac.denominator == 255 and abs(float(frac) - eps) < 1e-9:
        return f"{frac.numerator}/255"
    return f"{eps:.4g}"


def _pct(value: float, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def format_cell(cell: Cell | None, row_n: int, digits: int = 2, latex: bool = False) -> str:
    """mean ± std in percent; a cell with fewer seeds than its row says so."""
    if cell is None or cell.n == 0:
        return "–"
    pm = " $\\pm$ " if latex else " ± "
    text = _pct(cell.mean, digits) + (pm + _pct(cell.std, digits) if cell.n > 1 else "")
    if cell.n != row_n:
        text += f" (n={cell.n})"
    return text


def _title(task: str) -> str:
    return "White-box accuracy, training runs" if task == "train" else "White-box accuracy, esq-eval runs"


def caption(table: Table) -> str:
    ns = ", ".join(str(n) for n in table.n_samples) or "?"
    return (f"{table.dataset} / {table.model}: accuracy (%) under {table.norm} eps={format_eps(table.eps)} "
            f"({ns} test inputs; eval mode, full quantization); mean ± sample std over n seeds")


def table_markdown(table: Table, digits: int = 2) -> str:
    head = ["setting", "n", "clean", *(attack_title(c) for c in table.columns)]
    lines = [f"### {table.dataset} / {table.model} ({table.norm} eps={format_eps(table.eps)})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        cells = [format_cell(row.cells.get(c), row.n, digits) for c in ["clean", *table.columns]]
        lines.append("| " + " | ".join([_md_escape(row.label), str(row.n), *cells]) + " |")
    lines += ["", caption(table) + "."]
    dropped = sum(len(r.dropped) for r in table.rows)
    if dropped:
        lines.append(f"Left out: {dropped} older run(s) of a seed that a newer run of the same row repeats.")
    lines.append("")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def latex_escape(text: str) -> str:
    out = []
    for ch in str(text):
        out.append({"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                    "~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}"}.get(ch, ch))
    return "".join(out)


def _latex_eps(eps: float) -> str:
    text = format_eps(eps)
    if "/" in text:
        num, den = text.split("/")
        return f"{num}/{den}"
    return text


def table_latex(table: Table, digits: int = 2) -> str:
    head = ["Setting", "$n$", "Clean", *(latex_escape(attack_title(c)) for c in table.columns)]
    norm = r"$\ell_\infty$" if table.norm == "linf" else (r"$\ell_2$" if table.norm == "l2" else latex_escape(table.norm))
    ns = ", ".join(str(n) for n in table.n_samples) or "?"
    cap = (f"{latex_escape(table.dataset)} / {latex_escape(table.model)}: accuracy (\\%) under {norm} "
           f"$\\epsilon = {_latex_eps(table.eps)}$ ({ns} test inputs); mean $\\pm$ sample std over $n$ seeds.")
    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{cap}}}", r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
             r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    for row in table.rows:
        cells = [format_cell(row.cells.get(c), row.n, digits, latex=True) for c in ["clean", *table.columns]]
        lines.append(" & ".join([latex_escape(row.label), str(row.n), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _label_of(record: dict[str, Any], path: Path) -> str:
    return f"{record.get('dataset', '?')}, {path.parent.name}"


def transfer_markdown(path: Path, rec: dict[str, Any], digits: int = 2) -> str:
    labels = rec.get("labels", [])
    tm = rec.get("threat_model") or {}
    eps = tm.get("eps")
    threat = f"{tm.get('norm', '')} eps={format_eps(float(eps))}" if isinstance(eps, (int, float)) else ""
    lines = [f"### Transfer: {_label_of(rec, path)}", "",
             f"| source \\ target ({rec.get('attack', '?')}{', ' + threat if threat else ''}) | "
             + " | ".join(_md_escape(x) for x in labels) + " |", "|" + "---|" * (len(labels) + 1)]
    lines.append("| clean | " + " | ".join(_pct(a, digits) for a in rec.get("clean_acc", [])) + " |")
    for label, row in zip(labels, rec.get("matrix", [])):
        lines.append(f"| {_md_escape(label)} | " + " | ".join(_pct(a, digits) for a in row) + " |")
    lines += ["", f"Accuracy (%) of each column model on {rec.get('attack')} examples made on each row model; "
              f"{rec.get('n_samples')} test inputs. The diagonal is white-box accuracy. Source: `{path}`.", ""]
    return "\n".join(lines)


def transfer_latex(path: Path, rec: dict[str, Any], digits: int = 2) -> str:
    labels = rec.get("labels", [])
    tm = rec.get("threat_model") or {}
    eps = tm.get("eps")
    cap = (f"Transfer accuracy (\\%), {latex_escape(rec.get('dataset', ''))}: {latex_escape(rec.get('attack', ''))} "
           f"examples made on the row model" + (f" ($\\epsilon = {_latex_eps(float(eps))}$)" if isinstance(eps, (int, float)) else "")
           + f", accuracy of the column model; {rec.get('n_samples')} test inputs.")
    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{cap}}}", r"\begin{tabular}{l" + "r" * len(labels) + "}",
             r"\toprule", "Source $\\backslash$ Target & " + " & ".join(latex_escape(x) for x in labels) + r" \\",
             r"\midrule", "Clean & " + " & ".join(_pct(a, digits) for a in rec.get("clean_acc", [])) + r" \\", r"\midrule"]
    for label, row in zip(labels, rec.get("matrix", [])):
        lines.append(latex_escape(label) + " & " + " & ".join(_pct(a, digits) for a in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def amplification_markdown(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    curves = rec.get("curves", [])
    n_mod = max((len(c.get("d", [])) for c in curves), default=0)
    attack = rec.get("attack") or {}
    lines = [f"### Error amplification: {_label_of(rec, path)}", "",
             "| model | clean | PGD | " + " | ".join(f"D_{i + 1}" for i in range(n_mod)) + " |",
             "|" + "---|" * (n_mod + 3)]
    for c in curves:
        lines.append(f"| {_md_escape(c.get('label'))} | {_pct(c.get('clean_acc'))} | {_pct(c.get('adv_acc'))} | "
                     + " | ".join(f"{d:.4f}" for d in c.get("d", [])) + " |")
    modules = curves[0].get("modules", []) if curves else []
    lines += ["", f"D_l after each residual module ({', '.join(modules)}) under {attack.get('steps')}-step PGD, "
              f"{attack.get('norm')} eps={format_eps(float(attack.get('eps', 0)))}, {rec.get('n_samples')} test inputs. "
              f"Source: `{path}`.", ""]
    if figure:
        lines += [f"![error amplification]({figure})", ""]
    return "\n".join(lines)


def amplification_latex(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    curves = rec.get("curves", [])
    n_mod = max((len(c.get("d", [])) for c in curves), default=0)
    lines = [r"\begin{table}[t]", r"\centering",
             f"\\caption{{Error amplification $D_l$ per residual module, {latex_escape(rec.get('dataset', ''))}, "
             f"{rec.get('n_samples')} test inputs.}}", r"\begin{tabular}{l" + "r" * (n_mod + 2) + "}", r"\toprule",
             "Model & Clean & PGD & " + " & ".join(f"$D_{{{i + 1}}}$" for i in range(n_mod)) + r" \\", r"\midrule"]
    for c in curves:
        lines.append(" & ".join([latex_escape(c.get("label", "")), _pct(c.get("clean_acc")), _pct(c.get("adv_acc")),
                                 *(f"{d:.4f}" for d in c.get("d", []))]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if figure:
        lines += [r"\begin{figure}[t]", r"\centering", f"\\includegraphics[width=0.6\\linewidth]{{{figure}}}",
                  r"\caption{Error amplification $D_l$ per residual module.}", r"\end{figure}", ""]
    return "\n".join(lines)


def blackbox_markdown(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    budgets = rec.get("budgets", [])
    lines = [f"### Black-box attacks: {_label_of(rec, path)}", "",
             "| model, attack (queries) | " + " | ".join(f"{b:g}" for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 1)]
    for c in rec.get("curves", []):
        lines.append(f"| {_md_escape(c.get('legend', c.get('label')))} | "
                     + " | ".join(_pct(a, 1) for a in c.get("accuracy", [])) + " |")
    lines += ["", f"Accuracy (%) vs L2 budget; {rec.get('n_samples')} test inputs. Source: `{path}`.", ""]
    if figure:
        lines += [f"![black-box curves]({figure})", ""]
    return "\n".join(lines)


def blackbox_latex(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    budgets = rec.get("budgets", [])
    lines = [r"\begin{table}[t]", r"\centering",
             f"\\caption{{Accuracy (\\%) vs $\\ell_2$ budget under black-box attacks, "
             f"{latex_escape(rec.get('dataset', ''))}, {rec.get('n_samples')} test inputs.}}",
             r"\begin{tabular}{l" + "r" * len(budgets) + "}", r"\toprule",
             "Model, attack & " + " & ".join(f"{b:g}" for b in budgets) + r" \\", r"\midrule"]
    for c in rec.get("curves", []):
        lines.append(latex_escape(c.get("legend", c.get("label", ""))) + " & "
                     + " & ".join(_pct(a, 1) for a in c.get("accuracy", [])) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if figure:
        lines += [r"\begin{figure}[t]", r"\centering", f"\\includegraphics[width=0.6\\linewidth]{{{figure}}}",
                  r"\caption{Accuracy vs $\ell_2$ budget under black-box attacks.}", r"\end{figure}", ""]
    return "\n".join(lines)


def tables_csv(tables: Sequence[Table]) -> str:
    """Long-format rows (one per table row and metric) for notebooks and spreadsheets."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "dataset", "model", "norm", "eps", "row", "metric", "mean", "std", "n", "seeds"])
    for t in tables:
        for row in t.rows:
            for metric, cell in row.cells.items():
                writer.writerow([t.task, t.dataset, t.model, t.norm, t.eps, row.label, metric, cell.mean, cell.std,
                                 cell.n, " ".join(map(str, row.seeds))])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the report


def make_report(root: str | Path | Sequence[str | Path], out: str | Path | None = None, fmt: str = "both",
                digits: int = 2, curve_x: str = "bits", wandb_project: str | None = None,
                wandb_mode: str | None = None) -> dict[str, Any]:
    """Collect every results record (and transfer/amplification/blackbox file) under root, write the tables to out.

    root is one folder or several (then out is required); a run found under two of them counts once.

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
    if out is None and len(roots) > 1:
        raise ESQUserError("out: give the folder of the report when it reads more than one directory")
    out = Path(out) if out is not None else roots[0] / "report"
    unreadable: list[tuple[Path, str]] = []
    records, extras, seen = [], {}, set()
    for r in roots:
        for d, rec in iter_results(r, unreadable):
            if out.resolve() not in d.resolve().parents and d.resolve() not in seen:
                seen.add(d.resolve())
                records.append((d, rec))
        for kind, items in find_extras(r, skip=out.resolve(), unreadable=unreadable).items():
            have = extras.setdefault(kind, [])
            have += [(p, rec) for p, rec in items if p.resolve() not in {q.resolve() for q, _ in have}]
    where = ", ".join(str(r) for r in roots)
    if not records and not any(extras.values()):
        if unreadable:
            raise ESQUserError(f"{where}: no readable results; cannot read "
                               + "; ".join(f"{path} ({why})" for path, why in unreadable))
        raise ESQUserError(f"{where}: no results.json (nor transfer/amplification/blackbox.json) found; "
                           "give a run or multirun directory of esq-train / esq-eval")
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
        heading = {"transfer": "Transfer matrices", "amplification": "Error amplification",
                   "blackbox": "Black-box attacks"}[kind]
        md = f"## {heading}\n\n" + "\n".join(md_sec)
        tex = "\n".join(tex_sec)
        md_parts.append(md)
        tex_parts.append(tex)
        files += _write(out, kind, md, tex, fmt)
    # ---- the robustness-compression curve (issue: bit-width sweeps) ----
    from esq_lightning.reporting.curves import log_curves_wandb, write_curves

    curve_md, curve_files, curves = write_curves(records, out, curve_x)
    if curve_md:
        md_parts.append(curve_md)
        files += curve_files
        files += _write(out, "bits_curve", curve_md, "", "md")
        if wandb_project:
            log_curves_wandb(curves, curve_files, wandb_project, wandb_mode)
    # ---- end of the curve ----
    markdown = "\n".join(md_parts)
    files += _write(out, "report", markdown, "\n".join(tex_parts), fmt)
    csv_path = out / "whitebox.csv"
    csv_path.write_text(tables_csv([t for ts in tables.values() for t in ts]))
    files.append(csv_path)
    return {"markdown": markdown, "tables": tables, "files": files, "out": out,
            "n_runs": len(records), "extras": {k: [str(p) for p, _ in v] for k, v in extras.items()},
            "unreadable": unreadable}


def _write(out: Path, stem: str, md: str, tex: str, fmt: str) -> list[Path]:
    written = []
    if fmt in ("md", "both"):
        (out / f"{stem}.md").write_text(md if md.endswith("\n") else md + "\n")
        written.append(out / f"{stem}.md")
    if fmt in ("latex", "both"):
        (out / f"{stem}.tex").write_text(tex if tex.endswith("\n") else tex + "\n")
        written.append(out / f"{stem}.tex")
    return written


def _copy_figure(rec: dict[str, Any], path: Path, out: Path, stem: str) -> str | None:
    """Copy the mode's PNG next to the report, so the markdown and LaTeX reference a file beside them."""
    candidates = [Path(rec["figure"])] if rec.get("figure") else []
    candidates.append(path.with_suffix(".png"))
    for fig in candidates:
        if fig.is_file():
            target = out / f"{stem}.png"
            shutil.copyfile(fig, target)
            return target.name
    return None
