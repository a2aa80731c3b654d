"""The pairing distances D_l between clean and adversarial activations, by name (DISTANCES).

The distance is chosen by `pairing.distance` from DISTANCES (docs/pairing.md). `relative_l2` is the paper's
form; the paper writes it for every layer, including the logits, where adding one constant to all logits
(which changes no prediction and no cross-entropy) grows ||z|| and so shrinks D: training can lower the
paper's D by drifting a bias. The `centred_l2`, `log_softmax_l2` and `kl` distances cannot be lowered that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from esq_lightning.config.choices import PAIRING_DISTANCES

LOGITS = "logits"
_TINY = 1e-12


def _relative(diff: Tensor, ref: Tensor, p: int) -> Tensor:
    return (diff.flatten(1).norm(p=p, dim=1) / (ref.flatten(1).norm(p=p, dim=1) + _TINY)).mean()


def _check_logits(clean: Tensor, name: str) -> None:
    if clean.dim() != 2:
        raise ValueError(
            f"pairing distance '{name}' is defined on logits (batch, classes) only, got an output of "
            f"shape {tuple(clean.shape)}; pair this layer with relative_l2 or relative_l1"
        )


def centred(z: Tensor) -> Tensor:
    """z - mean_k z: the logits without their common offset (the part no prediction depends on)."""
    return z - z.mean(dim=1, keepdim=True)


def _relative_l2(clean: Tensor, adv: Tensor) -> Tensor:
    return _relative(clean - adv, clean, 2)


def _relative_l1(clean: Tensor, adv: Tensor) -> Tensor:
    return _relative(clean - adv, clean, 1)


def _centred_l2(clean: Tensor, adv: Tensor) -> Tensor:
    _check_logits(clean, "centred_l2")
    c = centred(clean)
    return _relative(c - centred(adv), c, 2)


def _log_softmax_l2(clean: Tensor, adv: Tensor) -> Tensor:
    _check_logits(clean, "log_softmax_l2")
    diff = F.log_softmax(clean, dim=1) - F.log_softmax(adv, dim=1)
    return diff.pow(2).sum(dim=1).mean()


def _kl(clean: Tensor, adv: Tensor) -> Tensor:
    _check_logits(clean, "kl")
    # KL(p(x) || p(x_adv)); the clean distribution is not detached (gradients flow through both branches).
    log_p, log_q = F.log_softmax(clean, dim=1), F.log_softmax(adv, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


@dataclass(frozen=True)
class Distance:
    """One entry of the distance registry: fn(clean, adv) -> batch mean of the per-input distance."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    logits_only: bool
    scale_invariant: bool  # D(a*clean, a*adv) == D(clean, adv) for a > 0
    shift_invariant: bool  # D(clean + c, adv + c) == D(clean, adv) for a constant c over the classes
    description: str


# The names and properties are in esq_lightning/config/choices.py (torch-free: the config schema checks
# pairing.distance against them before torch is imported); here each name gets its function.
_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "relative_l2": _relative_l2,
    "relative_l1": _relative_l1,
    "centred_l2": _centred_l2,
    "log_softmax_l2": _log_softmax_l2,
    "kl": _kl,
}
DISTANCES: dict[str, Distance] = {
    name: Distance(name, _FUNCTIONS[name], *properties) for name, properties in PAIRING_DISTANCES.items()
}
DEFAULT_DISTANCE = "relative_l2"


def get_distance(name: str, key: str = "pairing.distance") -> Distance:
    if name not in DISTANCES:
        raise ValueError(f"{key}: unknown distance '{name}'; allowed: {', '.join(DISTANCES)}")
    return DISTANCES[name]


def resolve_distance(distance: str | None, p: int | None, key: str = "pairing") -> str:
    """The distance a config names: `distance`, or the older `p` (1 or 2: relative_l1 / relative_l2).

    Both given and contradicting (p=1 with relative_l2, or p with a distance that has no p) is an error.
    """
    if p is not None and int(p) not in (1, 2):
        raise ValueError(f"{key}.p: {p} is not allowed; allowed: 1, 2 (or null; prefer {key}.distance)")
    if distance is None:
        return f"relative_l{int(p)}" if p is not None else DEFAULT_DISTANCE
    get_distance(str(distance), f"{key}.distance")
    if p is not None and str(distance) != f"relative_l{int(p)}":
        raise ValueError(
            f"{key}.p={p} contradicts {key}.distance={distance}; {key}.p is the older spelling of "
            f"relative_l1/relative_l2: set {key}.distance only (e.g. {key}.distance=relative_l{int(p)})"
        )
    return str(distance)


def check_distance_for_layers(distance: str, layers: Sequence[str], key: str = "pairing") -> None:
    """A logits-only distance (centred_l2, log_softmax_l2, kl) is undefined on an inner module's output."""
    d = get_distance(distance, f"{key}.distance")
    inner = [n for n in layers if n != LOGITS]
    if d.logits_only and inner:
        raise ValueError(
            f"{key}.distance={distance} is defined on the logits only, but {key}.layers pairs "
            f"{', '.join(inner)}; allowed there: relative_l2, relative_l1 (or pair [logits] only)"
        )


def pairing_distance(clean: Tensor, adv: Tensor, p: int = 2, distance: str | None = None) -> Tensor:
    """D_l, the batch mean of the per-input distance named `distance` (DISTANCES; default relative_l{p}).

    relative_l2 (the paper's): mean over the batch of ||F_l(x) - F_l(x_adv)||_2 / (||F_l(x)||_2 + 1e-12).
    Gradients flow through both branches (SPEC section 3), so nothing is detached here.
    """
    if distance is None:
        if p not in (1, 2):
            raise ValueError(f"pairing p must be 1 or 2, got {p}")
        distance = f"relative_l{p}"
    return get_distance(distance).fn(clean, adv)


def logit_offset_stats(logits: Tensor) -> dict[str, Tensor]:
    """The common offset of the logits against their centred part, batch means (docs/pairing.md).

    offset: mean_k z (signed); centred_norm: ||z - mean_k z||_2; offset_ratio: ||mean_k z * 1||_2 /
    ||z - mean_k z||_2 = sqrt(K) |mean_k z| / ||z - mean_k z||_2, the ratio of the part of z that changes no
    prediction to the part that does (mean over the batch).
    """
    z = logits.flatten(1)
    mean = z.mean(dim=1)
    c_norm = centred(z).norm(dim=1)
    ratio = (z.shape[1] ** 0.5) * mean.abs() / (c_norm + _TINY)
    return {"offset": mean.mean(), "centred_norm": c_norm.mean(), "offset_ratio": ratio.mean()}
