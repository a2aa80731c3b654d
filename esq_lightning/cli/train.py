"""esq-train: Hydra main over conf/train.yaml."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import esq_lightning.config  # noqa: F401  (registers resolvers)
from esq_lightning.cli._common import CONFIG_PATH, user_errors_as_one_line


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> float | None:
    from esq_lightning.schema import validate_config

    # Before importing the training stack: a typo fails in about a second (structure, types, ranges),
    # a wrong name or path once torch is imported, both before any data is read. train() validates
    # again for callers that use it directly; that second pass is cheap.
    validate_config(cfg)
    from esq_lightning.train import train

    results, _ = train(cfg)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from esq_lightning.train import raise_if_unattackable

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        raise_if_unattackable(results)  # verdict fail: results.json is written; one line, exit code 3
    # The value an Optuna sweep optimizes: the last attack's robust accuracy (pgd20 by default).
    robust = results.get("robust_acc") or {}
    return list(robust.values())[-1] if robust else results.get("clean_acc")


if __name__ == "__main__":
    main()
