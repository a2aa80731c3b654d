"""What esq-report does: the tables and curves of reporting/ over the runs the options name, and the lines it prints."""

from __future__ import annotations

import sys
from typing import Any

from esq_lightning.config.commands import ReportOptions
from esq_lightning.reporting.report import make_report


def report(opts: ReportOptions) -> dict[str, Any]:
    """Write the report of `opts.runs` into `opts.out`, print it (unless quiet) and say what was written."""
    result = make_report(
        opts.runs if len(opts.runs) > 1 else opts.runs[0],
        out=opts.out,
        fmt=opts.format,
        digits=opts.digits,
        curve_x=opts.curve_x,
        wandb_project=opts.wandb,
        wandb_mode=opts.wandb_mode,
    )
    for path, why in result["unreadable"]:
        reason = why if why.startswith("field ") else f"cannot read it ({why})"
        print(f"esq-report: skipped {path}: {reason}", file=sys.stderr, flush=True)
    if not opts.quiet:
        print(result["markdown"], flush=True)
    print(
        f"esq-report: {result['n_runs']} runs; wrote {len(result['files'])} files to {result['out']}",
        file=sys.stderr,
        flush=True,
    )
    return result
