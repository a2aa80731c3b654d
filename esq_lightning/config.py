"""OmegaConf resolvers used by the configs."""

from __future__ import annotations

from omegaconf import OmegaConf


def _quant_kind(bits: object) -> str:
    from esq_lightning.schema import QUANT_DEFAULT_KIND

    # An unknown width resolves to uniform, so the schema's check of quant.bits names the allowed widths.
    try:
        return QUANT_DEFAULT_KIND.get(int(bits), "uniform")  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "uniform"


def _quant_tag(kind: str, bits: object) -> str:
    return {"bwn": "B", "twn": "T", "full": "F"}.get(str(kind), f"U{bits}")


def _method_tag(name: str) -> str:
    return {"natural": "V", "adversarial": "A", "esq": "E"}.get(str(name), str(name))


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
    if not OmegaConf.has_resolver("quant_tag"):
        # ${quant_tag:${quant.kind},${quant.bits}} -> the setting letter: B, T, F, or U<bits> (uniform).
        OmegaConf.register_new_resolver("quant_tag", _quant_tag)
    if not OmegaConf.has_resolver("method_tag"):
        # ${method_tag:${method.name}} -> the paper's training letter in quantization: V, A, E (others: the name).
        OmegaConf.register_new_resolver("method_tag", _method_tag)


def _frac(text: str) -> float:
    num, _, den = str(text).partition("/")
    return float(num) / float(den) if den else float(num)


def _quant_kind(bits: object) -> str:
    from esq_lightning.schema import QUANT_DEFAULT_KIND

    # An unknown width resolves to uniform, so the schema's check of quant.bits names the allowed widths.
    try:
        return QUANT_DEFAULT_KIND.get(int(bits), "uniform")  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "uniform"


def _quant_tag(kind: str, bits: object) -> str:
    return {"bwn": "B", "twn": "T", "full": "F"}.get(str(kind), f"U{bits}")


def _method_tag(name: str) -> str:
    return {"natural": "V", "adversarial": "A", "esq": "E"}.get(str(name), str(name))


register_resolvers()
