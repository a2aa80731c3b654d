"""What the code knows about one evaluation attack, in one place: the AttackSpec.

Everything outside the attack itself reads these fields from the registry (attacks/registry.py): the
masking report and the checks its family and loss, esq-report and the black-box legends its title,
the black-box curves its query budget and line style, the config check its parameter ranges.
Adding an attack is one AttackSpec entry plus its runner (docs/attacks.md, "Adding an attack").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from esq_lightning.errors import show_value

if TYPE_CHECKING:
    from esq_lightning.attacks.registry import Attack

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
    "AttackSpec",
    "ParamRange",
]

# kind: what the attack answers.
BUDGETED = "budgeted"          # the best x_adv within eps
MINIMUM_NORM = "minimum-norm"  # the smallest perturbation that fools the model (accuracy read at any budget)
KINDS = (BUDGETED, MINIMUM_NORM)

# family: what the attack uses of the model, as the gradient-masking report (evaluation/masking.py) and the
# checks (evaluation/checks.py) compare attacks.
SINGLE_STEP = "single-step"      # one gradient step (FGSM): should never beat an iterative attack
ITERATIVE = "iterative"          # iterative gradient attacks the masking report compares (CE PGD, AutoAttack, DDN, C&W)
ADAPTIVE = "adaptive"            # iterative gradient attacks on a loss of their own (margin, DLR, targeted, pairing):
                                 # they nest with no other attack, so the masking report leaves them out
GRADIENT_FREE = "gradient-free"  # score- or decision-based: never look at a gradient
FAMILIES = (SINGLE_STEP, ITERATIVE, ADAPTIVE, GRADIENT_FREE)

# loss: what loss_scale_sensitivity (evaluation/checks.py) compares.
CE = "ce"                  # cross-entropy: saturates with the logit scale
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
        from esq_lightning.errors import ESQUserError

        if value is None:
            return
        name = key.rsplit(".", 1)[-1]
        if not _is_type(value, self.type):
            raise ESQUserError(f"{key}: {show(value)} is not {_type_name(self.type)}; allowed: {self.allowed(name)}")
        bad = (isinstance(value, float) and not math.isfinite(value)
               or self.gt is not None and not value > self.gt or self.ge is not None and not value >= self.ge
               or self.lt is not None and not value < self.lt or self.le is not None and not value <= self.le)
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
            raise ValueError(f"{where}: ranges for parameters it does not take: {unknown}; "
                             f"its parameters: {sorted(self.defaults)}")
        if not self.title:
            object.__setattr__(self, "title", self.name)

    def __call__(self, eps: float | None = None, **params: Any) -> Attack:
        from esq_lightning.attacks.registry import Attack

        return Attack(self, eps, params)


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
