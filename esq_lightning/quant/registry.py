"""The quantizers by family and bit width: one place to look a quantizer up (`get`) and to list them all.

A quantizer is a family (`bwn`, `twn`, `uniform`) at one bit width. `quant.bits` alone picks the
default family of its width (1 bwn, 2 twn, 3-8 uniform, 32 full precision); `quant.kind` picks
another family where one exists for that width (uniform at 2 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from esq_lightning.config.choices import FULL_BITS, QUANT_DEFAULT_KIND, QUANT_FAMILIES

from .functional import dequantize, quantize_codes, uniform_levels

__all__ = ["FAMILIES", "FULL_BITS", "QUANTIZERS", "Quantizer", "default_kind", "get", "resolve_kind"]

# Family -> the bit widths it is defined for, and the family of each width (esq_lightning/config/choices.py).
FAMILIES: dict[str, tuple[int, ...]] = QUANT_FAMILIES
_DEFAULT_KIND: dict[int, str] = QUANT_DEFAULT_KIND


@dataclass(frozen=True)
class Quantizer:
    """One weight quantizer: ``codes`` gives (int8 codes, one scale per row), ``__call__`` the weights."""

    kind: str
    bits: int

    @property
    def name(self) -> str:
        """`bwn`, `twn` or `uniform<bits>` (e.g. uniform4): unique over the registry."""
        return self.kind if self.kind in ("bwn", "twn") else f"{self.kind}{self.bits}"

    @property
    def code_values(self) -> tuple[int, ...]:
        """Every integer code the quantizer can emit (the levels, before the scale)."""
        if self.kind == "bwn":
            return (-1, 1)
        if self.kind == "twn":
            return (-1, 0, 1)
        n = uniform_levels(self.bits)
        return tuple(range(-n, n + 1))

    def codes(self, w: Tensor, per_filter: bool = True) -> tuple[Tensor, Tensor]:
        """(codes, scale): codes [O, d] (per filter) or [1, O*d], one scale per row."""
        return quantize_codes(w, self.kind, per_filter, self.bits)

    def __call__(self, w: Tensor, per_filter: bool = True) -> Tensor:
        codes, scale = self.codes(w, per_filter)
        return dequantize(codes, scale, w.shape)


QUANTIZERS: tuple[Quantizer, ...] = tuple(Quantizer(k, b) for k, widths in FAMILIES.items() for b in widths)


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
