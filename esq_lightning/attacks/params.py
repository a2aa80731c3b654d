"""The config check of attack names and per-attack parameters against the attack table (config/schema.py's
second phase calls these through esq_lightning.attacks): one ESQUserError line naming the key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esq_lightning.attacks.registry import ATTACKS
from esq_lightning.attacks.spec import ParamRange, positive, show
from esq_lightning.errors import ESQUserError, did_you_mean

__all__ = ["check_attack_names", "check_attack_params"]


def check_attack_names(names: list[Any], key: str) -> None:
    """Every name is a registered attack; else ESQUserError naming the key (and its index in a list)."""
    allowed = list(ATTACKS)
    for i, name in enumerate(names):
        if name not in ATTACKS:
            where = f"{key}[{i}]" if len(names) > 1 or key.endswith("attacks") else key
            raise ESQUserError(
                f"{where}: {show(name)} is not an attack{did_you_mean(str(name), allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )


def check_attack_params(params: Any, key: str, budgeted: bool = True) -> None:
    """Per-attack parameters (a mapping attack -> parameters, a DictConfig or a dict): known attacks, parameters
    their spec takes, values within the spec's ranges. `budgeted=False` (black-box curves) refuses eps, which
    the budgets give. The first problem raises ESQUserError (one line, naming the key)."""
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise ESQUserError(f"{key}: {show(params)} is not a mapping; allowed: attack name -> parameters")
    names = list(ATTACKS)
    for name in params:
        pkey = f"{key}.{name}"
        if name not in ATTACKS:
            raise ESQUserError(
                f"{pkey}: {str(name)!r} is not an attack{did_you_mean(str(name), names)}; allowed: {', '.join(names)}"
            )
        spec = ATTACKS[str(name)]
        entry = _value(params, str(name), key)
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            raise ESQUserError(f"{pkey}: {show(entry)} is not a mapping; allowed: parameters of {name}")
        allowed = ["eps", *spec.defaults] if budgeted else list(spec.defaults)
        for p in entry:
            p = str(p)
            if p not in allowed:
                raise ESQUserError(
                    f"{pkey}.{p}: unknown parameter of {name}{did_you_mean(p, allowed)}; allowed: {', '.join(allowed)}"
                )
            value = _value(entry, p, pkey)
            rule = spec.ranges.get(p)
            if p == "eps":
                norm = _value(entry, "norm", pkey) if "norm" in entry else spec.norm
                rule = (
                    ParamRange(float, gt=0, le=1, note="an L_inf radius within the input range [0, 1]")
                    if str(norm).lower() in ("linf", "inf")
                    else positive()
                )
            # null: the attack's default (eps from the threat model, step_size from step_fraction x eps)
            if rule is not None:
                rule.check(value, f"{pkey}.{p}")


def _value(node: Mapping[str, Any], sub: str, key: str) -> Any:
    """node[sub], resolved; a missing value or an interpolation that cannot resolve is a user error naming the key."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = f"{key}.{sub}" if key else sub
    if isinstance(node, DictConfig) and OmegaConf.is_missing(node, sub):
        raise ESQUserError(f"{where}: missing; it must be set")
    try:
        return node[sub]
    except OmegaConfBaseException as exc:
        text = str(exc).strip()
        raise ESQUserError(
            f"{where}: cannot resolve its value: {text.splitlines()[0] if text else type(exc).__name__}"
        ) from None
