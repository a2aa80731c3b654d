"""Callbacks that plug into the ESQ LightningModule."""

from esq_lightning.training.callbacks.amplification import AmplificationCallback
from esq_lightning.training.callbacks.pgd import PGDCallback, TrainAttack
from esq_lightning.training.callbacks.quant_ratio import QuantRatioCallback, sq_ratio_at

__all__ = ["AmplificationCallback", "PGDCallback", "QuantRatioCallback", "TrainAttack", "sq_ratio_at"]
