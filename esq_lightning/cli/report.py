"""esq-report runs=DIR: the paper's tables (markdown and LaTeX) from every results.json under run or multirun folders.

A Hydra main over conf/report.yaml like the other commands (key=value options, --help, --cfg job), but a report
is no training job: the config runs it in the current directory with no .hydra/ folder and no log file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from esq_lightning.cli._common import CONFIG_PATH, run_hydra_command, user_errors_as_one_line
from esq_lightning.commands.report import report
from esq_lightning.config.commands import ReportOptions, validate_options
from esq_lightning.errors import ESQUserError

COMMAND = "esq-report"


def report_options(cfg: DictConfig) -> ReportOptions:
    """The checked options of a composed conf/report.yaml (one ESQUserError line for a bad or missing one)."""
    if OmegaConf.is_missing(cfg, "runs"):
        raise ESQUserError(
            "runs: required: the run or multirun folder(s) to report, e.g. runs=outputs/digits-table or runs=[a,b]"
        )
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    return validate_options(COMMAND, values)


@hydra.main(config_path=CONFIG_PATH, config_name="report", version_base="1.3")
@user_errors_as_one_line
def _report(cfg: DictConfig) -> None:
    report(report_options(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    run_hydra_command(COMMAND, _report, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
