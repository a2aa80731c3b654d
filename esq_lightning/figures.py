"""Saving a figure: every PNG of esq-eval and esq-report goes through save_figure."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` (folders created) and return the path."""
    # A Figure with its own Agg canvas: pyplot's global state (and the user's backend) is never touched.
    from esq_lightning.atomic import atomic_write

    path = Path(path)
    FigureCanvasAgg(fig)
    # Through the one atomic writer: a failed write leaves the previous figure intact.
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=150, bbox_inches="tight"))
    return path
