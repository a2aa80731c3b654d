"""The output formats of esq-report: the tables and the transfer / amplification / black-box sections as Markdown,
LaTeX and CSV, and the numbers as the paper writes them (8/255, percent with mean ± std)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from esq_lightning.reporting.tables import Cell, Table


def attack_title(column: str) -> str:
    """The header of a column: `FGSM` (the attack's AttackSpec.title), or `FGSM (eps=16/255)` for an attack at its
    own threat model; `worst case` for the per-sample worst case."""
    base, sep, rest = column.partition(" (")
    if base == "worst_case":
        return "worst case" + (sep + rest if sep else "")
    # Imported here: esq-report's tables need torch (which the attacks package loads) only for an attack's title.
    from esq_lightning.attacks import attack_title as title

    return title(base) + (sep + rest if sep else "")


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
    return (
        f"{table.dataset} / {table.model}: accuracy (%) under {table.norm} eps={format_eps(table.eps)} "
        f"({ns} test inputs; eval mode, full quantization); mean ± sample std over n seeds"
    )


def table_markdown(table: Table, digits: int = 2) -> str:
    head = ["setting", "n", "clean", *(attack_title(c) for c in table.columns)]
    lines = [
        f"### {table.dataset} / {table.model} ({table.norm} eps={format_eps(table.eps)})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
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
        out.append(
            {
                "&": r"\&",
                "%": r"\%",
                "$": r"\$",
                "#": r"\#",
                "_": r"\_",
                "{": r"\{",
                "}": r"\}",
                "~": r"\textasciitilde{}",
                "^": r"\^{}",
                "\\": r"\textbackslash{}",
            }.get(ch, ch)
        )
    return "".join(out)


def _latex_eps(eps: float) -> str:
    text = format_eps(eps)
    if "/" in text:
        num, den = text.split("/")
        return f"{num}/{den}"
    return text


def table_latex(table: Table, digits: int = 2) -> str:
    head = ["Setting", "$n$", "Clean", *(latex_escape(attack_title(c)) for c in table.columns)]
    norm = (
        r"$\ell_\infty$" if table.norm == "linf" else (r"$\ell_2$" if table.norm == "l2" else latex_escape(table.norm))
    )
    ns = ", ".join(str(n) for n in table.n_samples) or "?"
    cap = (
        f"{latex_escape(table.dataset)} / {latex_escape(table.model)}: accuracy (\\%) under {norm} "
        f"$\\epsilon = {_latex_eps(table.eps)}$ ({ns} test inputs); mean $\\pm$ sample std over $n$ seeds."
    )
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{cap}}}",
        r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        r"\toprule",
        " & ".join(head) + r" \\",
        r"\midrule",
    ]
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
    lines = [
        f"### Transfer: {_label_of(rec, path)}",
        "",
        f"| source \\ target ({rec.get('attack', '?')}{', ' + threat if threat else ''}) | "
        + " | ".join(_md_escape(x) for x in labels)
        + " |",
        "|" + "---|" * (len(labels) + 1),
    ]
    lines.append("| clean | " + " | ".join(_pct(a, digits) for a in rec.get("clean_acc", [])) + " |")
    for label, row in zip(labels, rec.get("matrix", [])):
        lines.append(f"| {_md_escape(label)} | " + " | ".join(_pct(a, digits) for a in row) + " |")
    lines += [
        "",
        f"Accuracy (%) of each column model on {rec.get('attack')} examples made on each row model; "
        f"{rec.get('n_samples')} test inputs. The diagonal is white-box accuracy. Source: `{path}`.",
        "",
    ]
    return "\n".join(lines)


def transfer_latex(path: Path, rec: dict[str, Any], digits: int = 2) -> str:
    labels = rec.get("labels", [])
    tm = rec.get("threat_model") or {}
    eps = tm.get("eps")
    cap = (
        f"Transfer accuracy (\\%), {latex_escape(rec.get('dataset', ''))}: {latex_escape(rec.get('attack', ''))} "
        f"examples made on the row model"
        + (f" ($\\epsilon = {_latex_eps(float(eps))}$)" if isinstance(eps, (int, float)) else "")
        + f", accuracy of the column model; {rec.get('n_samples')} test inputs."
    )
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{cap}}}",
        r"\begin{tabular}{l" + "r" * len(labels) + "}",
        r"\toprule",
        "Source $\\backslash$ Target & " + " & ".join(latex_escape(x) for x in labels) + r" \\",
        r"\midrule",
        "Clean & " + " & ".join(_pct(a, digits) for a in rec.get("clean_acc", [])) + r" \\",
        r"\midrule",
    ]
    for label, row in zip(labels, rec.get("matrix", [])):
        lines.append(latex_escape(label) + " & " + " & ".join(_pct(a, digits) for a in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def amplification_markdown(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    curves = rec.get("curves", [])
    n_mod = max((len(c.get("d", [])) for c in curves), default=0)
    attack = rec.get("attack") or {}
    lines = [
        f"### Error amplification: {_label_of(rec, path)}",
        "",
        "| model | clean | PGD | " + " | ".join(f"D_{i + 1}" for i in range(n_mod)) + " |",
        "|" + "---|" * (n_mod + 3),
    ]
    for c in curves:
        lines.append(
            f"| {_md_escape(c.get('label'))} | {_pct(c.get('clean_acc'))} | {_pct(c.get('adv_acc'))} | "
            + " | ".join(f"{d:.4f}" for d in c.get("d", []))
            + " |"
        )
    modules = curves[0].get("modules", []) if curves else []
    lines += [
        "",
        f"D_l after each residual module ({', '.join(modules)}) under {attack.get('steps')}-step PGD, "
        f"{attack.get('norm')} eps={format_eps(float(attack.get('eps', 0)))}, {rec.get('n_samples')} test inputs. "
        f"Source: `{path}`.",
        "",
    ]
    if figure:
        lines += [f"![error amplification]({figure})", ""]
    return "\n".join(lines)


def amplification_latex(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    curves = rec.get("curves", [])
    n_mod = max((len(c.get("d", [])) for c in curves), default=0)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{Error amplification $D_l$ per residual module, {latex_escape(rec.get('dataset', ''))}, "
        f"{rec.get('n_samples')} test inputs.}}",
        r"\begin{tabular}{l" + "r" * (n_mod + 2) + "}",
        r"\toprule",
        "Model & Clean & PGD & " + " & ".join(f"$D_{{{i + 1}}}$" for i in range(n_mod)) + r" \\",
        r"\midrule",
    ]
    for c in curves:
        lines.append(
            " & ".join(
                [
                    latex_escape(c.get("label", "")),
                    _pct(c.get("clean_acc")),
                    _pct(c.get("adv_acc")),
                    *(f"{d:.4f}" for d in c.get("d", [])),
                ]
            )
            + r" \\"
        )
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if figure:
        lines += [
            r"\begin{figure}[t]",
            r"\centering",
            f"\\includegraphics[width=0.6\\linewidth]{{{figure}}}",
            r"\caption{Error amplification $D_l$ per residual module.}",
            r"\end{figure}",
            "",
        ]
    return "\n".join(lines)


def blackbox_markdown(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    budgets = rec.get("budgets", [])
    lines = [
        f"### Black-box attacks: {_label_of(rec, path)}",
        "",
        "| model, attack (queries) | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|" + "---|" * (len(budgets) + 1),
    ]
    for c in rec.get("curves", []):
        lines.append(
            f"| {_md_escape(c.get('legend', c.get('label')))} | "
            + " | ".join(_pct(a, 1) for a in c.get("accuracy", []))
            + " |"
        )
    lines += ["", f"Accuracy (%) vs L2 budget; {rec.get('n_samples')} test inputs. Source: `{path}`.", ""]
    if figure:
        lines += [f"![black-box curves]({figure})", ""]
    return "\n".join(lines)


def blackbox_latex(path: Path, rec: dict[str, Any], figure: str | None) -> str:
    budgets = rec.get("budgets", [])
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{Accuracy (\\%) vs $\\ell_2$ budget under black-box attacks, "
        f"{latex_escape(rec.get('dataset', ''))}, {rec.get('n_samples')} test inputs.}}",
        r"\begin{tabular}{l" + "r" * len(budgets) + "}",
        r"\toprule",
        "Model, attack & " + " & ".join(f"{b:g}" for b in budgets) + r" \\",
        r"\midrule",
    ]
    for c in rec.get("curves", []):
        lines.append(
            latex_escape(c.get("legend", c.get("label", "")))
            + " & "
            + " & ".join(_pct(a, 1) for a in c.get("accuracy", []))
            + r" \\"
        )
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if figure:
        lines += [
            r"\begin{figure}[t]",
            r"\centering",
            f"\\includegraphics[width=0.6\\linewidth]{{{figure}}}",
            r"\caption{Accuracy vs $\ell_2$ budget under black-box attacks.}",
            r"\end{figure}",
            "",
        ]
    return "\n".join(lines)


def tables_csv(tables: Sequence[Table]) -> str:
    """Long-format rows (one per table row and metric) for notebooks and spreadsheets."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "dataset", "model", "norm", "eps", "row", "metric", "mean", "std", "n", "seeds"])
    for t in tables:
        for row in t.rows:
            for metric, cell in row.cells.items():
                writer.writerow(
                    [
                        t.task,
                        t.dataset,
                        t.model,
                        t.norm,
                        t.eps,
                        row.label,
                        metric,
                        cell.mean,
                        cell.std,
                        cell.n,
                        " ".join(map(str, row.seeds)),
                    ]
                )
    return buf.getvalue()
