"""The threat model of an evaluation decides every L_inf budget.

eval.eps is the eps of every L_inf attack; PGD step sizes are fractions of it (the registry's step_fraction,
eps / 4 by default: 2/255 at 8/255); FGSM runs at eval.fgsm_factor x eps, by default the dataset's stated
ratio data.attack.fgsm_eps / data.attack.eps (the paper's 2x on CIFAR, 1x on digits). An attack given its own
eval.params.<name>.eps is its own threat model: it gets its own column header and never enters the worst case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    getter = getattr(node, "get", None)
    return getter(key, default) if getter is not None else default


def fgsm_factor(cfg: Any) -> float:
    """FGSM's eps as a multiple of eval.eps: eval.fgsm_factor, else data.attack.fgsm_eps / data.attack.eps."""
    ev = _get(cfg, "eval")
    factor = _get(ev, "fgsm_factor")
    if factor is not None:
        return float(factor)
    attack = _get(_get(cfg, "data"), "attack")
    eps, fgsm_eps = _get(attack, "eps"), _get(attack, "fgsm_eps")
    if eps and fgsm_eps:
        return float(fgsm_eps) / float(eps)
    return 1.0


def threat_model(cfg: Any, attacks: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """{"norm", "eps", "fgsm_eps"} of a run: what results.json states next to its numbers."""
    ev = _get(cfg, "eval")
    eps = float(_get(ev, "eps"))
    out: dict[str, Any] = {"norm": _get(ev, "norm", "linf"), "eps": eps}
    fgsm = (attacks or {}).get("fgsm")
    out["fgsm_eps"] = float(fgsm["eps"]) if fgsm and fgsm.get("eps") is not None else eps * fgsm_factor(cfg)
    return out


@dataclass(frozen=True)
class ThreatModel:
    """What an evaluation's numbers are robust against: the norm, the eps of every attack of that norm, and
    FGSM's eps as a multiple of it (an attack given its own eval.params.<name>.eps is its own threat model)."""

    norm: str
    eps: float
    fgsm_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> ThreatModel:
        """The threat model of a run's (or an evaluation's merged) config: eval.norm, eval.eps, fgsm_factor(cfg)."""
        ev = _get(cfg, "eval")
        return cls(norm=str(_get(ev, "norm", "linf")), eps=float(_get(ev, "eps")), fgsm_factor=fgsm_factor(cfg))
