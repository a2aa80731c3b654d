"""The quantization-ratio callback: r = min(1, start + step * floor(epoch / every_n_epochs)), logged as `sq_ratio`."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl

from esq_lightning.quant import quant_layers, set_sq_ratio


def sq_ratio_at(epoch: int, start: float = 0.2, step: float = 0.2, every_n_epochs: int = 25) -> float:
    """The SQ ratio schedule of the paper (SPEC section 2)."""
    r = start + step * math.floor(epoch / every_n_epochs)
    # Round away float noise (0.2 + 0.2 * 2 = 0.6000000000000001) so logs and selection counts are exact.
    return min(1.0, round(r, 10))


class QuantRatioCallback(pl.Callback):
    """Sets the SQ ratio of every quantized layer at the start of each training epoch."""

    # No defaults: a run takes them from conf/callbacks/default.yaml (quant_ratio), the one place they are set.
    def __init__(self, start: float, step: float, every_n_epochs: int) -> None:
        if not 0 < start <= 1:
            raise ValueError(f"callbacks.quant_ratio.start must be in (0, 1], got {start}")
        if step <= 0:
            raise ValueError(f"callbacks.quant_ratio.step must be > 0, got {step}")
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.quant_ratio.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.start, self.step, self.every_n_epochs = float(start), float(step), int(every_n_epochs)
        self.ratio = 1.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not quant_layers(pl_module.model):
            return
        self.ratio = sq_ratio_at(trainer.current_epoch, self.start, self.step, self.every_n_epochs)
        set_sq_ratio(pl_module.model, self.ratio)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if quant_layers(pl_module.model):
            pl_module.log("sq_ratio", self.ratio, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "step": self.step, "every_n_epochs": self.every_n_epochs, "ratio": self.ratio}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The schedule comes from the config of the resumed run; the ratio is recomputed at the next
        # epoch start from the restored epoch counter, so only the last value is restored here.
        self.ratio = float(state_dict.get("ratio", self.ratio))
