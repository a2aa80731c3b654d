"""Saving a figure: every PNG of esq-eval and esq-report goes through save_figure."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` (folders created) and return the path."""
    # A Figure with its own Agg canvas: pyplot's global state (and the user's backend) is never touched.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path
