"""The quantizer families, one entry each, and their registry: torch-free.

A family (`bwn`, `twn`, `uniform`, or one a user registers) is ONE `QuantizerSpec`. Everything the
package knows about it is read from that entry:

- its math: `codes`, the function that maps a weight to (int8 codes, one scale per row); the weight is
  scale * code (quant/functional.py `dequantize`), in training, in evaluation and after a packed reload;
- its code values: the integers `codes` may emit at each width, ascending. The packed format
  (quant/packing.py) stores a code as its index in that tuple, in `bits` bits, and decodes an index
  back to the value;
- its bit widths (`widths`) and the widths where `quant.bits` alone picks it (`default_for`);
- its letter in setting labels (config/labels.py: B, T, U<bits>) and its words in reports and writers
  (evaluation/robustbench.py's footnote).

The split: this module holds the entries and imports no torch, so config/labels.py, the config schema
and the resolvers read the names, widths, letters and texts before torch is imported. The math is bound
in quant/: `codes` is either the function itself or its "module:function" path, which quant/ imports
on first use (the built-in families name functions in esq_lightning/quant/functional.py that way).

Adding a quantizer: `register_quantizer(QuantizerSpec(...))` (or one more entry in BUILTIN_QUANTIZERS);
no other file changes. tests/test_quantizer_entry.py registers a toy family and follows it through
training, packed export and reload, its label and the RobustBench text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "FULL_BITS",
    "UNIFORM_BITS",
    "MAX_PACKED_BITS",
    "QuantizerSpec",
    "BUILTIN_QUANTIZERS",
    "QUANTIZER_SPECS",
    "QUANT_FAMILIES",
    "QUANT_DEFAULT_KIND",
    "QUANT_BITS",
    "quant_widths",
    "quantizer_spec",
    "register_quantizer",
    "unregister_quantizer",
    "symmetric_levels",
]

FULL_BITS = 32
# Widths of the symmetric uniform quantizer: 2 bits is {-1, 0, +1} * s, 8 bits fills an int8.
UNIFORM_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
# The packed format stores a code's index in at most one byte.
MAX_PACKED_BITS = 8
# Kinds that are not families: full precision, and the kind that lets quant.bits choose.
_RESERVED = ("full", "auto")


@dataclass(frozen=True)
class QuantizerSpec:
    """One quantizer family: its math, code values, widths, label letter and report text (see the module doc).

    name: the `quant.kind` value. widths: the bit widths it is defined for (each <= 8). default_for: the
    widths at which `quant.bits` alone picks this family (no two families share one). letter: the
    quantizer's part of a setting label; a family with more than one width writes its width after it
    (U4). text: what reports and writers say for it (the RobustBench footnote). codes: the function
    ``codes(w, per_filter=..., bits=...) -> (int8 codes [rows, d], scale [rows])``, rows = output filters
    (per_filter) or 1, or its "module:function" path. code_values: ``bits -> the integer codes``, ascending,
    at most 2^bits of them, each in int8. description: the math in one line, for docs and --help.
    """

    name: str
    widths: tuple[int, ...]
    letter: str
    text: str
    codes: str | Callable[..., Any] = field(repr=False)
    code_values: Callable[[int], tuple[int, ...]] = field(repr=False)
    default_for: tuple[int, ...] = ()
    description: str = ""

    def label_code(self, bits: int | None) -> str:
        """The quantizer's part of a setting label: the letter, plus the width for a family of several widths."""
        if len(self.widths) == 1 or bits is None:
            return self.letter
        return f"{self.letter}{int(bits)}"

    def values(self, bits: int) -> tuple[int, ...]:
        """code_values(bits) as a tuple, after the width is checked."""
        if int(bits) not in self.widths:
            raise ValueError(f"{self.name} quantizer bits {bits!r}; allowed: {', '.join(map(str, self.widths))}")
        return tuple(int(v) for v in self.code_values(int(bits)))


def symmetric_levels(bits: int) -> tuple[int, ...]:
    """-L..L with L = 2^(bits-1) - 1: the codes of the symmetric uniform quantizer."""
    levels = 2 ** (int(bits) - 1) - 1
    return tuple(range(-levels, levels + 1))


BUILTIN_QUANTIZERS: tuple[QuantizerSpec, ...] = (
    QuantizerSpec(
        name="bwn",
        widths=(1,),
        default_for=(1,),
        letter="B",
        text="binary weights (BWN, 1 bit)",
        codes="esq_lightning.quant.functional:bwn_codes",
        code_values=lambda bits: (-1, 1),
        description="alpha_i * sign(W_i), alpha_i = mean |W_i| per output filter",
    ),
    QuantizerSpec(
        name="twn",
        widths=(2,),
        default_for=(2,),
        letter="T",
        text="ternary weights (TWN, 2 bits)",
        codes="esq_lightning.quant.functional:twn_codes",
        code_values=lambda bits: (-1, 0, 1),
        description="alpha_i * {-1, 0, +1}, threshold 0.7 * mean |W_i|, alpha_i = mean |W_ij| above it",
    ),
    QuantizerSpec(
        name="uniform",
        widths=UNIFORM_BITS,
        default_for=tuple(b for b in UNIFORM_BITS if b > 2),
        letter="U",
        # The RobustBench footnote has always named this family by its kind.
        text="uniform",
        codes="esq_lightning.quant.functional:uniform_codes",
        code_values=symmetric_levels,
        description="s_i * c, c in -L..L (L = 2^(bits-1) - 1), s_i the least-squares scale per output filter",
    ),
)

_SPECS: dict[str, QuantizerSpec] = {}
# Derived tables, kept in step with _SPECS by _rebuild and served read-only (the proxies below are live views).
_FAMILIES: dict[str, tuple[int, ...]] = {}
_DEFAULT_KIND: dict[int, str] = {}
_BITS: dict[str, tuple[int, ...]] = {}

# name -> QuantizerSpec, in registration order.
QUANTIZER_SPECS: Mapping[str, QuantizerSpec] = MappingProxyType(_SPECS)
# Family -> the bit widths it is defined for.
QUANT_FAMILIES: Mapping[str, tuple[int, ...]] = MappingProxyType(_FAMILIES)
# The family `quant.bits` picks on its own (1 bwn, 2 twn, 3-8 uniform); FULL_BITS is full precision.
QUANT_DEFAULT_KIND: Mapping[int, str] = MappingProxyType(_DEFAULT_KIND)
# quant.kind -> its widths, `full` included (what a config may name).
QUANT_BITS: Mapping[str, tuple[int, ...]] = MappingProxyType(_BITS)


def _rebuild() -> None:
    _FAMILIES.clear()
    _FAMILIES.update({name: spec.widths for name, spec in _SPECS.items()})
    defaults = {b: name for name, spec in _SPECS.items() for b in spec.default_for}
    _DEFAULT_KIND.clear()
    _DEFAULT_KIND.update(sorted(defaults.items()))
    _BITS.clear()
    _BITS.update({**_FAMILIES, "full": (FULL_BITS,)})


def quant_widths() -> tuple[int, ...]:
    """Every width `quant.bits` may take: each family's, ascending, then FULL_BITS."""
    return (*sorted({b for spec in _SPECS.values() for b in spec.widths}), FULL_BITS)


def quantizer_spec(kind: str) -> QuantizerSpec:
    """The registered family `kind`; ValueError naming the registered ones otherwise."""
    spec = _SPECS.get(str(kind))
    if spec is None:
        raise ValueError(f"unknown quantizer kind {kind!r}; allowed: {', '.join(_SPECS)}")
    return spec


def _check_spec(spec: QuantizerSpec) -> None:
    where = f"quantizer {spec.name!r}"
    if not spec.name or not spec.name.isidentifier() or spec.name in _RESERVED:
        raise ValueError(f"{where}: the name must be an identifier other than {', '.join(_RESERVED)}")
    if spec.name in _SPECS:
        raise ValueError(f"{where} is already registered")
    if not spec.widths or any(not isinstance(b, int) or not 1 <= b <= MAX_PACKED_BITS for b in spec.widths):
        raise ValueError(f"{where}: widths {spec.widths!r} must be integers in 1..{MAX_PACKED_BITS}")
    if not set(spec.default_for) <= set(spec.widths):
        raise ValueError(f"{where}: default_for {spec.default_for!r} is not among its widths {spec.widths!r}")
    taken = {b: name for name, other in _SPECS.items() for b in other.default_for}
    for b in spec.default_for:
        if b in taken:
            raise ValueError(f"{where}: quant.bits={b} already picks {taken[b]}")
    letters = {other.letter: name for name, other in _SPECS.items()}
    if not spec.letter or not spec.letter.isalpha() or spec.letter == "F" or spec.letter in letters:
        raise ValueError(
            f"{where}: letter {spec.letter!r} must be letters, not F (full precision) and not taken "
            f"(taken: {', '.join(f'{k} {v}' for k, v in letters.items())})"
        )
    if not (callable(spec.codes) or (isinstance(spec.codes, str) and ":" in spec.codes)):
        raise ValueError(f"{where}: codes must be a function or a 'module:function' path")
    for b in spec.widths:
        values = tuple(spec.code_values(b))
        if (
            not values
            or list(values) != sorted(set(values))
            or len(values) > 2**b
            or any(not isinstance(v, int) or not -128 <= v <= 127 for v in values)
        ):
            raise ValueError(
                f"{where}: code_values({b}) must be at most {2**b} distinct ascending int8 integers, got {values!r}"
            )


def register_quantizer(spec: QuantizerSpec) -> QuantizerSpec:
    """Add a family; from then on configs, layers, export, labels and writers know it. Returns ``spec``."""
    _check_spec(spec)
    _SPECS[spec.name] = spec
    _rebuild()
    return spec


def unregister_quantizer(name: str) -> None:
    """Remove a family added by register_quantizer (a test's cleanup); the built-in ones stay."""
    if name in (spec.name for spec in BUILTIN_QUANTIZERS):
        raise ValueError(f"quantizer {name!r} is built in and cannot be removed")
    quantizer_spec(name)
    del _SPECS[name]
    _rebuild()


for _spec in BUILTIN_QUANTIZERS:
    register_quantizer(_spec)
del _spec
