"""What the code knows about one evaluation attack, in one place: the AttackSpec.

Everything outside the attack itself reads these fields from the table (attacks/registry.py): the
masking report and the checks its family and loss, esq-report and the black-box legends its title,
the black-box curves its query budget and line style, the config check its parameter ranges.
Adding an attack is one AttackSpec entry plus its runner (docs/attacks.md, "Adding an attack").
Attack (a spec called with eps and parameters) runs it and returns an AttackOutput.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.attacks.utils import (
    _per_sample,
    _predict,
    as_autograd_input,
    canonical_norm,
    check_gradients,
    frozen_eval,
    grad_enabled,
    perturbation_norms,
)
from esq_lightning.errors import ESQUserError, show_value
from esq_lightning.versions import __version__

__all__ = [
    "ADAPTIVE",
    "BUDGETED",
    "CE",
    "FAMILIES",
    "GRADIENT_FREE",
    "ITERATIVE",
    "KINDS",
    "LOSSES",
    "MINIMUM_NORM",
    "SCALE_FREE",
    "SINGLE_STEP",
    "Attack",
    "AttackOutput",
    "AttackSpec",
    "ParamRange",
]

# kind: what the attack answers.
BUDGETED = "budgeted"  # the best x_adv within eps
MINIMUM_NORM = "minimum-norm"  # the smallest perturbation that fools the model (accuracy read at any budget)
KINDS = (BUDGETED, MINIMUM_NORM)

# family: what the attack uses of the model, as the gradient-masking report (evaluation/masking.py) and the
# checks (evaluation/checks.py) compare attacks.
SINGLE_STEP = "single-step"  # one gradient step (FGSM): should never beat an iterative attack
ITERATIVE = "iterative"  # iterative gradient attacks the masking report compares (CE PGD, AutoAttack, DDN, C&W)
ADAPTIVE = "adaptive"  # iterative gradient attacks on a loss of their own (margin, DLR, targeted, pairing):
# they nest with no other attack, so the masking report leaves them out
GRADIENT_FREE = "gradient-free"  # score- or decision-based: never look at a gradient
FAMILIES = (SINGLE_STEP, ITERATIVE, ADAPTIVE, GRADIENT_FREE)

# loss: what loss_scale_sensitivity (evaluation/checks.py) compares.
CE = "ce"  # cross-entropy: saturates with the logit scale
SCALE_FREE = "scale-free"  # untargeted PGD on a loss that does not saturate (C&W margin, DLR)
LOSSES = (None, CE, SCALE_FREE)

Params = dict[str, Any]
# (model, x, y, eps, resolved parameters) -> (x_adv, extra entries for the record)
Runner = Callable[..., "tuple[Any, Params]"]
# (the attack's parameter record) -> {"max_queries": ..., "text": "<= N queries per budget", ...}
QueryBudget = Callable[[Mapping[str, Any]], "dict[str, Any]"]


@dataclass(frozen=True)
class ParamRange:
    """The values one attack parameter takes: a type (int or float) and bounds; null always means the default."""

    type: type = float
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""

    def check(self, value: Any, key: str) -> None:
        """Raise ESQUserError (one line, naming `key`) when value is not of the type or out of range."""
        if value is None:
            return
        name = key.rsplit(".", 1)[-1]
        if not _is_type(value, self.type):
            raise ESQUserError(f"{key}: {show(value)} is not {_type_name(self.type)}; allowed: {self.allowed(name)}")
        bad = (
            isinstance(value, float)
            and not math.isfinite(value)
            or self.gt is not None
            and not value > self.gt
            or self.ge is not None
            and not value >= self.ge
            or self.lt is not None
            and not value < self.lt
            or self.le is not None
            and not value <= self.le
        )
        if bad:
            raise ESQUserError(f"{key}: {show(value)} is out of range; allowed: {self.allowed(name)}")

    def allowed(self, name: str) -> str:
        """`0 < step_size`, `1 <= steps (a note)`: what the error message says is allowed."""
        lo = f"{_num(self.gt)} < " if self.gt is not None else f"{_num(self.ge)} <= " if self.ge is not None else ""
        hi = f" < {_num(self.lt)}" if self.lt is not None else f" <= {_num(self.le)}" if self.le is not None else ""
        text = f"{lo}{name}{hi}" if lo or hi else _type_name(self.type)
        return f"{text} ({self.note})" if self.note else text


def count(ge: int = 1, note: str = "") -> ParamRange:
    """An integer count: steps, restarts, queries (at least `ge`)."""
    return ParamRange(int, ge=ge, note=note)


def positive(note: str = "") -> ParamRange:
    """A number above 0: a step size, a fraction of eps, a radius."""
    return ParamRange(float, gt=0, note=note)


@dataclass(frozen=True, kw_only=True)
class AttackSpec:
    """One named evaluation attack and everything the rest of the code needs to know about it.

    Call it with eps and parameters to get a ready Attack. Fields (keywords; family is required, the rest of
    the fields after description have defaults):
    - name, kind (budgeted / minimum-norm), norm (its default), library (esq_lightning, foolbox, pyautoattack),
      gradient_based, defaults (every parameter it takes, with its default), runner, description,
      default_eps (None: the threat model's eps for budgeted L_inf attacks);
    - family: single-step / iterative / adaptive / gradient-free, as the masking report and the checks use it;
    - loss: "ce", "scale-free" or None (what loss_scale_sensitivity compares);
    - nesting: its rank in the order of gradient attacks known to nest (0 a single step, 1 cross-entropy PGD,
      ordered further by steps x restarts, 2 an ensemble), None when it has no such order with the others;
    - title: its column header in esq-report and its name in the black-box legend (default: name);
    - query_budget: the model queries per input it may spend, from its parameter record (None: not counted);
    - plot_style: its matplotlib line style on the black-box curves;
    - ranges: parameter -> ParamRange, what the config check enforces (eps is checked for every attack).
    """

    name: str
    kind: str
    norm: str
    library: str
    gradient_based: bool
    defaults: dict[str, Any]
    runner: Runner
    description: str
    family: str
    default_eps: float | None = None
    loss: str | None = None
    nesting: int | None = None
    title: str = ""
    query_budget: QueryBudget | None = None
    plot_style: str = ":"
    ranges: Mapping[str, ParamRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"attack {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"an attack needs a name (a non-empty string), got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.family not in FAMILIES:
            raise ValueError(f"{where}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if (self.family == GRADIENT_FREE) == self.gradient_based:
            raise ValueError(f"{where}: family {self.family!r} contradicts gradient_based={self.gradient_based}")
        if self.loss not in LOSSES:
            raise ValueError(f"{where}: loss {self.loss!r} is not one of {', '.join(map(str, LOSSES))}")
        unknown = sorted(set(self.ranges) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"{where}: ranges for parameters it does not take: {unknown}; its parameters: {sorted(self.defaults)}"
            )
        if not self.title:
            object.__setattr__(self, "title", self.name)

    def __call__(self, eps: float | None = None, **params: Any) -> Attack:
        return Attack(self, eps, params)


# ---- running one attack: eval mode, frozen parameters, every parameter recorded -----------------------------

# Distribution name on the package index -> import name.
_PACKAGES = {"foolbox": "foolbox", "pyautoattack": "pyautoattack"}


@dataclass
class AttackOutput:
    """Result of one evaluation attack on a batch.

    x_adv: adversarial inputs (x where a minimum-norm attack failed or the input was misclassified).
    correct: the model is correct on the clean input and on x_adv within the budget eps; for
        minimum-norm attacks, clean-correct and (attack failed or found norm > eps); with eps None,
        clean-correct and attack failed.
    norms: per-sample perturbation norm in the attack's norm; minimum-norm attacks give inf where
        they failed and 0 where the clean input is already misclassified.
    params: every parameter used, json-able (attack, kind, norm, eps, steps, ..., library, version).
    clean_correct: the model is correct on the clean input.
    """

    x_adv: Tensor
    correct: Tensor
    norms: Tensor
    params: dict[str, Any]
    clean_correct: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


class Attack:
    """A configured attack: `attack(model, x, y) -> AttackOutput`."""

    def __init__(self, spec: AttackSpec, eps: float | None, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(spec.defaults))
        if unknown:
            raise ValueError(f"attack {spec.name!r} got unknown parameters {unknown}; valid: {sorted(spec.defaults)}")
        self.spec = spec
        self.params: dict[str, Any] = {**spec.defaults, **params}
        if "norm" in self.params:
            self.params["norm"] = canonical_norm(self.params["norm"])
        self.norm: str = self.params.get("norm", spec.norm)
        self.eps = spec.default_eps if eps is None else float(eps)
        if spec.kind == BUDGETED and self.eps is None:
            raise ValueError(f"attack {spec.name!r} is budgeted: give eps")
        if self.eps is not None and self.eps < 0:
            raise ValueError(f"eps must be non-negative, got {self.eps}")
        self.library_version = _require(spec.library, spec.name)

    def record(self, n_inputs: int) -> dict[str, Any]:
        """The json-able parameter record of this attack."""
        return {
            "attack": self.spec.name,
            "kind": self.spec.kind,
            "norm": self.norm,
            "eps": self.eps,
            **{k: v for k, v in self.params.items() if k != "norm"},
            "library": self.spec.library,
            "library_version": self.library_version,
            "torch_version": torch.__version__,
            "n_inputs": n_inputs,
        }

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackOutput:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("inputs must lie in [0, 1]: normalisation belongs inside the model")
        params = self.record(len(x))
        start = time.perf_counter()
        with grad_enabled(), frozen_eval(model), _seeded(self.params.get("seed", 0), x.device):
            # Plain tensors, also when called from Lightning's inference-mode validation.
            x, y = as_autograd_input(x), as_autograd_input(y)
            with torch.no_grad():
                clean_pred = _predict(model, x)
            clean_correct = clean_pred == y
            if self.spec.gradient_based and len(x):
                check_gradients(model, x, y)
            if self.spec.kind == MINIMUM_NORM:
                # Misclassified inputs need no search: they are adversarial at norm 0.
                idx = clean_correct.nonzero().squeeze(1)
                x_adv = x.clone()
                extra: dict[str, Any] = {}
                if idx.numel():
                    found, extra = self.spec.runner(model, x[idx], y[idx], self.eps, self.params)
                    x_adv[idx] = found.detach().to(x.dtype)
            else:
                x_adv, extra = self.spec.runner(model, x, y, self.eps, self.params)
                x_adv = x_adv.detach().to(x.dtype)
            _check_box(x_adv, self.spec.name)
            with torch.no_grad():
                adv_pred = _predict(model, x_adv)
            norms = perturbation_norms(x_adv, x, self.norm)
            if self.spec.kind == MINIMUM_NORM:
                fooled = adv_pred != y
                x_adv = torch.where(_per_sample(fooled, x), x_adv, x)
                norms = torch.where(fooled, norms, torch.full_like(norms, math.inf))
                norms = torch.where(clean_correct, norms, torch.zeros_like(norms))
                within = norms > self.eps if self.eps is not None else norms.isinf()
                correct = clean_correct & within
            else:
                _check_budget(norms, self.eps, self.spec.name)
                correct = clean_correct & (adv_pred == y)
        params.update(extra)
        params["runtime_s"] = round(time.perf_counter() - start, 3)
        return AttackOutput(
            x_adv=x_adv.detach(),
            correct=correct,
            norms=norms.detach(),
            params=params,
            clean_correct=clean_correct,
        )


def _check_box(x_adv: Tensor, name: str) -> None:
    if x_adv.numel() and (x_adv.min() < 0 or x_adv.max() > 1 or not torch.isfinite(x_adv).all()):
        raise RuntimeError(f"attack {name!r} returned inputs outside [0, 1]")


def _check_budget(norms: Tensor, eps: float | None, name: str) -> None:
    # A float32 clamp can land one ulp outside the ball: tolerate that, nothing more.
    if eps is not None and norms.numel() and norms.max() > eps * (1 + 1e-5) + 1e-6:
        raise RuntimeError(f"attack {name!r} exceeded its budget: max norm {norms.max().item():.6g} > eps {eps}")


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs the libraries draw from, and leave the caller's RNG state untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _require(library: str, attack: str) -> str:
    """Import a library lazily; return its version or raise a one-line install hint."""
    if library == "esq_lightning":
        return __version__
    try:
        with warnings.catch_warnings():
            # foolbox 3.3.4 imports scipy.ndimage.filters, deprecated in scipy 1.x.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(_PACKAGES.get(library, library))
    except ImportError:
        raise ImportError(
            f"attack {attack!r} needs the package {library}: pip install 'esq-lightning[attacks]'"
        ) from None
    return str(getattr(module, "__version__", "unknown"))


# ---- the one-line error format of the config check ---------------------------------------------------------
show = show_value  # values as a config writes them (esq_lightning.errors)


def _is_type(value: Any, tp: type) -> bool:
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, tp.__name__)


def _num(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else str(v)
