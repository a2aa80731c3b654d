"""Figures of the evaluation modes, drawn with matplotlib's Agg canvas (no display, no global backend switch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from esq_lightning.attacks.registry import attack_spec
from esq_lightning.figures import save_figure


def plot_amplification(curves: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """One curve per model: x = residual module index (1-based), y = D_l (Figures 1 and 2)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for curve in curves:
        d = curve["d"]
        ax.plot(range(1, len(d) + 1), d, marker="o", markersize=3, label=curve["label"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("residual module")
    ax.set_ylabel(r"$D_l = \|F_l(x) - F_l(x_{adv})\|_2 \,/\, \|F_l(x)\|_2$")
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_blackbox(curves: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Accuracy vs L2 budget, one curve per (model, attack) with its query budget in the legend (Figure 3)."""
    fig = Figure(figsize=(9.6, 4.0))
    ax = fig.add_subplot()
    # One colour per model, one line style per attack (AttackSpec.plot_style): quantized vs full precision reads
    # across colours.
    colours: dict[str, str] = {}
    for curve in curves:
        colour = colours.setdefault(curve["label"], f"C{len(colours) % 10}")
        spec = attack_spec(curve["attack"])
        ax.plot(
            curve["budgets"],
            [100 * a for a in curve["accuracy"]],
            linestyle=spec.plot_style if spec else ":",
            color=colour,
            marker="o",
            markersize=3,
            label=curve["legend"],
        )
    ax.set_xlabel(r"$L_2$ budget $\epsilon$")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    # The legend beside the axes: inside, it hides the curves that fall to the lower left.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.subplots_adjust(right=0.62)
    return save_figure(fig, path)
