"""W&B helpers for esq-train: automatic tags, the results table, and keeping WANDB_* settings from leaking between jobs."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

# W&B limits a tag to 64 characters.
MAX_TAG = 64


def wandb_tags(cfg: DictConfig, extra: Any = None) -> list[str]:
    """The config's `tags` (and the logger's own) plus setting, quant, method, data and model, without repeats.

    Automatic tags are `key:value`, so a W&B filter like `quant:bwn` finds every BWN run of a sweep.
    """
    tags: list[str] = []
    for source in (cfg.get("tags") or [], extra or []):
        tags += [str(t) for t in source]
    auto = {
        "setting": cfg.get("setting"),
        "quant": (cfg.get("quant") or {}).get("kind"),
        "method": (cfg.get("method") or {}).get("name"),
        "data": (cfg.get("data") or {}).get("name"),
        "model": (cfg.get("model") or {}).get("name"),
    }
    tags += [f"{k}:{v}" for k, v in auto.items() if v is not None]
    seen: list[str] = []
    for tag in tags:
        tag = tag[:MAX_TAG]
        if tag and tag not in seen:
            seen.append(tag)
    return seen


def wandb_logger_config(cfg: DictConfig, conf: DictConfig) -> DictConfig:
    """The logger.wandb config with the automatic tags added (a copy; the run config is left as it is)."""
    conf = OmegaConf.create(OmegaConf.to_container(conf, resolve=True))
    conf.tags = wandb_tags(cfg, conf.get("tags"))
    return conf


def snapshot_wandb_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}


def restore_wandb_env(snapshot: Mapping[str, str]) -> None:
    """Put the WANDB_* variables back as they were.

    Lightning's WandbLogger(offline=True) sets WANDB_MODE=dryrun in os.environ and never unsets it; a
    joblib worker runs several jobs in one process, so without this an online job after an offline one
    would silently log offline (and wandb.init reads other WANDB_* variables the same way).
    """
    for key in [k for k in os.environ if k.startswith("WANDB_") and k not in snapshot]:
        del os.environ[key]
    os.environ.update(snapshot)


@contextmanager
def isolated_wandb_env() -> Iterator[None]:
    snapshot = snapshot_wandb_env()
    try:
        yield
    finally:
        restore_wandb_env(snapshot)


def results_row(results: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    """Columns and values of a results record as one table row (accuracies as fractions)."""
    tm = results.get("threat_model") or {}
    columns = [
        "experiment",
        "setting",
        "dataset",
        "model",
        "method",
        "quant",
        "bits",
        "seed",
        "norm",
        "eps",
        "n_samples",
        "clean_acc",
        *(f"{k}_acc" for k in results.get("robust_acc") or {}),
    ]
    values = [
        results.get("experiment"),
        results.get("setting"),
        results.get("dataset"),
        results.get("model"),
        results.get("method"),
        results.get("quant"),
        results.get("bits"),
        results.get("seed"),
        tm.get("norm"),
        tm.get("eps"),
        results.get("n_samples"),
        results.get("clean_acc"),
        *(float(v) for v in (results.get("robust_acc") or {}).values()),
    ]
    # robust_acc starts with worst_case (results/worst_case_acc in the summary); the verdict of the checks follows.
    audit = results.get("audit") or {}
    if audit.get("verdict"):
        columns += ["verdict", "flags"]
        values += [audit["verdict"], ", ".join(sorted({f["name"] for f in audit.get("flags") or []}))]
    return columns, values


def log_results_table(loggers: list[Any], results: Mapping[str, Any]) -> None:
    """Log the results record as a one-row wandb.Table (`results/table`) and into the run summary, per WandbLogger."""
    from pytorch_lightning.loggers import WandbLogger

    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return
    import wandb

    columns, values = results_row(results)
    for logger in wandb_loggers:
        run = logger.experiment
        run.log({"results/table": wandb.Table(columns=columns, data=[values])})
        # The summary is what W&B's runs table shows: one column per metric across the sweep's runs.
        run.summary.update({f"results/{c}": v for c, v in zip(columns, values) if isinstance(v, (int, float))})
