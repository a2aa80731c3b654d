"""Phase 2 of the config checks: what needs the code a config names, or the disk (docs/reliability.md).

Phase 1 (config/schema.py: structure, types, ranges, cross-key rules) imports nothing but omegaconf and
pydantic, so a typo fails in about a second. The checks here import torch, Lightning and the package's own
code: keys of a `_target_` node against the target's signature, `trainer.*` against pytorch_lightning.Trainer
(its signature, strategy and accelerator registries and precision type), the model (built on the meta device
by artifacts/loading.py) and its pairing layer names, attack names and parameters against
esq_lightning.attacks, the derived setting label, paths on disk. `validate_config` / `validate_eval_config`
run both phases; the first problem raises ESQUserError with one line.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.accelerators import AcceleratorRegistry
from pytorch_lightning.strategies import StrategyRegistry
from pytorch_lightning.trainer.connectors.accelerator_connector import _PRECISION_INPUT

from esq_lightning.artifacts.checkpoint import resolve_resume_path
from esq_lightning.artifacts.loading import build_network
from esq_lightning.artifacts.setting import derived_setting
from esq_lightning.attacks import check_attack_names, check_attack_params
from esq_lightning.config.messages import first_line, show
from esq_lightning.config.messages import validate as validate_group
from esq_lightning.config.schema import (
    CIFARDataConfig,
    DataRoot,
    EvalConfig,
    EvalRunConfig,
    TrainConfig,
    check_cifar_dir,
    check_targets,
    config_targets,
    validate_train_config,
)
from esq_lightning.errors import ESQUserError, did_you_mean
from esq_lightning.pairing import check_pairing_names


def validate_config(cfg: DictConfig, code_checks: bool = True) -> None:
    """Check a composed esq-train config; the first problem raises ESQUserError (one line).

    `code_checks=False` runs phase 1 only (config/schema.py: no torch import, nothing read from disk).
    """
    run, data = validate_train_config(cfg)
    if not code_checks:
        return
    # Cheapest first, so that most mistakes fail before Lightning is imported (seconds on a small CPU):
    # paths and attack names, then the model (its arguments, built on the meta device, the pairing
    # names), then the other targets and the Trainer's arguments, which import Lightning.
    if isinstance(run.data, CIFARDataConfig):
        check_cifar_dir(run.data)
    _check_eval_attacks(run.eval, data["eval"])
    _check_setting(cfg)
    _check_paths(run)
    targets = config_targets(run, "")
    models = [t for t in targets if t[0] == "model"]
    check_targets(models, data)
    _check_model_and_pairing(cfg)
    check_targets([t for t in targets if t not in models], data)
    _check_trainer(data["trainer"])


def validate_eval_config(cfg: DictConfig, run_cfg: DictConfig | None = None) -> None:
    """Check an esq-eval config; with `run_cfg` (the checkpoint's config merged with this one), also
    the `eval` and `data` groups as they will be used."""
    run, data = validate_group(EvalRunConfig, cfg)
    targets = config_targets(run, "")
    if run_cfg is not None:
        ev, ev_raw = validate_group(EvalConfig, run_cfg.eval, "eval")
        dm, dm_raw = validate_group(DataRoot, OmegaConf.create({"data": run_cfg.data}))
        assert isinstance(ev, EvalConfig) and isinstance(dm, DataRoot)
        if isinstance(dm.data, CIFARDataConfig):
            check_cifar_dir(dm.data)
        _check_eval_attacks(ev, ev_raw)
        targets += config_targets(dm, "")
        data = {**data, "data": dm_raw["data"]}
    check_targets(targets, data)
    _check_trainer(data.get("trainer"))


# ---- the checks --------------------------------------------------------------------------------------
def _check_trainer(trainer: dict | None, key: str = "trainer") -> None:
    """trainer.*: arguments of the installed pytorch_lightning.Trainer, with values it accepts."""
    if trainer is None:
        return
    params = inspect.signature(pl.Trainer.__init__).parameters
    accepted = [n for n in params if n != "self"]
    for k in trainer:
        if k not in accepted:
            raise ESQUserError(
                f"{key}.{k}: unknown key{did_you_mean(k, accepted)}; allowed keys of {key}: the "
                f"arguments of pytorch_lightning.Trainer {pl.__version__}: {', '.join(accepted)}"
            )
    # The names Lightning's accelerator connector accepts (pytorch_lightning/trainer/connectors/
    # accelerator_connector.py): its registries plus "auto" (and "gpu" for accelerators).
    choices = {
        "accelerator": ["auto", "gpu", *AcceleratorRegistry.available_accelerators()],
        "strategy": ["auto", *StrategyRegistry.available_strategies()],
        "precision": [None, *_literal_values(_PRECISION_INPUT)],
    }
    for k, allowed in choices.items():
        if k not in trainer:
            continue
        value = trainer[k]
        v = value.lower() if isinstance(value, str) and k != "precision" else value
        if not any(v == c and type(v) is type(c) for c in allowed):
            names = [c for c in allowed if isinstance(c, str)]
            raise ESQUserError(
                f"{key}.{k}: {show(value)} is not allowed; allowed: "
                f"{', '.join(show(c) for c in dict.fromkeys(allowed))} (pytorch_lightning "
                f"{pl.__version__}){did_you_mean(str(value), names)}"
            )
    num_nodes = trainer.get("num_nodes", params["num_nodes"].default)
    strategy = trainer.get("strategy", params["strategy"].default)
    if num_nodes > 1 and not str(strategy).startswith(("ddp", "fsdp", "deepspeed")):
        raise ESQUserError(
            f"{key}.strategy: {strategy!r} cannot span {num_nodes} nodes; allowed: ddp (or another "
            "distributed strategy) with num_nodes > 1"
        )


def _literal_values(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return [v for a in typing.get_args(tp) for v in _literal_values(a)]


def _check_eval_attacks(ev: EvalConfig, raw: dict, key: str = "eval") -> None:
    check_attack_names([ev.transfer.attack], f"{key}.transfer.attack")
    check_attack_names(ev.blackbox.attacks, f"{key}.blackbox.attacks")
    check_attack_params(_node(raw.get("blackbox", {}).get("params")), f"{key}.blackbox.params", budgeted=False)
    check_attack_names(ev.attacks, f"{key}.attacks")
    check_attack_params(_node(raw.get("params")), f"{key}.params")


def _node(value: Any) -> Any:
    """A plain mapping as the DictConfig the attack checks read."""
    return OmegaConf.create(value) if isinstance(value, dict) else value


def _check_setting(cfg: DictConfig) -> None:
    """`setting` is derived from the run (esq_lightning/config/labels.py); a hand-set value must agree with it."""
    derived = derived_setting(cfg)
    given = cfg.get("setting")
    if given != derived:
        raise ESQUserError(
            f"setting: {given!r} contradicts the run, which is {derived!r} (method, quant and the "
            "init_from run decide it); allowed: leave setting unset"
        )


def _check_paths(run: TrainConfig) -> None:
    init_from = run.init_from
    if init_from is not None and not str(init_from).startswith("setting:") and not Path(init_from).is_file():
        raise ESQUserError(
            f"init_from: {init_from!r} is not a file; allowed: a checkpoint file, or setting:NAME "
            "(the newest finished run of that setting)"
        )
    if run.ckpt_path is not None:
        resolve_resume_path(str(run.ckpt_path), _run_dir())


def _run_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def _check_model_and_pairing(cfg: DictConfig) -> None:
    try:
        # The meta device builds the module tree without allocating or initializing any weight; the
        # architecture of the one builder (artifacts/loading.py), whose module names the pairing layers name.
        with torch.device("meta"):
            model = build_network(cfg.model)
    except ESQUserError:
        raise
    except Exception as exc:
        # Hydra wraps the constructor's exception; its own message is the useful one.
        cause = exc.__cause__ or exc
        raise ESQUserError(
            f"model: {cfg.model.name} cannot be built from its config: {type(cause).__name__}: {first_line(cause)}"
        ) from None
    try:
        check_pairing_names(model, [str(n) for n in cfg.pairing.layers])
    except ValueError as exc:
        raise ESQUserError(first_line(exc)) from None
    from esq_lightning.compress.mixed import resolve_layer_bits

    try:
        resolve_layer_bits(model, cfg.quant)
    except ValueError as exc:
        raise ESQUserError(first_line(exc)) from None
