"""OmegaConf resolvers used by the configs (${esq_setting:}, which reads the start run, is artifacts/setting.py's)."""

from __future__ import annotations

from omegaconf import OmegaConf

from esq_lightning.config.quantizers import FULL_BITS, QUANT_DEFAULT_KIND


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("int_mul"):
        # ${int_mul:${trainer.max_epochs},0.5} -> int(max_epochs * 0.5), for scheduler milestones.
        OmegaConf.register_new_resolver("int_mul", lambda a, b: int(float(a) * float(b)))
    if not OmegaConf.has_resolver("mul"):
        # ${mul:1.25,${.eps}} -> 1.25 * eps: the step sizes of conf/attack/*.yaml follow callbacks.pgd.eps.
        OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b))
    if not OmegaConf.has_resolver("eval_frac"):
        # ${eval_frac:8/255} -> 0.031372..., so configs can state eps as the fraction papers use.
        OmegaConf.register_new_resolver("eval_frac", _frac)
    if not OmegaConf.has_resolver("quant_kind"):
        # ${quant_kind:${.bits}} -> bwn (1), twn (2), uniform (3-8), full (32): conf/quant/default.yaml.
        OmegaConf.register_new_resolver("quant_kind", _quant_kind)
    if not OmegaConf.has_resolver("pick"):
        # ${pick:${budget},1,2,4} -> the value at index `budget`: a compression preset's knob at a budget level
        # (conf/compress/*.yaml); an index past the list is refused by name.
        OmegaConf.register_new_resolver("pick", _pick)


def _pick(index: object, *values: object) -> object:
    if len(values) == 1 and isinstance(values[0], (list, tuple)) or type(values[0]).__name__ == "ListConfig":
        values = tuple(values[0])  # type: ignore[arg-type]
    i = int(index)  # type: ignore[call-overload]
    if not 0 <= i < len(values):
        from esq_lightning.errors import ESQUserError

        raise ESQUserError(f"budget: {index} has no value in this compression preset; allowed: 0..{len(values) - 1}")
    return values[i]


def _frac(text: str) -> float:
    num, _, den = str(text).partition("/")
    return float(num) / float(den) if den else float(num)


def _quant_kind(bits: object) -> str:
    # An unknown width resolves to uniform, so the schema's check of quant.bits names the allowed widths.
    try:
        return "full" if int(bits) == FULL_BITS else QUANT_DEFAULT_KIND.get(int(bits), "uniform")
    except (TypeError, ValueError):
        return "uniform"


register_resolvers()
