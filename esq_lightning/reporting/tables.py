"""The tables of esq-report as data: a Table of Rows of Cells (per-seed values and their mean and sample std)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["Cell", "Row", "Table"]


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
