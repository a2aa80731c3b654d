"""esq-train: Hydra main over conf/train.yaml."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import esq_lightning.config.resolvers  # noqa: F401  (registers resolvers)
from esq_lightning.cli._common import CONFIG_PATH, composition_in_one_line, user_errors_as_one_line
from esq_lightning.config.schema import validate_train_config
from esq_lightning.errors import ESQUserError, EvaluationFailed


@composition_in_one_line("train")
@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> float | None:
    # Before importing the training stack: a typo fails in about a second (structure, types, ranges), a
    # wrong name or path once torch is imported (train() runs both phases, before any data is read).
    validate_train_config(cfg)
    # Imported here, not at the top: it loads torch and Lightning, which the check above must not wait for.
    from esq_lightning.commands.train import raise_if_unattackable, train

    results, _ = train(cfg)
    try:
        raise_if_unattackable(results)  # verdict fail: results.json is written; one line, exit code 3
    except EvaluationFailed as exc:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        print(exc, flush=True)  # in a sweep, one result of the sweep: said once, the sweep goes on
    # The value an Optuna sweep optimizes, named by optimized_metric.
    return metric_value(results, str(cfg.optimized_metric)) if cfg.get("optimized_metric") else None


def metric_value(results: dict, name: str) -> float:
    """results[a][b] for name `a.b`; one line naming the key and what exists when it is not there."""
    node = results
    for i, part in enumerate(name.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(name.split(".")[:i]) or "results.json"
            have = (
                sorted(k for k, v in node.items() if isinstance(v, (int, float, dict)))
                if isinstance(node, dict)
                else []
            )
            raise ESQUserError(
                f"optimized_metric: {name!r} is not in this run's results ({where} has "
                f"{', '.join(have) or 'no keys'}); allowed: a dotted key such as robust_acc.pgd20"
            )
        node = node[part]
    if not isinstance(node, (int, float)):
        raise ESQUserError(f"optimized_metric: {name!r} is not a number in results.json")
    return float(node)


if __name__ == "__main__":
    main()
