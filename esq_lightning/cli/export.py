"""esq-export: write the packed (b-bit, b <= 8) file of a trained checkpoint and check that it reloads to identical logits."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

import esq_lightning.config.resolvers  # noqa: F401  (registers resolvers)
from esq_lightning.cli._common import CONFIG_PATH, user_errors_as_one_line


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top: `esq-export --help` and Hydra's own errors need no torch.
    from esq_lightning.artifacts.checkpoint import with_checkpoint_trust
    from esq_lightning.artifacts.export import export_checkpoint

    # trust_checkpoint=true: the checkpoint is unpickled in full (checkpoint.py); by default weights_only.
    report = with_checkpoint_trust(lambda c: export_checkpoint(c.ckpt_path, c.out, verify=bool(c.verify)))(cfg)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
