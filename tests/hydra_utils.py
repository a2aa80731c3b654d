"""Compose the real Hydra configs in-process, as esq-train would, with the run directory in tmp_path."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import esq_lightning.config.resolvers  # noqa: F401  (resolvers)

# Tiny, fast settings for digits: a few batches, one thread, no progress bar.
FAST = [
    "threads=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


# One short digits run (1 epoch, 2 batches) for tests that run esq-train as a command (sweeps, notebooks, bits).
TINY_RUN = [
    "threads=1",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "eval.n_samples=32",
    "callbacks.pgd.steps=1",
    "callbacks.pgd.val_n_samples=32",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


def compose_config(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_module("esq_lightning.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg
