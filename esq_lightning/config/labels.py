"""Setting labels (NF, NVB, NEB, AAT, EB, ...) derived from what a run does, in the paper's scheme.

A full-precision run is `<method>F`: NF (natural), AF (adversarial). A quantized run is
`<start><method><quantizer>`: the start is the method letter of the checkpoint it started from (N or A;
nothing from scratch), the method is V (vanilla SQ: natural), E (error-silenced) or A (adversarial), and the
quantizer is its family's letter (config/quantizers.py): B (BWN), T (TWN) or U<bits> (uniform k-bit). A
full-precision run that has a start keeps it (AVF, AAF, AEF: the 32-bit points of a bit-width sweep), so it
never passes for an NF / AF start. Methods without a letter (alp, trades) appear by name, the parts then
joined with `-`: `A-TRADES-B`, `ALP-F`.

The start letter of a run's init_from is read from the start run (artifacts/setting.py, which also resolves
`${esq_setting:}`). The label is the `setting` of the composed config (`${esq_setting:}` in conf/train.yaml), so the run
directory, results.json, the W&B group and tags and esq-report's rows all carry it; it is never copied
from a preset, so a sweep over `method` or `quant` cannot put a run in another setting's row.
"""

from __future__ import annotations

from typing import Any

from esq_lightning.config.quantizers import QUANTIZER_SPECS

# The letter of a full-precision run's method (also what a quantized run that starts from it writes first).
START_LETTER = {"natural": "N", "adversarial": "A"}
# The letter of a quantized run's method.
METHOD_LETTER = {"natural": "V", "esq": "E", "adversarial": "A"}
FULL = "F"
# The start of a run whose init_from checkpoint says nothing about how it was trained.
UNKNOWN_START = "X"


def is_full_precision(quant_kind: str | None, bits: int | None = None) -> bool:
    return quant_kind in (None, "full") or (bits is not None and int(bits) >= 32)


def quant_code(quant_kind: str, bits: int | None) -> str:
    """The family's letter (B BWN, T TWN, U<bits> uniform k-bit); a kind no family has: its name with its width."""
    spec = QUANTIZER_SPECS.get(quant_kind)
    if spec is not None:
        return spec.label_code(bits)
    return quant_kind.upper() + str(int(bits) if bits is not None else "")


def derive_setting(method: str, quant_kind: str | None, bits: int | None = None, start: str | None = None) -> str:
    """The setting label of a run: `derive_setting("esq", "bwn", 1, "N") == "NEB"`."""
    code = METHOD_LETTER.get(method)
    if is_full_precision(quant_kind, bits):
        if start is None:
            # The starts NF and AF; an error-silenced full-precision run from scratch is EF.
            letter = START_LETTER.get(method) or code
            return f"{letter}{FULL}" if letter else f"{method.upper()}-{FULL}"
        last = FULL
    else:
        last = quant_code(str(quant_kind), bits)
    # A full-precision run from a start (a fine-tune, the 32-bit point of a bit-width sweep) keeps its start,
    # so it can never pass for the NF / AF start itself: AVF, AAF, AEF.
    if code is None:
        return "-".join(p for p in (start, method.upper(), last) if p)
    return f"{start or ''}{code}{last}"


def start_from_setting(label: str) -> str:
    """What a run started from a run of setting `label` writes first: N for NF, A for AF, the label otherwise."""
    if label in (f"{v}{FULL}" for v in START_LETTER.values()):
        return label[: -len(FULL)]
    if label.endswith(f"-{FULL}"):
        return label[: -len(FULL) - 1]
    return label


# Suffixes of the compression beyond one bit width (docs/compression.md): pruned by magnitude / HYDRA, mixed precision.
PRUNE_SUFFIX = {"magnitude": "PM", "hydra": "PH"}
MIXED_SUFFIX = "MP"


def compression_suffix(config: Any) -> str:
    """`-PH`, `-PM` (pruned), `-MP` (bits per layer), joined: AAF-PH, AEB-MP, AEU4-PH; '' for neither."""
    prune = config.get("prune") or {}
    quant = config["quant"]
    parts = [PRUNE_SUFFIX[str(prune.get("method"))]] if prune.get("method") in PRUNE_SUFFIX else []
    if quant.get("layer_bits") or quant.get("first_last_bits") is not None or quant.get("budget_bytes") is not None:
        parts.append(MIXED_SUFFIX)
    return "".join(f"-{p}" for p in parts)


def setting_of_config(config: Any, start: str | None) -> str:
    method = str(config["method"]["name"])
    quant = config["quant"]
    return derive_setting(method, quant.get("kind"), quant.get("bits"), start) + compression_suffix(config)
