"""Callbacks that plug into the ESQ LightningModule."""

from esq_lightning.callbacks.amplification import AmplificationCallback
from esq_lightning.callbacks.pgd import PGDCallback, TrainAttack
from esq_lightning.callbacks.quant_ratio import QuantRatioCallback, sq_ratio_at

__all__ = ["AmplificationCallback", "PGDCallback", "QuantRatioCallback", "TrainAttack", "sq_ratio_at"]
