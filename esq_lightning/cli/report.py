"""esq-report DIR: the paper's tables (markdown and LaTeX) from every results.json under a run or multirun directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from esq_lightning.cli._common import user_errors_as_one_line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # argparse, not Hydra: a report is no training job and should not make a run directory of its own.
    parser = argparse.ArgumentParser(
        prog="esq-report",
        description="Collect every results.json (and transfer/amplification/blackbox.json) under DIR into the "
                    "paper's tables: white-box mean ± std over seeds, transfer matrices, error amplification, "
                    "black-box curves. Markdown goes to stdout too.",
    )
    parser.add_argument("dir", help="a run or multirun directory (searched recursively)")
    parser.add_argument("--out", default=None, help="where the table files go (default: DIR/report)")
    parser.add_argument("--format", default="both", choices=["md", "latex", "both"], help="table files to write")
    parser.add_argument("--digits", type=int, default=2, help="decimals of the percentages")
    parser.add_argument("--quiet", action="store_true", help="do not print the markdown report")
    parser.add_argument("--curve-x", default="bits", choices=["bits", "bytes"],
                        help="x axis of the robustness-compression curve: weight bits or packed model bytes")
    parser.add_argument("--wandb", default=None, metavar="PROJECT",
                        help="also log the robustness-compression curve to this W&B project (a job_type=report run)")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"],
                        help="W&B mode of that run (default: W&B's own, e.g. WANDB_MODE)")
    return parser.parse_args(argv)


@user_errors_as_one_line
def main(argv: Sequence[str] | None = None) -> int:
    from esq_lightning.reporting.report import make_report

    args = parse_args(argv)
    report = make_report(args.dir, out=args.out, fmt=args.format, digits=args.digits, curve_x=args.curve_x,
                         wandb_project=args.wandb, wandb_mode=args.wandb_mode)
    for path, why in report["unreadable"]:
        print(f"esq-report: skipped {path}: cannot read it ({why})", file=sys.stderr, flush=True)
    if not args.quiet:
        print(report["markdown"], flush=True)
    print(f"esq-report: {report['n_runs']} runs; wrote {len(report['files'])} files to {report['out']}",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
