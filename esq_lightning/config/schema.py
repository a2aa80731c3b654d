"""Config schemas: dataclasses with type and range metadata, checked right after Hydra composition."""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from esq_lightning.errors import ESQUserError

# How it works (docs/reliability.md): every config group has a dataclass below whose fields are the
# allowed keys, whose annotations are the allowed types and whose `spec(...)` metadata holds the
# allowed values. `validate_config` walks the composed config against them in two phases:
#   1. structure, types and ranges, with nothing but omegaconf imported, so a typo fails in about a
#      second, before torch is even imported and before any data is read;
#   2. checks that need the code: keys of a `_target_` that are not in the schema are checked against
#      the target's signature, pairing names against the model (built on the meta device), attack
#      names and parameters against esq_lightning.attacks.ATTACKS, paths on disk.
# The first problem found raises ESQUserError with one line: `<key>: <value> <problem>; allowed: ...`.
# Dataclasses are used as plain schema declarations rather than registered in Hydra's ConfigStore:
# the configs interpolate across groups (${data.num_classes}, ${eval_frac:8/255}), and the range and
# cross-key rules (quant.bits vs quant.kind, one lambda per pairing layer) are beyond OmegaConf's
# structured-config typing anyway. A new config key must be declared here as well.

REQUIRED: Any = MISSING

# Copies of the code's own choices, so phase 1 needs no torch import; tests/test_bad_configs.py
# checks that they match the tuples in the code.
# quant.kind -> its bit widths, and the family quant.bits picks alone (esq_lightning.quant.registry).
QUANT_BITS: dict[str, tuple[int, ...]] = {"bwn": (1,), "twn": (2,), "uniform": (2, 3, 4, 5, 6, 7, 8), "full": (32,)}
QUANT_DEFAULT_KIND: dict[int, str] = {1: "bwn", 2: "twn", **{b: "uniform" for b in range(3, 9)}, 32: "full"}
# quant.act_bits: unsigned activation codes after the ReLUs (32 = off).
ACT_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 32)
SQ_VARIANTS = ("paper", "reference")
SQ_FUNCTIONS = ("constant", "linear", "softmax", "sigmoid")
METHODS = ("natural", "adversarial", "esq", "alp", "trades")
DATASETS = ("digits", "cifar10", "cifar100")
# esq_lightning.pairing.DISTANCES: every name, and those defined on the logits only.
PAIRING_DISTANCES = ("relative_l2", "relative_l1", "centred_l2", "log_softmax_l2", "kl")
PAIRING_LOGITS_ONLY = ("centred_l2", "log_softmax_l2", "kl")
# (archive, extracted folder) of the CIFAR variants, as in esq_lightning.data.cifar.CIFAR_META (whose
# import would pull in Lightning).
CIFAR_FILES = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
               "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python")}
NORMS = ("linf", "l2")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "xla", "hpu")
STRATEGIES = (
    "auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_false",
    "ddp_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_false",
    "ddp_spawn_find_unused_parameters_true", "ddp_fork_find_unused_parameters_false",
    "ddp_fork_find_unused_parameters_true", "ddp_notebook_find_unused_parameters_false",
    "ddp_notebook_find_unused_parameters_true", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
    "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme", "fsdp", "fsdp_cpu_offload", "single_device", "single_xla", "xla_debug",
    "xla", "single_tpu",
)
PRECISIONS = (64, 32, 16, "64", "32", "16", "bf16", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true",
              "64-true", "transformer-engine", "transformer-engine-float16")
# pl.Trainer arguments that esq-train sets itself; a config value would be ignored or break the run.
TRAINER_RESERVED = {
    "logger": "use the logger group (logger=csv|tensorboard|wandb|none)",
    "callbacks": "use the callbacks group (callbacks.<name>=...)",
    "default_root_dir": "the run directory is hydra.run.dir",
    "inference_mode": "validation runs attacks and needs autograd",
    "use_distributed_sampler": "the data loaders shard themselves by rank",
    "plugins": "esq-train installs its atomic checkpoint writer",
}


# ---- schema declarations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """Allowed values of one key (ranges apply to every item of a list)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is allowed when the value is not
    note: str = ""


def spec(default: Any = None, **rule: Any) -> Any:
    """A schema field: its default (REQUIRED: the key must be present) and its Rule."""
    return field(default=default, metadata={"rule": Rule(**rule)})


class Schema:
    """Base of the group schemas.

    `extra`: "forbid" (unknown keys fail) or "target" (keys not declared here must be arguments of
    the node's `_target_`, checked in phase 2). `cross` holds rules between keys of the node.
    """

    extra: typing.ClassVar[str] = "forbid"

    @classmethod
    def select(cls, node: DictConfig, key: str) -> type[Schema]:
        return cls

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        return None


class Entries:
    """A mapping of named entries (callbacks, loggers): known names have a schema, others need a `_target_`."""

    known: typing.ClassVar[dict[str, type[Schema]]] = {}
    what: typing.ClassVar[str] = "entry"


def _limit_batches(v: Any) -> str | None:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    if isinstance(v, float) and 0.0 <= v <= 1.0:
        return None
    return "null, a number of batches >= 0, or a fraction in [0, 1]"


def _train_batches(v: Any) -> str | None:
    return "null, a number of batches >= 1, or a fraction in (0, 1]" if v in (0, 0.0) else _limit_batches(v)


def _devices(v: Any) -> str | None:
    if isinstance(v, bool):
        return "a number of devices >= 1, -1 (all), 'auto', or a list of device ids"
    if isinstance(v, int) and (v >= 1 or v == -1):
        return None
    if isinstance(v, str) and v.strip():
        return None
    if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        return None
    return "a number of devices >= 1, -1 (all), 'auto', or a list of device ids"


def _threads(v: Any) -> str | None:
    if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return None
    return "a number of threads >= 1, auto, or null (torch's default)"


def _metric_name(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v or v.startswith(".") or v.endswith("."):
        return "a key of results.json, dotted for nested keys (e.g. robust_acc.pgd20 or clean_acc)"
    return None


def _setting_or_path(v: Any) -> str | None:
    if isinstance(v, str) and v.startswith("setting:") and not v.split(":", 1)[1].strip():
        return "a checkpoint file or setting:NAME with a setting name (e.g. setting:NF)"
    return None


@dataclass(kw_only=True)
class AttackStrengthConfig(Schema):
    """data.attack: the dataset's default L_inf attack strength (training PGD, FGSM)."""

    eps: float = spec(REQUIRED, gt=0, le=1, note="an L_inf radius within the input range [0, 1]")
    step_size: float = spec(REQUIRED, gt=0, le=1)
    steps: int = spec(REQUIRED, ge=0)
    fgsm_eps: float = spec(REQUIRED, gt=0, le=1, note="an L_inf radius within the input range [0, 1]")


@dataclass(kw_only=True)
class DataConfig(Schema):
    # Keys not declared here must be arguments of the datamodule (a parameter added there is allowed
    # at once); the declared ones get their ranges.
    extra: typing.ClassVar[str] = "target"
    _target_: str = spec(None)
    name: str = spec(REQUIRED)
    batch_size: int = spec(REQUIRED, ge=1)
    eval_batch_size: Optional[int] = spec(None, ge=1)
    val_size: int = spec(0, ge=0)
    split_seed: int = spec(0, ge=0)
    augment: bool = spec(False)
    device_resident: bool = spec(False)
    num_workers: int = spec(0, ge=0)
    num_classes: int = spec(REQUIRED, ge=2)
    in_channels: int = spec(REQUIRED, ge=1)
    image_size: int = spec(REQUIRED, ge=1)
    mean: list[float] = spec(REQUIRED, ge=0, le=1)
    std: list[float] = spec(REQUIRED, gt=0)
    attack: AttackStrengthConfig = spec(REQUIRED)

    @classmethod
    def select(cls, node: DictConfig, key: str) -> type[Schema]:
        name = _get(node, "name", key)
        if name == "digits":
            return DigitsDataConfig
        if name in ("cifar10", "cifar100"):
            return CIFARDataConfig
        if "_target_" in node:
            return CustomDataConfig  # a datamodule of the user's own: its arguments come from its _target_
        raise ESQUserError(f"{key}.name: {name!r} is not a known dataset; allowed: {', '.join(DATASETS)} "
                           "(or a data config with its own _target_)")

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        for sub in ("mean", "std"):
            n = len(_get(node, sub, key))
            if n != _get(node, "in_channels", key):
                raise ESQUserError(f"{key}.{sub}: {n} values for in_channels={_get(node, 'in_channels', key)}; "
                                   "allowed: one value per input channel")


@dataclass(kw_only=True)
class DigitsDataConfig(DataConfig):
    test_size: int = spec(300, ge=1)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        super().cross(node, key, ctx)
        val, test = _get(node, "val_size", key), _get(node, "test_size", key)
        if val + test >= 1797:
            raise ESQUserError(f"{key}.val_size: {val} with test_size={test} leaves no training data; "
                               "allowed: val_size + test_size < 1797 (the digits set)")


@dataclass(kw_only=True)
class CIFARDataConfig(DataConfig):
    data_dir: str = spec("data")
    download: bool = spec(False)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        super().cross(node, key, ctx)
        ctx.later.append(lambda: _check_cifar_dir(node, key))


@dataclass(kw_only=True)
class CustomDataConfig(DataConfig):
    _target_: str = spec(REQUIRED)


@dataclass(kw_only=True)
class ModelConfig(Schema):
    extra: typing.ClassVar[str] = "target"
    name: str = spec(REQUIRED)
    _target_: str = spec(REQUIRED)
    num_classes: int = spec(REQUIRED, ge=2)
    in_channels: int = spec(REQUIRED, ge=1)
    mean: list[float] = spec(None, ge=0, le=1)
    std: list[float] = spec(None, gt=0)

    # Architecture arguments (not every model takes each; the signature check says which it takes).
    ARCH_RULES: typing.ClassVar[dict[str, tuple[Any, Rule]]] = {
        "width": (int, Rule(ge=1)),
        "depth": (int, Rule(ge=1)),
        "widen_factor": (int, Rule(ge=1)),
        "dropout": (float, Rule(ge=0, lt=1)),
        "num_blocks": (list[int], Rule(ge=1)),
    }

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        for sub, (tp, rule) in cls.ARCH_RULES.items():
            if sub in node:
                value = _get(node, sub, key)
                _check_value(_items(value, f"{key}.{sub}") if isinstance(value, ListConfig) else value, tp, rule,
                             f"{key}.{sub}")


@dataclass(kw_only=True)
class QuantConfig(Schema):
    # conf/quant/default.yaml: kind is ${quant_kind:${.bits}}, so `quant.bits` alone picks the family.
    kind: str = spec(REQUIRED, choices=tuple(QUANT_BITS))
    bits: int = spec(REQUIRED, choices=tuple(QUANT_DEFAULT_KIND))
    per_filter: bool = spec(True)
    keep_first_last: bool = spec(False)
    variant: str = spec("paper", choices=SQ_VARIANTS)
    f: str = spec("linear", choices=SQ_FUNCTIONS)
    act_bits: int = spec(32, choices=ACT_BITS, note="unsigned activation bits after the ReLUs, 32 = off")

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        kind, bits = _get(node, "kind", key), _get(node, "bits", key)
        if bits not in QUANT_BITS[kind]:
            widths = ", ".join(map(str, QUANT_BITS[kind]))
            raise ESQUserError(f"{key}.bits: {bits} does not match {key}.kind={kind}; allowed: {widths} "
                               f"({'; '.join(f'{k}=' + ','.join(map(str, b)) for k, b in QUANT_BITS.items())}; "
                               f"quant=default lets quant.bits pick the kind)")


@dataclass(kw_only=True)
class MethodConfig(Schema):
    name: str = spec(REQUIRED, choices=METHODS)
    alp_lambda: float = spec(0.5, ge=0)
    trades_beta: float = spec(6.0, ge=0)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        name = _get(node, "name", key)
        for sub, owner in (("alp_lambda", "alp"), ("trades_beta", "trades")):
            if sub in node and name != owner:
                raise ESQUserError(f"{key}.{sub}: only used by method={owner}, this run has method={name}; "
                                   f"allowed keys for method={name}: name")


@dataclass(kw_only=True)
class PairingConfig(Schema):
    name: str = spec("custom")
    layers: list[str] = spec(REQUIRED)
    lambdas: list[float] = spec(REQUIRED, ge=0, note="non-negative weights, one per layer")
    distance: Optional[str] = spec(None, choices=(*PAIRING_DISTANCES, None),
                                   note="a pairing distance (null: relative_l{p}, the paper's for p=2)")
    p: Optional[int] = spec(None, choices=(1, 2, None), note="1, 2 or null (older spelling of the distance)")
    warmup_epochs: int = spec(0, ge=0, note="0: the full lambda from the first step")

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        distance, p = node.get("distance"), node.get("p")
        if distance is not None and p is not None and distance != f"relative_l{p}":
            raise ESQUserError(f"{key}.p: {p} contradicts {key}.distance={distance}; allowed: set {key}.distance "
                               f"only ({key}.p is the older spelling of relative_l1 / relative_l2)")
        if distance in PAIRING_LOGITS_ONLY:
            inner = [str(n) for n in _get(node, "layers", key) if str(n) != "logits"]
            if inner:
                raise ESQUserError(f"{key}.distance: {distance} is defined on the logits only but {key}.layers "
                                   f"pairs {inner}; allowed there: relative_l2, relative_l1 (or layers: [logits])")
        layers, lambdas = list(_get(node, "layers", key)), list(_get(node, "lambdas", key))
        if len(layers) != len(lambdas):
            raise ESQUserError(f"{key}.lambdas: {lambdas} has {len(lambdas)} values for {len(layers)} layers "
                               f"{layers}; allowed: one lambda per layer")
        if len(set(layers)) != len(layers):
            raise ESQUserError(f"{key}.layers: {layers} names a module twice; allowed: distinct module names")


@dataclass(kw_only=True)
class OptimizerConfig(Schema):
    extra: typing.ClassVar[str] = "target"
    _target_: str = spec(REQUIRED)
    _partial_: bool = spec(REQUIRED, choices=(True,), note="true (the module passes the parameters)")
    lr: float = spec(REQUIRED, gt=0)
    momentum: float = spec(None, ge=0, lt=1)
    weight_decay: float = spec(None, ge=0)


@dataclass(kw_only=True)
class SchedulerConfig(Schema):
    extra: typing.ClassVar[str] = "target"
    _target_: str = spec(REQUIRED)
    _partial_: bool = spec(REQUIRED, choices=(True,), note="true (the module passes the optimizer)")
    T_max: int = spec(None, ge=1)
    milestones: list[int] = spec(None, ge=0)
    gamma: float = spec(None, gt=0)
    eta_min: float = spec(None, ge=0)


@dataclass(kw_only=True)
class QuantRatioCallbackConfig(Schema):
    extra: typing.ClassVar[str] = "target"
    _target_: str = spec(REQUIRED)
    start: float = spec(0.2, gt=0, le=1)
    step: float = spec(0.2, gt=0)
    every_n_epochs: int = spec(25, ge=1)


@dataclass(kw_only=True)
class PGDCallbackConfig(Schema):
    extra: typing.ClassVar[str] = "target"
    _target_: str = spec(REQUIRED)
    eps: float = spec(REQUIRED, gt=0)
    step_size: float = spec(REQUIRED, gt=0)
    steps: int = spec(REQUIRED, ge=0, note="0 makes x_adv = x")
    norm: str = spec("linf", choices=NORMS)
    random_start: bool = spec(True)
    val_every_n_epochs: int = spec(1, ge=0, note="0 switches robust validation off")
    val_n_samples: Optional[int] = spec(512, ge=1)
    val_steps: Optional[int] = spec(None, ge=1)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        if _get(node, "norm", key, "linf") == "linf":
            for sub in ("eps", "step_size"):
                v = _get(node, sub, key)
                if v > 1:
                    raise ESQUserError(f"{key}.{sub}: {v} is out of range; allowed: 0 < {sub} <= 1 "
                                       "(an L_inf radius within the input range [0, 1])")


@dataclass(kw_only=True)
class FiniteLossCallbackConfig(Schema):
    extra: typing.ClassVar[str] = "target"
    _target_: str = spec(REQUIRED)
    check_grads: bool = spec(True)


class CallbacksConfig(Entries):
    names = ("quant_ratio", "pgd", "checkpoint", "lr_monitor", "finite_loss")
    known = {"quant_ratio": QuantRatioCallbackConfig, "pgd": PGDCallbackConfig,
             "finite_loss": FiniteLossCallbackConfig}
    what = "callback"


class LoggersConfig(Entries):
    known: typing.ClassVar[dict[str, type[Schema]]] = {}  # every logger is checked against its _target_
    what = "logger"
    names = ("csv", "tensorboard", "wandb")


@dataclass(kw_only=True)
class TrainerConfig(Schema):
    accelerator: str = spec("auto", choices=ACCELERATORS)
    strategy: str = spec("auto", choices=STRATEGIES)
    devices: Union[int, str, list[int]] = spec("auto", check=_devices)
    num_nodes: int = spec(1, ge=1)
    precision: Union[int, str, None] = spec(None, choices=(*PRECISIONS, None))
    fast_dev_run: Union[bool, int] = spec(False, ge=0)
    max_epochs: int = spec(REQUIRED, ge=1)
    min_epochs: Optional[int] = spec(None, ge=0)
    max_steps: int = spec(-1, ge=-1)
    min_steps: Optional[int] = spec(None, ge=0)
    max_time: Union[str, dict[str, int], None] = spec(None)
    limit_train_batches: Union[int, float, None] = spec(None, check=_train_batches)
    limit_val_batches: Union[int, float, None] = spec(None, check=_limit_batches)
    limit_test_batches: Union[int, float, None] = spec(None, check=_limit_batches)
    limit_predict_batches: Union[int, float, None] = spec(None, check=_limit_batches)
    overfit_batches: Union[int, float] = spec(0, ge=0)
    val_check_interval: Union[int, float, str, None] = spec(None)
    check_val_every_n_epoch: Optional[int] = spec(1, ge=1)
    num_sanity_val_steps: Optional[int] = spec(None, ge=-1)
    log_every_n_steps: Optional[int] = spec(None, ge=1)
    enable_checkpointing: Optional[bool] = spec(None)
    enable_progress_bar: Optional[bool] = spec(None)
    enable_model_summary: Optional[bool] = spec(None)
    accumulate_grad_batches: int = spec(1, ge=1)
    gradient_clip_val: Union[int, float, None] = spec(None, ge=0)
    gradient_clip_algorithm: Optional[str] = spec(None, choices=("norm", "value", None))
    deterministic: Union[bool, str, None] = spec(None, choices=(True, False, "warn", None))
    benchmark: Optional[bool] = spec(None)
    profiler: Optional[str] = spec(None, choices=("simple", "advanced", "pytorch", "xla", None))
    detect_anomaly: bool = spec(False)
    barebones: bool = spec(False)
    sync_batchnorm: bool = spec(False)
    reload_dataloaders_every_n_epochs: int = spec(0, ge=0)
    enable_autolog_hparams: bool = spec(True)
    model_registry: Optional[str] = spec(None)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        strategy = _get(node, "strategy", key, "auto")
        if _get(node, "num_nodes", key, 1) > 1 and not str(strategy).startswith(("ddp", "fsdp", "deepspeed")):
            raise ESQUserError(f"{key}.strategy: {strategy!r} cannot span {_get(node, 'num_nodes', key)} nodes; "
                               "allowed: ddp (or another distributed strategy) with num_nodes > 1")


@dataclass(kw_only=True)
class MaskingEvalConfig(Schema):
    tolerance: float = spec(0.01, ge=0, le=1, note="a fraction of accuracy")


@dataclass(kw_only=True)
class TransferEvalConfig(Schema):
    attack: str = spec("pgd20")

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        ctx.later.append(lambda: _check_attack_names([_get(node, "attack", key)], f"{key}.attack"))


@dataclass(kw_only=True)
class AmplificationEvalConfig(Schema):
    steps: int = spec(10, ge=1)
    step_size: Optional[float] = spec(None, gt=0)


@dataclass(kw_only=True)
class BlackboxEvalConfig(Schema):
    attacks: list[str] = spec(REQUIRED)
    budgets: list[float] = spec(REQUIRED, ge=0)
    n_samples: Optional[int] = spec(None, ge=1)
    params: dict[str, Any] = spec(None)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        ctx.later.append(lambda: _check_attack_names(_items(_get(node, "attacks", key), f"{key}.attacks"),
                                                     f"{key}.attacks"))
        ctx.later.append(lambda: _check_attack_params(_get(node, "params", key, None), f"{key}.params",
                                                      budgeted=False))


@dataclass(kw_only=True)
class EvalConfig(Schema):
    attacks: list[str] = spec(REQUIRED)
    eps: float = spec(REQUIRED, gt=0)
    norm: str = spec("linf", choices=NORMS)
    n_samples: Optional[int] = spec(None, ge=1)
    batch_size: int = spec(500, ge=1)
    params: dict[str, Any] = spec(None)
    # The gradient-masking report and esq-eval's other modes (docs/evaluation.md)
    masking: Optional[MaskingEvalConfig] = spec(None)
    transfer: Optional[TransferEvalConfig] = spec(None)
    amplification: Optional[AmplificationEvalConfig] = spec(None)
    blackbox: Optional[BlackboxEvalConfig] = spec(None)
    # The threat model's FGSM budget and the audit (docs/evaluation.md, evaluation/threat.py, evaluation/audit.py)
    fgsm_factor: Optional[float] = spec(None, gt=0)
    budget: str = spec("standard", choices=("quick", "standard", "thorough"))
    checks: Optional[dict[str, Any]] = spec(None)
    audit: Optional[dict[str, Any]] = spec(None)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        eps = _get(node, "eps", key)
        if _get(node, "norm", key, "linf") == "linf" and eps > 1:
            raise ESQUserError(f"{key}.eps: {eps} is out of range; allowed: 0 < eps <= 1 "
                               "(an L_inf radius within the input range [0, 1])")
        ctx.later.append(lambda: _check_attack_names(_items(_get(node, "attacks", key), f"{key}.attacks"),
                                                     f"{key}.attacks"))
        ctx.later.append(lambda: _check_attack_params(_get(node, "params", key, None), f"{key}.params"))


@dataclass(kw_only=True)
class PathsConfig(Schema):
    runs_root: str = spec(REQUIRED)


@dataclass(kw_only=True)
class TrainConfig(Schema):
    """conf/train.yaml."""

    task_name: str = spec("train")
    setting: str = spec(REQUIRED)
    experiment_name: str = spec(REQUIRED)
    seed: int = spec(REQUIRED, ge=0)
    init_from: Optional[str] = spec(None, check=_setting_or_path)
    init_seed: Optional[int] = spec(None, ge=0)
    optimized_metric: Optional[str] = spec(None, check=_metric_name)
    ckpt_path: Optional[str] = spec(None)
    trust_checkpoint: bool = spec(False)
    threads: Union[int, str, None] = spec(None, check=_threads)
    channels_last: bool = spec(False)
    compile: bool = spec(False)
    tags: list[str] = spec(None)
    # Groups whose values others interpolate come first, so an error names the key the user set.
    trainer: TrainerConfig = spec(REQUIRED)
    data: DataConfig = spec(REQUIRED)
    model: ModelConfig = spec(REQUIRED)
    quant: QuantConfig = spec(REQUIRED)
    method: MethodConfig = spec(REQUIRED)
    pairing: PairingConfig = spec(REQUIRED)
    optimizer: OptimizerConfig = spec(REQUIRED)
    scheduler: Optional[SchedulerConfig] = spec(None)
    callbacks: Optional[CallbacksConfig] = spec(None)
    logger: Optional[LoggersConfig] = spec(None)
    eval: EvalConfig = spec(REQUIRED)
    paths: PathsConfig = spec(REQUIRED)

    @classmethod
    def cross(cls, node: DictConfig, key: str, ctx: _Context) -> None:
        method = _get(node.method, "name", "method")
        callbacks = node.get("callbacks") or {}
        if method != "natural" and callbacks.get("pgd") is None:
            raise ESQUserError(f"callbacks.pgd: null, but method={method} trains on x_adv; allowed: keep "
                               "callbacks.pgd (the training attack), or method=natural")
        if method == "esq" and not list(node.pairing.layers):
            raise ESQUserError("pairing.layers: [] pairs nothing, but method=esq needs at least one layer; "
                               "allowed: module names of the model, e.g. [logits]")
        pgd = callbacks.get("pgd")
        if method != "natural" and pgd is not None and int(pgd.get("steps", 1)) == 0 \
                and not bool(pgd.get("random_start", True)):
            what = "the pairing term is always zero" if method == "esq" else "it trains on the clean inputs"
            raise ESQUserError(f"callbacks.pgd.steps: 0 with random_start=false makes x_adv = x, so method={method} "
                               f"would train something other than it names ({what}); allowed: steps >= 1, or "
                               "random_start=true, or method=natural")
        metric = node.get("optimized_metric")
        attacks = [str(a) for a in (node.eval.get("attacks") or [])]
        if metric and str(metric).startswith("robust_acc.") and str(metric).split(".", 1)[1] not in [*attacks, "worst_case"]:
            raise ESQUserError(f"optimized_metric: {metric} names an attack that eval.attacks does not run "
                               f"({', '.join(attacks) or 'none'}); allowed: robust_acc.<one of eval.attacks>, robust_acc.worst_case, clean_acc")
        ctx.later.append(lambda: _check_setting(node))
        ctx.later.append(lambda: _check_paths(node))
        ctx.final.append(lambda: _check_model_and_pairing(node))


@dataclass(kw_only=True)
class RobustbenchConfig(Schema):
    """conf/eval.yaml `robustbench` (esq_lightning/evaluation/robustbench.py)."""

    write: bool = spec(False)
    model_name: Optional[str] = spec(None)
    name: Optional[str] = spec(None)
    authors: Optional[str] = spec(None)
    link: Optional[str] = spec(None)
    venue: Optional[str] = spec(None)
    reported: Union[float, str, None] = spec(None)
    additional_data: bool = spec(False)
    architecture: Optional[str] = spec(None)


@dataclass(kw_only=True)
class EvalRunConfig(Schema):
    """conf/eval.yaml (esq-eval)."""

    task_name: str = spec("eval")
    mode: str = spec("whitebox", choices=("whitebox", "transfer", "amplification", "blackbox", "audit"))
    ckpt_path: Optional[str] = spec(None)
    ckpts: list[str] = spec(None)
    trust_checkpoint: bool = spec(False)
    data: dict[str, Any] = spec(None)
    seed: int = spec(0, ge=0)
    threads: Union[int, str, None] = spec(None, check=_threads)
    progress: bool = spec(True)
    resume: Union[bool, str] = spec("auto", choices=(True, False, "auto"))
    trainer: Optional[TrainerConfig] = spec(None)
    tags: list[str] = spec(None)
    robustbench: Optional[RobustbenchConfig] = spec(None)
    logger: Optional[LoggersConfig] = spec(None)  # logger=wandb|tensorboard (esq_lightning/evaluation/loggers.py)
    eval: dict[str, Any] = spec(REQUIRED)  # checked as EvalConfig once merged with the checkpoint's config
    paths: PathsConfig = spec(REQUIRED)


# ---- the walker -------------------------------------------------------------------------------------
@dataclass
class _Context:
    later: list[Callable[[], None]] = field(default_factory=list)  # phase-2 checks, in order
    final: list[Callable[[], None]] = field(default_factory=list)  # after the signature checks
    targets: list[tuple[str, DictConfig, list[str]]] = field(default_factory=list)  # (key, node, declared keys)


def _join(key: str, sub: Any) -> str:
    return f"{key}.{sub}" if key else str(sub)


def _get(node: DictConfig, sub: str, key: str, default: Any = MISSING) -> Any:
    """node[sub], resolved; an interpolation that cannot resolve is a user error naming the key."""
    if sub not in node:
        if default is MISSING:
            raise ESQUserError(f"{_join(key, sub)}: missing; it must be set")
        return default
    if OmegaConf.is_missing(node, sub):
        raise ESQUserError(f"{_join(key, sub)}: ??? (no value given); set it, e.g. {_join(key, sub)}=...")
    try:
        return node[sub]
    except OmegaConfBaseException as exc:
        raise ESQUserError(f"{_join(key, sub)}: cannot resolve its value: {_first_line(exc)}") from None


def _items(lst: ListConfig, key: str) -> list[Any]:
    """The resolved items of a list node (ListConfig's `in` tests values, not indices)."""
    out = []
    for i in range(len(lst)):
        try:
            out.append(lst[i])
        except OmegaConfBaseException as exc:
            raise ESQUserError(f"{key}[{i}]: cannot resolve its value: {_first_line(exc)}") from None
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _show(value: Any) -> str:
    """A value as the user would write it in a config: 'text', true, null, [1, 2]."""
    value = _plain(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _did_you_mean(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
            Any: "anything"}.get(tp, "a mapping" if isinstance(tp, type) and issubclass(tp, (Schema, Entries))
                                 else getattr(tp, "__name__", str(tp)))


def _is_type(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_is_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, ListConfig)) and (not args or all(_is_type(v, args[0]) for v in value))
    if origin is dict or (isinstance(tp, type) and issubclass(tp, (Schema, Entries))):
        return isinstance(value, (dict, DictConfig))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _range_text(name: str, rule: Rule) -> str:
    lo = f"{_num(rule.gt)} < " if rule.gt is not None else f"{_num(rule.ge)} <= " if rule.ge is not None else ""
    hi = f" < {_num(rule.lt)}" if rule.lt is not None else f" <= {_num(rule.le)}" if rule.le is not None else ""
    return f"{lo}{name}{hi}"


def _num(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else str(v)


def _allowed(name: str, rule: Rule, tp: Any) -> str:
    if rule.choices is not None:
        text = ", ".join(_show(c) for c in rule.choices)
    elif any(b is not None for b in (rule.gt, rule.ge, rule.lt, rule.le)):
        text = _range_text(name, rule)
    else:
        text = _type_name(tp)
    return f"{text} ({rule.note})" if rule.note else text


def _check_value(value: Any, tp: Any, rule: Rule, key: str) -> None:
    name = key.rsplit(".", 1)[-1]
    if not _is_type(value, tp):
        raise ESQUserError(f"{key}: {_show(value)} is not {_type_name(tp)}; allowed: {_allowed(name, rule, tp)}")
    if rule.check is not None:
        problem = rule.check(_plain(value))
        if problem:
            raise ESQUserError(f"{key}: {_show(value)} is not allowed; allowed: {problem}")
    if rule.choices is not None:
        if not any(value == c and type(value) is type(c) or (value is None and c is None) for c in rule.choices):
            raise ESQUserError(f"{key}: {_show(value)} is not allowed; allowed: {_allowed(name, rule, tp)}"
                               + (_did_you_mean(value, [c for c in rule.choices if isinstance(c, str)])
                                  if isinstance(value, str) else ""))
        return
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        bad = (not math.isfinite(item) and isinstance(item, float)
               or rule.gt is not None and not item > rule.gt or rule.ge is not None and not item >= rule.ge
               or rule.lt is not None and not item < rule.lt or rule.le is not None and not item <= rule.le)
        if bad:
            what = _show(value) if len(items) == 1 else f"{_show(value)} (item {_show(item)})"
            raise ESQUserError(f"{key}: {what} is out of range; allowed: {_allowed(name, rule, tp)}")


def _check_node(node: Any, schema: type, key: str, ctx: _Context) -> None:
    """Check one mapping against a Schema (or Entries) class; nested schemas recurse."""
    if not isinstance(node, DictConfig):
        raise ESQUserError(f"{key}: {_show(node)} is not a mapping; allowed: a mapping of {key} keys")
    if issubclass(schema, Entries):
        _check_entries(node, schema, key, ctx)
        return
    schema = schema.select(node, key)
    hints = typing.get_type_hints(schema)
    declared = {f.name: f for f in fields(schema)}
    # Hydra's own node (there when composed with return_hydra_config=True) is Hydra's business.
    unknown = [k for k in node.keys() if k not in declared and not (key == "" and k == "hydra")]
    if key == "trainer":
        for k in unknown:
            if k in TRAINER_RESERVED:
                raise ESQUserError(f"trainer.{k}: set by esq-train itself; {TRAINER_RESERVED[k]}")
    if unknown and (schema.extra == "forbid" or "_target_" not in node):
        k = str(unknown[0])
        raise ESQUserError(f"{_join(key, k)}: unknown key{_did_you_mean(k, declared)}; allowed keys of "
                           f"{key or 'the config'}: {', '.join(declared)}")
    if unknown:
        ctx.targets.append((key, node, list(declared)))
    for name, f in declared.items():
        sub_key = _join(key, name)
        if name not in node:
            if f.default is MISSING:
                raise ESQUserError(f"{sub_key}: missing; it must be set")
            continue
        value = _get(node, name, key)
        tp = hints[name]
        nested = _schema_of(tp)
        if nested is not None and value is not None:
            _check_node(value, nested, sub_key, ctx)
            continue
        if nested is not None and not _is_type(None, tp):
            raise ESQUserError(f"{sub_key}: null is not allowed; allowed: a mapping of {sub_key} keys")
        if isinstance(value, ListConfig):
            value = _items(value, sub_key)
        _check_value(value, tp, f.metadata.get("rule", Rule()), sub_key)
    schema.cross(node, key, ctx)


def _schema_of(tp: Any) -> type | None:
    """The Schema/Entries class inside an annotation (Optional[X] included), else None."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and issubclass(t, (Schema, Entries)):
            return t
    return None


def _check_entries(node: DictConfig, schema: type[Entries], key: str, ctx: _Context) -> None:
    names = getattr(schema, "names", tuple(schema.known))
    for name in node.keys():
        entry_key = _join(key, name)
        entry = _get(node, str(name), key)
        if entry is None:
            continue  # `callbacks.pgd=null` switches an entry off
        if not isinstance(entry, DictConfig):
            raise ESQUserError(f"{entry_key}: {_show(entry)} is not a mapping; allowed: a {schema.what} config "
                               "with _target_, or null to switch it off")
        if "_target_" not in entry:
            hint = f"; known {schema.what}s: {', '.join(names)}" if name not in names else ""
            raise ESQUserError(f"{entry_key}: no _target_; allowed: a {schema.what} config with "
                               f"_target_{hint}{_did_you_mean(str(name), names) if name not in names else ''}")
        target = _get(entry, "_target_", entry_key)
        known = schema.known.get(str(name))
        if known is not None and target == _DEFAULT_TARGETS.get(str(name)):
            _check_node(entry, known, entry_key, ctx)
        else:
            # Any other entry (Lightning's ModelCheckpoint, a logger, a user's own class): its keys
            # are the arguments of its _target_.
            ctx.targets.append((entry_key, entry, ["_target_"]))


_DEFAULT_TARGETS = {
    "quant_ratio": "esq_lightning.training.callbacks.QuantRatioCallback",
    "pgd": "esq_lightning.training.callbacks.PGDCallback",
    "finite_loss": "esq_lightning.training.callbacks.finite_loss.FiniteLossCallback",
}


# ---- phase 2: checks that need the code or the disk ---------------------------------------------
def _check_targets(targets: list[tuple[str, DictConfig, list[str]]]) -> None:
    from hydra.utils import get_method

    for key, node, declared in targets:
        target = _get(node, "_target_", key)
        try:
            obj = get_method(target) if not isinstance(target, type) else target
        except Exception as exc:  # noqa: BLE001 - an unimportable target is the user's typo
            raise ESQUserError(f"{key}._target_: cannot import {target!r}: {_first_line(exc)}") from None
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        accepted = [n for n, p in params.items()
                    if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
        for k in node.keys():
            k = str(k)
            if k in declared or k in accepted or k.startswith("_") and k.endswith("_"):
                continue
            if key == "data" and k in ("name", "num_classes", "in_channels", "image_size", "mean", "std", "attack"):
                continue
            shown = [a for a in dict.fromkeys([*declared, *accepted]) if a != "params" and not a.startswith("_")]
            raise ESQUserError(f"{_join(key, k)}: unknown key{_did_you_mean(k, accepted)}; allowed: "
                               f"{', '.join(shown)} ({target})")


def _check_cifar_dir(node: DictConfig, key: str) -> None:
    if _get(node, "download", key, False):
        return
    archive, folder = CIFAR_FILES[_get(node, "name", key)]
    root = Path(_get(node, "data_dir", key)).expanduser()
    if not root.is_dir():
        raise ESQUserError(f"{key}.data_dir: {str(root)!r} does not exist (resolved: {root.resolve()}); allowed: a "
                           f"folder holding {archive} or {folder}/, or {key}.download=true")
    if not (root / archive).is_file() and not (root / folder).is_dir():
        raise ESQUserError(f"{key}.data_dir: {str(root)!r} holds neither {archive} nor {folder}/; "
                           f"allowed: the folder that holds them, or {key}.download=true")


def _check_setting(cfg: DictConfig) -> None:
    """`setting` is derived from the run (esq_lightning/config/labels.py); a hand-set value must agree with it."""
    from esq_lightning.config.labels import derived_setting

    derived = derived_setting(cfg)
    given = _get(cfg, "setting", "")
    if given != derived:
        raise ESQUserError(f"setting: {given!r} contradicts the run, which is {derived!r} (method, quant and the "
                           "init_from run decide it); allowed: leave setting unset")


def _check_paths(cfg: DictConfig) -> None:
    init_from = _get(cfg, "init_from", "", None)
    if init_from is not None and not str(init_from).startswith("setting:") and not Path(init_from).is_file():
        raise ESQUserError(f"init_from: {init_from!r} is not a file; allowed: a checkpoint file, or setting:NAME "
                           "(the newest finished run of that setting)")
    ckpt = _get(cfg, "ckpt_path", "", None)
    if ckpt is not None:
        from esq_lightning.artifacts.checkpoint import resolve_resume_path

        resolve_resume_path(str(ckpt), _run_dir())


def _run_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def _check_model_and_pairing(cfg: DictConfig) -> None:
    import torch

    from esq_lightning.models import build_model
    from esq_lightning.pairing import check_pairing_names

    try:
        # The meta device builds the module tree without allocating or initializing any weight.
        with torch.device("meta"):
            model = build_model(cfg.model)
    except ESQUserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a constructor refusing its arguments is a config error
        # Hydra wraps the constructor's exception; its own message is the useful one.
        cause = exc.__cause__ or exc
        raise ESQUserError(f"model: {cfg.model.name} cannot be built from its config: "
                           f"{type(cause).__name__}: {_first_line(cause)}") from None
    try:
        check_pairing_names(model, [str(n) for n in cfg.pairing.layers])
    except ValueError as exc:
        raise ESQUserError(_first_line(exc)) from None


def _check_attack_names(names: list[Any], key: str) -> None:
    from esq_lightning.attacks import check_attack_names

    check_attack_names(names, key)


def _check_attack_params(params: Any, key: str, budgeted: bool = True) -> None:
    """Per-attack parameters: known attacks, parameters their registry entry takes, values within its ranges."""
    from esq_lightning.attacks import check_attack_params

    check_attack_params(params, key, budgeted)


def _run_phase2(ctx: _Context) -> None:
    # Cheapest first, so that most mistakes fail before Lightning is imported (seconds on a small
    # CPU): paths and attack names, then the model (its arguments, built on the meta device, the
    # pairing names), then the other targets, most of which import Lightning.
    for check in ctx.later:
        check()
    models = [t for t in ctx.targets if t[0] == "model"]
    _check_targets(models)
    for check in ctx.final:
        check()
    _check_targets([t for t in ctx.targets if t not in models])


# ---- entry points -----------------------------------------------------------------------------------
def validate_config(cfg: DictConfig, code_checks: bool = True) -> None:
    """Check a composed esq-train config; the first problem raises ESQUserError (one line).

    `code_checks=False` runs phase 1 only (no torch import, nothing read from disk).
    """
    ctx = _Context()
    _check_node(cfg, TrainConfig, "", ctx)
    if code_checks:
        _run_phase2(ctx)


def validate_eval_config(cfg: DictConfig, run_cfg: DictConfig | None = None) -> None:
    """Check an esq-eval config; with `run_cfg` (the checkpoint's config merged with this one), also
    the `eval` and `data` groups as they will be used."""
    ctx = _Context()
    _check_node(cfg, EvalRunConfig, "", ctx)
    if run_cfg is not None:
        _check_node(run_cfg.eval, EvalConfig, "eval", ctx)
        _check_node(run_cfg.data, DataConfig, "data", ctx)
    _run_phase2(ctx)

