"""evaluate(cfg): rebuild a trained model from its checkpoint and measure it, writing results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from esq_lightning.checkpoint import checkpoint_config, load_model_weights, read_checkpoint
from esq_lightning.data import build_datamodule
from esq_lightning.evaluation import evaluate_robustness
from esq_lightning.results import build_results, print_results
from esq_lightning.utils import atomic_write_json, set_threads


def run_config_with_eval(train_config: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The training run's config with this evaluation's `eval` and `data` overrides on top."""
    overrides = OmegaConf.create({"eval": cfg.eval, "data": cfg.get("data") or {}, "task_name": "eval"})
    return OmegaConf.merge(OmegaConf.create(train_config), overrides)


def load_trained_model(ckpt_path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier of a checkpoint written by esq-train (quantized layers and all), and its run config."""
    from esq_lightning.train import build_network

    ckpt = read_checkpoint(ckpt_path)
    train_config = checkpoint_config(ckpt, ckpt_path)
    model = build_network(train_config["model"], train_config["quant"])
    load_model_weights(model, ckpt_path)
    model.eval()
    return model, train_config


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    set_threads(cfg.get("threads"))
    model, train_config = load_trained_model(cfg.ckpt_path)
    run_cfg = run_config_with_eval(train_config, cfg)
    datamodule = build_datamodule(run_cfg.data, seed=int(train_config["seed"]))
    datamodule.setup("test")
    x, y = datamodule.test_tensors()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ev = evaluate_robustness(
        model, x, y, attacks=list(run_cfg.eval.attacks), eps=float(run_cfg.eval.eps),
        params=OmegaConf.to_container(run_cfg.eval.get("params") or {}, resolve=True),
        n_samples=run_cfg.eval.n_samples, batch_size=int(run_cfg.eval.batch_size), device=device,
        seed=int(cfg.seed),
    )
    results = build_results(run_cfg, ev, checkpoint=str(cfg.ckpt_path), run_dir=str(out))
    atomic_write_json(out / "results.json", results)
    print_results(results)
    return results
