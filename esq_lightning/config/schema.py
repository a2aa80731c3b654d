"""Config validation: pydantic models of the config groups, checked right after Hydra composition.

How it works (docs/reliability.md): every config group has a pydantic model below. Its fields are the
allowed keys, their annotations the allowed types, `Field(ge=..., le=...)` / `Literal` the allowed values,
and its `model_validator`s the rules between keys. The defaults live in the YAML under conf/ only: a
field is either required (the shipped YAML sets it) or `absent()` (a key that may be left out, then the
code that takes it, e.g. its `_target_`'s signature, decides). A composed config is checked in two phases:
  1. structure, types, ranges and cross-key rules, with nothing but omegaconf and pydantic imported, so a
     typo fails in about a second, before torch is imported and before any data is read;
  2. checks that need the code: keys of a `_target_` node that the model does not declare against the
     target's signature, `trainer.*` against pytorch_lightning.Trainer (its signature, strategy and
     accelerator registries and precision type), pairing names against the model (built on the meta
     device), attack names and parameters against esq_lightning.attacks, paths on disk: these import torch
     and the code, so they live above the config layer, in esq_lightning/commands/checks.py
     (`validate_config` and `validate_eval_config` run both phases; `validate_train_config` here, phase 1).
The first problem raises ESQUserError with one line: `<key>: <value> <problem>; allowed: ...`, worded by the
error-message layer of every config model (config/messages.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional, Union

from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from esq_lightning.config.choices import (
    ACT_BITS,
    CIFAR_FILES,
    DATASETS,
    EVAL_MODES,
    METHODS,
    PAIRING_DISTANCES,
    PAIRING_LOGITS_ONLY,
    QUANT_BITS,
    SINGLE_STEP_TRAIN_ATTACKS,
    SQ_FUNCTIONS,
    SQ_VARIANTS,
    TRAIN_ATTACKS,
)

# The one error-message layer of the config models (config/messages.py); the short names below are the ones
# the models and the phase-2 checks use.
from esq_lightning.config.messages import Choice, LiveChoice
from esq_lightning.config.messages import at as _at
from esq_lightning.config.messages import check as _check
from esq_lightning.config.messages import first_line as _first_line
from esq_lightning.config.messages import join as _join
from esq_lightning.config.messages import keys_of as _keys_of
from esq_lightning.config.messages import rule as _rule
from esq_lightning.config.messages import show as _show
from esq_lightning.config.messages import validate as _validate
from esq_lightning.config.quantizers import quant_widths
from esq_lightning.errors import ESQUserError
from esq_lightning.errors import did_you_mean as _did_you_mean

NORMS = ("linf", "l2")
LINF_RADIUS = "an L_inf radius within the input range [0, 1]"
# pl.Trainer arguments that esq-train sets itself; a config value would be ignored or break the run.
TRAINER_RESERVED = {
    "logger": "use the logger group (logger=csv|tensorboard|wandb|none)",
    "callbacks": "use the callbacks group (callbacks.<name>=...)",
    "default_root_dir": "the run directory is hydra.run.dir",
    "inference_mode": "validation runs attacks and needs autograd",
    "use_distributed_sampler": "the data loaders shard themselves by rank",
    "plugins": "esq-train installs its atomic checkpoint writer",
}


# ---- building blocks --------------------------------------------------------------------------------
def absent(**constraints: Any) -> Any:
    """A key that may be left out (it then reads as None: the code that takes it decides, e.g. the
    `_target_`'s signature). Not a default value: the YAML under conf/ holds those."""
    return Field(None, **constraints)


class Model(BaseModel):
    """Base of the group models: strict types (no 'yes' -> true, no '3' -> 3), unknown keys refused.

    Models with `extra="allow"` take keys they do not declare when the node has a `_target_`: those keys
    must be arguments of the target, checked in phase 2. `signature_keys` are declared keys that the
    target must take as well (architecture arguments that not every model has).
    """

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, protected_namespaces=())
    signature_keys: ClassVar[tuple[str, ...]] = ()
    extra_needs_target: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _extra_keys_need_a_target(cls, data: Any) -> Any:
        if (
            cls.model_config.get("extra") == "allow"
            and cls.extra_needs_target
            and isinstance(data, dict)
            and "_target_" not in data
        ):
            declared = _keys_of(cls)
            for k in data:
                if k not in declared:
                    raise PydanticCustomError("extra_forbidden", "unknown key", {"sub": k})
        return data


class TargetModel(Model):
    model_config = ConfigDict(extra="allow")


def _limit_batches(v: Any) -> str | None:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    if isinstance(v, float) and 0.0 <= v <= 1.0:
        return None
    return "null, a number of batches >= 0, or a fraction in [0, 1]"


def _train_batches(v: Any) -> str | None:
    return "null, a number of batches >= 1, or a fraction in (0, 1]" if v in (0, 0.0) else _limit_batches(v)


def _devices(v: Any) -> str | None:
    allowed = "a number of devices >= 1, -1 (all), 'auto', or a list of device ids"
    if isinstance(v, bool):
        return allowed
    if isinstance(v, int) and (v >= 1 or v == -1) or isinstance(v, str) and v.strip():
        return None
    if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        return None
    return allowed


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
    if v is not None and not isinstance(v, str):
        return "null, a checkpoint file or setting:NAME"
    if isinstance(v, str) and v.startswith("setting:") and not v.split(":", 1)[1].strip():
        return "a checkpoint file or setting:NAME with a setting name (e.g. setting:NF)"
    return None


def _int_or_fraction(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        return "a number >= 0"
    return None


def _fast_dev_run(v: Any) -> str | None:
    if isinstance(v, bool) or isinstance(v, int) and v >= 0:
        return None
    return "true, false or a number of batches >= 0"


def _int_or_text(v: Any) -> str | None:
    return (
        None
        if v is None or isinstance(v, str) or isinstance(v, int) and not isinstance(v, bool)
        else "a precision of pytorch_lightning.Trainer, e.g. 32-true, bf16-mixed"
    )


def _number_or_text(v: Any) -> str | None:
    return (
        None
        if v is None or isinstance(v, str) or isinstance(v, (int, float)) and not isinstance(v, bool)
        else "null, a number or a text"
    )


Threads = Annotated[Any, _check(_threads)]
Mapping = Optional[dict[str, Any]]


# ---- the groups -------------------------------------------------------------------------------------
class AttackStrengthConfig(Model):
    """data.attack: the dataset's default L_inf attack strength (training PGD, FGSM)."""

    eps: float = Field(gt=0, le=1, description=LINF_RADIUS)
    step_size: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    fgsm_eps: float = Field(gt=0, le=1, description=LINF_RADIUS)


class DataConfig(TargetModel):
    # Keys not declared here must be arguments of the datamodule (a parameter added there is allowed at
    # once); the declared ones get their types and ranges.
    target: Optional[str] = Field(None, alias="_target_")  # absent: the datamodule of `name`
    name: str
    batch_size: int = Field(ge=1)
    eval_batch_size: Optional[int] = absent(ge=1)
    val_size: int = absent(ge=0)
    split_seed: int = absent(ge=0)
    augment: bool = absent()
    device_resident: bool = absent()
    num_workers: int = absent(ge=0)
    num_classes: int = Field(ge=2)
    in_channels: int = Field(ge=1)
    image_size: int = Field(ge=1)
    mean: list[Annotated[float, Field(ge=0, le=1)]]
    std: list[Annotated[float, Field(gt=0)]]
    attack: AttackStrengthConfig

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> DataConfig:
        for sub in ("mean", "std"):
            n = len(getattr(self, sub))
            if n != self.in_channels:
                raise _rule(sub, f"{n} values for in_channels={self.in_channels}; allowed: one value per input channel")
        return self


class DigitsDataConfig(DataConfig):
    test_size: int = absent(ge=1)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> DigitsDataConfig:
        val, test = self.val_size, self.test_size
        if val is not None and test is not None and val + test >= 1797:
            raise _rule(
                "val_size",
                f"{val} with test_size={test} leaves no training data; "
                "allowed: val_size + test_size < 1797 (the digits set)",
            )
        return self


class CIFARDataConfig(DataConfig):
    data_dir: str
    download: bool


class CustomDataConfig(DataConfig):
    target: str = Field(alias="_target_")  # a datamodule of the user's own: its arguments come from it


def _data_kind(node: Any) -> str | None:
    if not isinstance(node, dict):
        return "custom"  # fails as "not a mapping"
    name = node.get("name")
    if name == "digits":
        return "digits"
    if name in ("cifar10", "cifar100"):
        return "cifar"
    if "_target_" in node or "name" not in node:
        return "custom"
    return None


_DATA_UNKNOWN = {
    "text": "{value} is not a known dataset; allowed: "
    + ", ".join(DATASETS)
    + " (or a data config with its own _target_)",
    "sub": "name",
}
Data = Annotated[
    Union[
        Annotated[DigitsDataConfig, Tag("digits")],
        Annotated[CIFARDataConfig, Tag("cifar")],
        Annotated[CustomDataConfig, Tag("custom")],
    ],
    Discriminator(
        _data_kind,
        custom_error_type="esq_rule",
        custom_error_message="unknown dataset",
        custom_error_context=_DATA_UNKNOWN,
    ),
]


class ModelConfig(TargetModel):
    name: str
    target: str = Field(alias="_target_")
    num_classes: int = Field(ge=2)
    in_channels: int = Field(ge=1)
    mean: list[Annotated[float, Field(ge=0, le=1)]] = absent()
    std: list[Annotated[float, Field(gt=0)]] = absent()
    # Architecture arguments: not every model takes each; the signature check says which it takes.
    width: int = absent(ge=1)
    depth: int = absent(ge=1)
    widen_factor: int = absent(ge=1)
    dropout: float = absent(ge=0, lt=1)
    num_blocks: list[Annotated[int, Field(ge=1)]] = absent()
    signature_keys: ClassVar[tuple[str, ...]] = ("width", "depth", "widen_factor", "dropout", "num_blocks")


class QuantConfig(Model):
    # conf/quant/default.yaml: kind is ${quant_kind:${.bits}}, so `quant.bits` alone picks the family.
    # The registered quantizer families (config/quantizers.py), read at check time.
    kind: LiveChoice(lambda: QUANT_BITS)
    bits: LiveChoice(quant_widths)
    per_filter: bool
    keep_first_last: bool
    variant: Choice(*SQ_VARIANTS)
    f: Choice(*SQ_FUNCTIONS)
    act_bits: Choice(*ACT_BITS) = Field(description="unsigned activation bits after the ReLUs, 32 = off")
    # Mixed precision per layer (esq_lightning/compress/mixed.py): layer names are checked against the model.
    layer_bits: Optional[dict[str, LiveChoice(quant_widths)]]
    first_last_bits: Optional[LiveChoice(quant_widths)]
    budget_bytes: Optional[int] = Field(gt=0)
    allocate_bits: list[LiveChoice(quant_widths)] = Field(min_length=1)
    sensitivity_samples: int = Field(ge=1)

    @model_validator(mode="after")
    def _one_allocation(self) -> QuantConfig:
        if self.budget_bytes is not None and (
            self.layer_bits or self.first_last_bits is not None or self.keep_first_last
        ):
            raise _rule(
                "budget_bytes",
                f"{self.budget_bytes} allocates the bits of every layer, but layer_bits, "
                "first_last_bits or keep_first_last set some too; allowed: one of them",
            )
        if self.first_last_bits is not None and self.keep_first_last:
            raise _rule(
                "first_last_bits",
                f"{self.first_last_bits} and keep_first_last=true both set the first and "
                "last layers; allowed: one of them (keep_first_last = first_last_bits=32)",
            )
        return self

    @model_validator(mode="after")
    def _bits_match_kind(self) -> QuantConfig:
        if self.bits not in QUANT_BITS[self.kind]:
            widths = ", ".join(map(str, QUANT_BITS[self.kind]))
            every = "; ".join(f"{k}=" + ",".join(map(str, b)) for k, b in QUANT_BITS.items())
            raise _rule(
                "bits",
                f"{self.bits} does not match {{key}}.kind={self.kind}; allowed: {widths} ({every}; "
                "quant=default lets quant.bits pick the kind)",
            )
        return self


class PruneConfig(Model):
    """conf/prune/*.yaml (esq_lightning/compress/pruning.py)."""

    method: Choice("none", "magnitude", "hydra")
    sparsity: Optional[float] = Field(ge=0, lt=1, description="the fraction of weights removed, in [0, 1)")
    budget_bytes: Optional[int] = Field(gt=0)
    scope: Choice("layer", "global")
    score_epochs: int = Field(ge=0)

    @model_validator(mode="after")
    def _sparsity_or_budget(self) -> PruneConfig:
        if self.method == "none":
            return self
        if (self.sparsity is None) == (self.budget_bytes is None):
            raise _rule(
                "sparsity",
                f"{self.sparsity} with budget_bytes={self.budget_bytes}: method={self.method} needs "
                "exactly one of them; allowed: sparsity in [0, 1) and budget_bytes=null, or "
                "sparsity=null and budget_bytes > 0",
            )
        if self.method == "hydra" and self.score_epochs < 1:
            raise _rule(
                "score_epochs",
                f"{self.score_epochs}: method=hydra trains its scores for at least one epoch; "
                "allowed: >= 1 (method=magnitude prunes without scores)",
            )
        if self.method != "hydra" and self.score_epochs:
            raise _rule("score_epochs", f"{self.score_epochs}: only method=hydra has a score phase; allowed: 0")
        return self


class MethodConfig(Model):
    name: Choice(*METHODS)
    # Only the method that uses it has it (conf/method/alp.yaml, trades.yaml).
    alp_lambda: float = absent(ge=0)
    trades_beta: float = absent(ge=0)

    @model_validator(mode="after")
    def _parameters_of_the_method(self) -> MethodConfig:
        for sub, owner in (("alp_lambda", "alp"), ("trades_beta", "trades")):
            if sub in self.model_fields_set and self.name != owner:
                raise _rule(
                    sub,
                    f"only used by method={owner}, this run has method={self.name}; "
                    f"allowed keys for method={self.name}: name",
                )
            if self.name == owner and getattr(self, sub) is None:
                raise _rule(sub, f"missing; method={owner} needs it (conf/method/{owner}.yaml)")
        return self


class PairingConfig(Model):
    name: str
    layers: list[str]
    lambdas: list[Annotated[float, Field(ge=0)]] = Field(description="non-negative weights, one per layer")
    distance: Choice(*PAIRING_DISTANCES, None) = Field(
        description="a pairing distance (null: relative_l{p}, the paper's for p=2)"
    )
    p: Choice(1, 2, None) = Field(description="1, 2 or null (older spelling of the distance)")
    warmup_epochs: int = Field(ge=0, description="0: the full lambda from the first step")

    @model_validator(mode="after")
    def _layers_and_distance(self) -> PairingConfig:
        distance, p = self.distance, self.p
        if distance is not None and p is not None and distance != f"relative_l{p}":
            raise _rule(
                "p",
                f"{p} contradicts {{key}}.distance={distance}; allowed: set {{key}}.distance only "
                "({key}.p is the older spelling of relative_l1 / relative_l2)",
            )
        if distance in PAIRING_LOGITS_ONLY:
            inner = [n for n in self.layers if n != "logits"]
            if inner:
                raise _rule(
                    "distance",
                    f"{distance} is defined on the logits only but {{key}}.layers pairs {inner}; "
                    "allowed there: relative_l2, relative_l1 (or layers: [logits])",
                )
        if len(self.layers) != len(self.lambdas):
            raise _rule(
                "lambdas",
                f"{{value}} has {len(self.lambdas)} values for {len(self.layers)} "
                f"layers {self.layers}; allowed: one lambda per layer",
            )
        if len(set(self.layers)) != len(self.layers):
            raise _rule("layers", f"{self.layers} names a module twice; allowed: distinct module names")
        return self


class OptimizerConfig(TargetModel):
    target: str = Field(alias="_target_")
    partial: Choice(True) = Field(alias="_partial_", description="true (the module passes the parameters)")
    lr: float = Field(gt=0)
    momentum: float = absent(ge=0, lt=1)
    weight_decay: float = absent(ge=0)


class SchedulerConfig(TargetModel):
    target: str = Field(alias="_target_")
    partial: Choice(True) = Field(alias="_partial_", description="true (the module passes the optimizer)")
    T_max: int = absent(ge=1)
    milestones: list[Annotated[int, Field(ge=0)]] = absent()
    gamma: float = absent(gt=0)
    eta_min: float = absent(ge=0)


class TargetEntry(TargetModel):
    """A callback or logger entry of anyone's class: its keys are the arguments of its `_target_`."""

    target: str = Field(alias="_target_")


class QuantRatioCallbackConfig(TargetModel):
    target: str = Field(alias="_target_")
    start: float = Field(gt=0, le=1)
    step: float = Field(gt=0)
    every_n_epochs: int = Field(ge=1)


class PGDCallbackConfig(TargetModel):
    target: str = Field(alias="_target_")
    eps: float = Field(gt=0)
    step_size: float = Field(gt=0)
    steps: int = Field(ge=0, description="0 makes x_adv = x")
    norm: Choice(*NORMS)
    random_start: bool
    val_every_n_epochs: int = Field(ge=0, description="0 switches robust validation off")
    val_n_samples: Optional[int] = Field(ge=1)
    val_steps: Optional[int] = absent(ge=1)
    # The training attack by name (esq_lightning/training/attacks.py, conf/attack/); absent keys read as PGD's.
    name: Optional[Choice(*TRAIN_ATTACKS)] = absent()
    noise: Optional[float] = absent(gt=0, description="the half-width of the random start; null: eps")
    project: Optional[bool] = absent()
    gradalign: Optional[float] = absent(ge=0, description="0 switches GradAlign off")
    val_step_size: Optional[float] = absent(gt=0)
    co_drop: Optional[float] = absent(gt=0, le=1)
    co_fgsm_tolerance: Optional[float] = absent(ge=0, le=1)
    co_stop: Optional[bool] = absent()

    @model_validator(mode="after")
    def _linf_radius(self) -> PGDCallbackConfig:
        if self.norm == "linf":
            for sub in ("eps", "step_size"):
                v = getattr(self, sub)
                if v > 1:
                    raise _rule(sub, f"{{value}} is out of range; allowed: 0 < {sub} <= 1 ({LINF_RADIUS})")
        return self

    @model_validator(mode="after")
    def _attack_is_what_it_names(self) -> PGDCallbackConfig:
        # A name whose keys say another attack would train something other than it names (docs/fast-training.md).
        name, project = self.name or "pgd", self.project is not False
        if name in SINGLE_STEP_TRAIN_ATTACKS and self.steps != 1:
            raise _rule("steps", f"{{value}} with name={name}, a single-step attack; allowed: 1 (or name=pgd)")
        wants = {"pgd": (None, True), "fgsm": (False, True), "fgsm_rs": (True, True), "nfgsm": (True, False)}[name]
        if wants[0] is not None and self.random_start != wants[0]:
            raise _rule(
                "random_start",
                f"{{value}} with name={name}; allowed: {str(wants[0]).lower()} "
                "(fgsm: none, fgsm_rs and nfgsm: a uniform start)",
            )
        if project != wants[1]:
            raise _rule(
                "project",
                f"{_show(project)} with name={name}; allowed: {str(wants[1]).lower()} (only nfgsm leaves the eps-ball)",
            )
        if not project and self.norm != "linf":
            raise _rule("project", f"false with norm={self.norm}; allowed: norm=linf (nfgsm is an L_inf attack)")
        if self.noise is not None and project and self.noise > self.eps:
            raise _rule(
                "noise",
                f"{{value}} is larger than eps={self.eps:g} with project=true; allowed: "
                "noise <= eps (or name=nfgsm, which does not project)",
            )
        return self


class FiniteLossCallbackConfig(TargetModel):
    target: str = Field(alias="_target_")
    check_grads: bool


def _known_entry(target: str) -> Callable[[Any], str]:
    """Discriminator: our own class at its own target gets its model; anything else its target's signature."""
    return lambda node: "ours" if isinstance(node, dict) and node.get("_target_") == target else "other"


def _entry(model: type[BaseModel], target: str) -> Any:
    return Optional[
        Annotated[
            Union[Annotated[model, Tag("ours")], Annotated[TargetEntry, Tag("other")]],
            Discriminator(_known_entry(target)),
        ]
    ]


class Entries(Model):
    """A mapping of named entries (callbacks, loggers): each is null (off) or a config with a `_target_`."""

    model_config = ConfigDict(extra="allow")
    extra_needs_target = False
    what: ClassVar[str] = "entry"
    names: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _entries_have_targets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, entry in data.items():
            if entry is None:
                continue  # `callbacks.pgd=null` switches an entry off
            if not isinstance(entry, dict):
                raise _rule(
                    name,
                    f"{_show(entry)} is not a mapping; allowed: a {cls.what} config with _target_, "
                    "or null to switch it off",
                )
            if "_target_" not in entry:
                hint = (
                    f"; known {cls.what}s: {', '.join(cls.names)}{_did_you_mean(name, cls.names)}"
                    if name not in cls.names
                    else ""
                )
                raise _rule(name, f"no _target_; allowed: a {cls.what} config with _target_{hint}")
        return data

    def entries(self) -> dict[str, Any]:
        """name -> validated entry (a model), the switched-off ones left out."""
        out = {name: getattr(self, name) for name in type(self).model_fields}
        out.update({k: TargetEntry.model_validate(v) for k, v in (self.model_extra or {}).items()})
        return {k: v for k, v in out.items() if v is not None}


class CallbacksConfig(Entries):
    what = "callback"
    names = ("quant_ratio", "pgd", "checkpoint", "lr_monitor", "finite_loss")
    quant_ratio: _entry(QuantRatioCallbackConfig, "esq_lightning.training.callbacks.QuantRatioCallback") = absent()
    pgd: _entry(PGDCallbackConfig, "esq_lightning.training.callbacks.PGDCallback") = absent()
    finite_loss: _entry(FiniteLossCallbackConfig, "esq_lightning.training.callbacks.finite_loss.FiniteLossCallback") = (
        absent()
    )


class LoggersConfig(Entries):
    what = "logger"  # every logger is checked against its _target_
    names = ("csv", "tensorboard", "wandb")


class TrainerConfig(Model):
    """trainer: pytorch_lightning.Trainer arguments. Any argument of the installed Lightning is allowed
    (phase 2 checks the keys against its signature and strategy / accelerator / precision against what it
    accepts); the ones below also get their types and ranges here."""

    model_config = ConfigDict(extra="allow")
    extra_needs_target = False
    max_epochs: int = Field(ge=1)
    accelerator: str = absent()
    strategy: str = absent()
    precision: Annotated[Any, _check(_int_or_text)] = absent()
    devices: Annotated[Any, _check(_devices)] = absent()
    num_nodes: int = absent(ge=1)
    fast_dev_run: Annotated[Any, _check(_fast_dev_run)] = absent()
    min_epochs: Optional[int] = absent(ge=0)
    max_steps: int = absent(ge=-1)
    min_steps: Optional[int] = absent(ge=0)
    limit_train_batches: Annotated[Any, _check(_train_batches)] = absent()
    limit_val_batches: Annotated[Any, _check(_limit_batches)] = absent()
    limit_test_batches: Annotated[Any, _check(_limit_batches)] = absent()
    limit_predict_batches: Annotated[Any, _check(_limit_batches)] = absent()
    overfit_batches: Annotated[Any, _check(_int_or_fraction)] = absent()
    check_val_every_n_epoch: Optional[int] = absent(ge=1)
    num_sanity_val_steps: Optional[int] = absent(ge=-1)
    log_every_n_steps: Optional[int] = absent(ge=1)
    accumulate_grad_batches: int = absent(ge=1)
    gradient_clip_val: Optional[float] = absent(ge=0)
    gradient_clip_algorithm: Choice("norm", "value", None) = absent()
    deterministic: Choice(True, False, "warn", None) = absent()
    enable_checkpointing: Optional[bool] = absent()
    enable_progress_bar: Optional[bool] = absent()
    enable_model_summary: Optional[bool] = absent()

    @model_validator(mode="before")
    @classmethod
    def _not_set_by_esq_train(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for k in data:
                if k in TRAINER_RESERVED:
                    raise _rule(k, f"set by esq-train itself; {TRAINER_RESERVED[k]}")
        return data


class MaskingEvalConfig(Model):
    tolerance: float = Field(ge=0, le=1, description="a fraction of accuracy")


class OnnxEvalConfig(Model):
    """esq-eval ckpt_path=model.onnx (commands/deployed.py): onnxruntime's integer QDQ fusions on or off."""

    int8_fusion: bool


class TransferEvalConfig(Model):
    attack: str


class AmplificationEvalConfig(Model):
    steps: int = Field(ge=1)
    step_size: Optional[float] = Field(gt=0)


class BlackboxEvalConfig(Model):
    attacks: list[str]
    budgets: list[Annotated[float, Field(ge=0)]]
    n_samples: Optional[int] = Field(ge=1)
    params: Mapping


class EvalConfig(Model):
    attacks: list[str]
    eps: float = Field(gt=0)
    norm: Choice(*NORMS)
    n_samples: Optional[int] = Field(ge=1)
    batch_size: int = Field(ge=1)
    params: Mapping
    # The gradient-masking report and esq-eval's other modes (docs/evaluation.md)
    masking: MaskingEvalConfig
    transfer: TransferEvalConfig
    amplification: AmplificationEvalConfig
    blackbox: BlackboxEvalConfig
    # The threat model's FGSM budget and the audit (docs/evaluation.md, config/threat.py, evaluation/audit.py)
    fgsm_factor: Optional[float] = Field(gt=0)
    budget: Choice("quick", "standard", "thorough")
    checks: Mapping
    audit: Mapping
    # esq-eval ckpt_path=model.onnx (docs/deployment.md); absent in the eval config of runs older than it.
    onnx: Optional[OnnxEvalConfig] = absent()

    @model_validator(mode="after")
    def _linf_radius(self) -> EvalConfig:
        if self.norm == "linf" and self.eps > 1:
            raise _rule("eps", f"{{value}} is out of range; allowed: 0 < eps <= 1 ({LINF_RADIUS})")
        return self


class PathsConfig(Model):
    runs_root: str


class TrainConfig(Model):
    """conf/train.yaml."""

    task_name: str
    setting: str
    experiment_name: str
    seed: int = Field(ge=0)
    init_from: Annotated[Any, _check(_setting_or_path)]
    init_seed: Optional[int] = Field(ge=0)
    optimized_metric: Annotated[Any, _check(_metric_name)]
    ckpt_path: Optional[str]
    trust_checkpoint: bool
    threads: Threads
    channels_last: bool
    compile: bool
    # Progress bars, or one line per epoch (training/callbacks/progress.py); trainer.enable_progress_bar follows it.
    progress: bool
    tags: list[str]
    # A compression preset (conf/compress/*.yaml) and its budget level (the index into the preset's knob values).
    compress_name: Optional[str] = absent()
    budget: Optional[int] = absent(ge=0)
    budgets: dict[str, list[Annotated[int, Field(gt=0)]]] = absent()
    # Groups whose values others interpolate come first, so an error names the key the user set.
    trainer: TrainerConfig
    data: Data
    model: ModelConfig
    quant: QuantConfig
    prune: PruneConfig
    method: MethodConfig
    pairing: PairingConfig
    optimizer: OptimizerConfig
    scheduler: Optional[SchedulerConfig]
    callbacks: Optional[CallbacksConfig]
    logger: Optional[LoggersConfig]
    eval: EvalConfig
    paths: PathsConfig

    @model_validator(mode="after")
    def _runs_what_it_names(self) -> TrainConfig:
        method = self.method.name
        pgd = self.callbacks.pgd if self.callbacks is not None else None
        if method != "natural" and pgd is None:
            raise _rule(
                "callbacks.pgd",
                f"null, but method={method} trains on x_adv; allowed: keep callbacks.pgd "
                "(the training attack), or method=natural",
            )
        if method == "esq" and not self.pairing.layers:
            raise _rule(
                "pairing.layers",
                "[] pairs nothing, but method=esq needs at least one layer; "
                "allowed: module names of the model, e.g. [logits]",
            )
        if method == "esq" and self.pairing.lambdas and not any(self.pairing.lambdas):
            raise _rule(
                "pairing.lambdas",
                f"{self.pairing.lambdas} weighs the pairing term zero at every layer, so "
                "method=esq would train the cross-entropy term alone (SQ without error "
                "silencing) under the label of error-silenced training; allowed: a "
                "positive lambda at one layer at least, or method=adversarial / natural "
                "for a run without pairing",
            )
        steps, random_start = getattr(pgd, "steps", None), getattr(pgd, "random_start", None)
        if method != "natural" and steps == 0 and random_start is False:
            what = "the pairing term is always zero" if method == "esq" else "it trains on the clean inputs"
            raise _rule(
                "callbacks.pgd.steps",
                f"0 with random_start=false makes x_adv = x, so method={method} would "
                f"train something other than it names ({what}); allowed: steps >= 1, "
                "or random_start=true, or method=natural",
            )
        epochs = self.trainer.max_epochs
        if self.prune.method == "hydra" and isinstance(epochs, int) and epochs <= self.prune.score_epochs:
            raise _rule(
                "prune.score_epochs",
                f"{self.prune.score_epochs} leaves no epoch of trainer.max_epochs="
                f"{epochs} to fine-tune the kept weights; allowed: < trainer.max_epochs",
            )
        if self.prune.method != "none" and self.quant.budget_bytes is not None:
            raise _rule(
                "quant.budget_bytes",
                f"{self.quant.budget_bytes} with prune.method={self.prune.method}: the "
                "bit allocation does not count pruned weights; allowed: one budget "
                "(prune.budget_bytes with fixed bits, or quant.budget_bytes unpruned)",
            )
        metric, attacks = self.optimized_metric, self.eval.attacks
        if metric and metric.startswith("robust_acc.") and metric.split(".", 1)[1] not in [*attacks, "worst_case"]:
            raise _rule(
                "optimized_metric",
                f"{metric} names an attack that eval.attacks does not run "
                f"({', '.join(attacks) or 'none'}); allowed: robust_acc.<one of "
                "eval.attacks>, robust_acc.worst_case, clean_acc",
            )
        return self


class RobustbenchConfig(Model):
    """conf/eval.yaml `robustbench` (esq_lightning/evaluation/robustbench.py)."""

    write: bool
    model_name: Optional[str]
    name: Optional[str]
    authors: Optional[str]
    link: Optional[str]
    venue: Optional[str]
    reported: Annotated[Any, _check(_number_or_text)]
    additional_data: bool
    architecture: Optional[str]


class EvalRunConfig(Model):
    """conf/eval.yaml (esq-eval)."""

    task_name: str
    mode: Choice(*EVAL_MODES)
    ckpt_path: Optional[str]
    ckpts: list[str]
    trust_checkpoint: bool
    data: Mapping
    seed: int = Field(ge=0)
    threads: Threads
    progress: bool
    resume: Choice(True, False, "auto")
    trainer: Optional[TrainerConfig] = absent()  # conf/eval.yaml `trainer: null`: no trainer group
    tags: list[str]
    robustbench: RobustbenchConfig
    logger: Optional[LoggersConfig]  # logger=wandb|tensorboard (esq_lightning/commands/eval_loggers.py)
    eval: Mapping  # checked as EvalConfig once merged with the checkpoint's config
    paths: PathsConfig


# ---- phase 2: checks that need the code or the disk ---------------------------------------------
def _targets(node: Any, key: str) -> list[tuple[str, BaseModel]]:
    """(key, model) of every validated node with a `_target_`, in config order."""
    out: list[tuple[str, BaseModel]] = []
    if isinstance(node, Entries):
        for name, entry in node.entries().items():
            out += _targets(entry, _join(key, name))
        return out
    if not isinstance(node, BaseModel):
        return out
    if getattr(node, "target", None) is not None and "target" in type(node).model_fields:
        out.append((key, node))
    for name, f in type(node).model_fields.items():
        if name != "target":
            out += _targets(getattr(node, name), _join(key, f.alias or name))
    return out


def _check_target(key: str, node: BaseModel, raw: dict) -> None:
    from hydra.utils import get_method

    target = node.target  # type: ignore[attr-defined]
    try:
        obj = get_method(target)
    except Exception as exc:
        raise ESQUserError(f"{key}._target_: cannot import {target!r}: {_first_line(exc)}") from None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
    declared = [k for k in _keys_of(type(node)) if k not in type(node).signature_keys]
    given = [k for k in raw if not (k.startswith("_") and k.endswith("_"))]
    for k in given:
        if k in accepted or k in declared:
            continue
        shown = [a for a in dict.fromkeys([*declared, *accepted]) if a != "params" and not a.startswith("_")]
        raise ESQUserError(
            f"{_join(key, k)}: unknown key{_did_you_mean(k, accepted)}; allowed: {', '.join(shown)} ({target})"
        )


def _check_targets(targets: list[tuple[str, BaseModel]], data: dict) -> None:
    for key, node in targets:
        _check_target(key, node, _at(data, key.split(".")) or {})


def _check_cifar_dir(data: CIFARDataConfig, key: str = "data") -> None:
    if data.download:
        return
    archive, folder = CIFAR_FILES[data.name]
    root = Path(data.data_dir).expanduser()
    if not root.is_dir():
        raise ESQUserError(
            f"{key}.data_dir: {str(root)!r} does not exist (resolved: {root.resolve()}); allowed: a "
            f"folder holding {archive} or {folder}/, or {key}.download=true"
        )
    if not (root / archive).is_file() and not (root / folder).is_dir():
        raise ESQUserError(
            f"{key}.data_dir: {str(root)!r} holds neither {archive} nor {folder}/; "
            f"allowed: the folder that holds them, or {key}.download=true"
        )


class DataRoot(Model):
    """The data group alone (esq-eval checks the merged data group of a checkpoint with it)."""

    data: Data


# ---- phase 1 entry point ------------------------------------------------------------------------------
def validate_train_config(cfg: DictConfig) -> tuple[TrainConfig, dict]:
    """Phase 1 of esq-train's check (structure, types, ranges, cross-key rules): no torch import, nothing read
    from disk. Phase 2 and the whole check: esq_lightning.commands.checks.validate_config."""
    run, data = _validate(TrainConfig, cfg)
    assert isinstance(run, TrainConfig)
    return run, data


# ---- what the phase-2 checks (esq_lightning/commands/checks.py, which import torch and the code) use ------------
config_targets = _targets
check_targets = _check_targets
check_cifar_dir = _check_cifar_dir
