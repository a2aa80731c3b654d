"""The setting label of a composed esq-train config: the pure rule of config/labels.py plus the start letter of
the run's init_from, read from the start's results.json, Hydra config or checkpoint. `${esq_setting:}` resolves
through here (register_setting_resolver; esq_lightning/__init__.py registers it)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from esq_lightning.artifacts.runs import RESULTS, read_json_record
from esq_lightning.config.labels import UNKNOWN_START, setting_of_config, start_from_setting


@functools.lru_cache(maxsize=64)
def _start_of_checkpoint(path: str, mtime: float) -> str:
    """The start letter of a checkpoint file: from its run's results.json or Hydra config when beside it
    (no torch import, so config validation stays fast), else from the esq_config inside the checkpoint."""
    ckpt = Path(path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    results = run_dir / RESULTS
    label = (read_json_record(results) or {}).get("setting") if results.is_file() else None
    if label:
        return start_from_setting(str(label))
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        try:
            cfg = OmegaConf.load(hydra_config)
            return start_from_setting(setting_of_config(cfg, None))
        except Exception:
            pass
    # torch loads only here, when a checkpoint must be opened: composing a config stays torch-free.
    from esq_lightning.artifacts.checkpoint import read_checkpoint

    config = read_checkpoint(ckpt).get("esq_config")
    if not isinstance(config, dict) or "method" not in config or "quant" not in config:
        return UNKNOWN_START
    return start_from_setting(str(config.get("setting") or setting_of_config(config, None)))


def start_of(init_from: str | None) -> str | None:
    """The start part of the label for `init_from`: None from scratch, `setting:NF` -> N, a file -> its run's."""
    if init_from is None:
        return None
    spec = str(init_from)
    if spec.startswith("setting:"):
        return start_from_setting(spec.split(":", 1)[1].strip())
    path = Path(spec)
    if not path.is_file():
        return UNKNOWN_START  # validation names the missing file
    return _start_of_checkpoint(str(path.resolve()), path.stat().st_mtime)


def derived_setting(cfg: Any) -> str:
    """The setting label of a composed esq-train config."""
    return setting_of_config(cfg, start_of(cfg.get("init_from")))


def register_setting_resolver() -> None:
    """${esq_setting:} -> the setting label derived from method, quant and init_from (conf/train.yaml)."""
    if not OmegaConf.has_resolver("esq_setting"):
        OmegaConf.register_new_resolver("esq_setting", _setting)


def _setting(*, _root_: Any) -> str:
    try:
        return derived_setting(_root_)
    except (TypeError, ValueError):
        # A key the label derives from has a value of the wrong type (quant.bits=nine): the schema's check of
        # that key names it; the label itself is then unknown.
        return "unknown"
