"""The quantizers by family and bit width: one place to look a quantizer up (`get`) and to list them all.

A quantizer is a family (`bwn`, `twn`, `uniform`, or one registered with register_quantizer) at one
bit width. Each family is one entry, a QuantizerSpec (esq_lightning/config/quantizers.py): this module
binds the entry to torch and reads everything else from it. `quant.bits` alone picks the default family
of its width (1 bwn, 2 twn, 3-8 uniform, 32 full precision); `quant.kind` picks another family where one
exists for that width (uniform at 2 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from esq_lightning.config.choices import FULL_BITS, QUANT_DEFAULT_KIND, QUANT_FAMILIES
from esq_lightning.config.quantizers import (
    QUANTIZER_SPECS,
    QuantizerSpec,
    quantizer_spec,
    register_quantizer,
    unregister_quantizer,
)

from .functional import dequantize, quantize_codes

__all__ = [
    "FAMILIES",
    "FULL_BITS",
    "QUANTIZERS",
    "Quantizer",
    "QuantizerSpec",
    "default_kind",
    "get",
    "quantizers",
    "register_quantizer",
    "resolve_kind",
    "unregister_quantizer",
]

# Family -> the bit widths it is defined for, and the family of each width: live views of the entries.
FAMILIES = QUANT_FAMILIES
_DEFAULT_KIND = QUANT_DEFAULT_KIND


@dataclass(frozen=True)
class Quantizer:
    """One weight quantizer: ``codes`` gives (int8 codes, one scale per row), ``__call__`` the weights."""

    kind: str
    bits: int

    @property
    def spec(self) -> QuantizerSpec:
        """The family's entry: math, code values, widths, label letter, report text."""
        return quantizer_spec(self.kind)

    @property
    def name(self) -> str:
        """The kind for a family of one width (`bwn`, `twn`), else kind and width (`uniform4`): unique."""
        return self.kind if len(self.spec.widths) == 1 else f"{self.kind}{self.bits}"

    @property
    def code_values(self) -> tuple[int, ...]:
        """Every integer code the quantizer can emit (the levels, before the scale), ascending."""
        return self.spec.values(self.bits)

    def codes(self, w: Tensor, per_filter: bool = True, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(codes, scale): codes [O, d] (per filter) or [1, O*d], one scale per row; ``mask``: kept weights only."""
        return quantize_codes(w, self.kind, per_filter, self.bits, mask)

    def __call__(self, w: Tensor, per_filter: bool = True, mask: Tensor | None = None) -> Tensor:
        codes, scale = self.codes(w, per_filter, mask)
        return dequantize(codes, scale, w.shape)


def quantizers() -> tuple[Quantizer, ...]:
    """Every registered family at each of its widths, in registration order."""
    return tuple(Quantizer(k, b) for k, spec in QUANTIZER_SPECS.items() for b in spec.widths)


# The built-in quantizers (those registered at import); quantizers() includes any registered later.
QUANTIZERS: tuple[Quantizer, ...] = quantizers()


def default_kind(bits: int) -> str:
    """The family `quant.bits` picks on its own: 1 bwn, 2 twn, 3-8 uniform, 32 full."""
    if int(bits) == FULL_BITS:
        return "full"
    if int(bits) not in _DEFAULT_KIND:
        raise ValueError(f"no quantizer for {bits} bits; allowed: {', '.join(map(str, [*_DEFAULT_KIND, FULL_BITS]))}")
    return _DEFAULT_KIND[int(bits)]


def resolve_kind(kind: str | None, bits: int | None) -> tuple[str, int]:
    """(kind, bits) made concrete and checked: kind None/"auto" takes default_kind(bits); bits None the family's only width."""
    if kind in (None, "auto"):
        if bits is None:
            raise ValueError("a quantizer needs a kind or bits")
        return default_kind(bits), int(bits)
    if kind == "full":
        if bits not in (None, FULL_BITS):
            raise ValueError(f"kind full is {FULL_BITS} bits, not {bits}")
        return "full", FULL_BITS
    if kind not in FAMILIES:
        raise ValueError(f"unknown quantizer kind {kind!r}; allowed: {', '.join([*FAMILIES, 'full'])}")
    widths = FAMILIES[kind]
    if bits is None:
        if len(widths) != 1:
            raise ValueError(f"quantizer kind {kind} needs bits; allowed: {', '.join(map(str, widths))}")
        bits = widths[0]
    if int(bits) not in widths:
        raise ValueError(f"quantizer kind {kind} has no {bits}-bit form; allowed: {', '.join(map(str, widths))}")
    return kind, int(bits)


def get(kind: str | None, bits: int | None = None) -> Quantizer:
    """The quantizer of ``kind`` at ``bits`` (see resolve_kind); ValueError for full precision or a bad pair."""
    kind, bits = resolve_kind(kind, bits)
    if kind == "full":
        raise ValueError("full precision has no quantizer")
    return Quantizer(kind, bits)
