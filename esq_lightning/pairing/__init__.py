"""Activation pairing: the distances D_l (distances.py, a registry by name) and their capture (capture.py)."""

from esq_lightning.pairing.capture import (
    capture_activations,
    check_pairing_names,
    forward_with_activations,
    pairing_loss,
    valid_pairing_names,
)
from esq_lightning.pairing.distances import (
    DEFAULT_DISTANCE,
    DISTANCES,
    LOGITS,
    Distance,
    centred,
    check_distance_for_layers,
    get_distance,
    logit_offset_stats,
    pairing_distance,
    resolve_distance,
)

__all__ = [
    "DEFAULT_DISTANCE",
    "DISTANCES",
    "LOGITS",
    "Distance",
    "capture_activations",
    "centred",
    "check_distance_for_layers",
    "check_pairing_names",
    "forward_with_activations",
    "get_distance",
    "logit_offset_stats",
    "pairing_distance",
    "pairing_loss",
    "resolve_distance",
    "valid_pairing_names",
]
