"""esq-eval: Hydra main over conf/eval.yaml; mode=whitebox (ckpt_path=) or transfer|amplification|blackbox (ckpts=)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import esq_lightning.config.resolvers  # noqa: F401  (registers resolvers)
from esq_lightning.cli._common import CONFIG_PATH, composition_in_one_line, user_errors_as_one_line


@composition_in_one_line("eval")
@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> float | None:
    # Imported here, not at the top: `esq-eval --help` and Hydra's own errors need no torch.
    from esq_lightning.commands.evaluate import evaluate

    results = evaluate(cfg)
    if results.get("mode", "whitebox") != "whitebox":
        return None
    # A sweeper optimises the last attack's robust accuracy (clean accuracy without attacks).
    robust = results.get("robust_acc") or {}
    return list(robust.values())[-1] if robust else results.get("clean_acc")


if __name__ == "__main__":
    main()
