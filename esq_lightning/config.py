"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

from omegaconf import OmegaConf


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("int_mul"):
        # ${int_mul:${trainer.max_epochs},0.5} -> int(max_epochs * 0.5), for scheduler milestones.
        OmegaConf.register_new_resolver("int_mul", lambda a, b: int(float(a) * float(b)))
    if not OmegaConf.has_resolver("eval_frac"):
        # ${eval_frac:8/255} -> 0.031372..., so configs can state eps as the fraction papers use.
        OmegaConf.register_new_resolver("eval_frac", _frac)


def _frac(text: str) -> float:
    num, _, den = str(text).partition("/")
    return float(num) / float(den) if den else float(num)


register_resolvers()
