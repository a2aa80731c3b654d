"""OmegaConf resolvers used by the configs (${esq_setting:}, which reads the start run, is artifacts/setting.py's)."""

from __future__ import annotations

from omegaconf import OmegaConf

from esq_lightning.config.quantizers import FULL_BITS, QUANT_DEFAULT_KIND


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("int_mul"):
        # ${int_mul:${trainer.max_epochs},0.5} -> int(max_epochs * 0.5), for scheduler milestones.
        OmegaConf.register_new_resolver("int_mul", lambda a, b: int(float(a) * float(b)))
    if not OmegaConf.has_resolver("eval_frac"):
        # ${eval_frac:8/255} -> 0.031372..., so configs can state eps as the fraction papers use.
        OmegaConf.register_new_resolver("eval_frac", _frac)
    if not OmegaConf.has_resolver("quant_kind"):
        # ${quant_kind:${.bits}} -> bwn (1), twn (2), uniform (3-8), full (32): conf/quant/default.yaml.
        OmegaConf.register_new_resolver("quant_kind", _quant_kind)


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
