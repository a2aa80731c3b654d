"""Name a training collapse while it happens: a constant output, and a run ending far below where it started.

Added by esq-train to every run (it costs one clean forward pass over the validation split at the start and
counts the predictions that validation computes anyway). Its flags join the end-of-training verdict
(evaluation/checks.py): `training_collapse` when every validation input got one class at some epoch (the
pairing term is zero there, so ESQ cannot pull the model out), `accuracy_drop` when the last validation clean
accuracy is more than `max_drop` below the accuracy of the weights training started from.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from esq_lightning.evaluation.checks import flag
from esq_lightning.quant import full_quantization


class CollapseMonitor(pl.Callback):
    def __init__(self, max_drop: float = 0.3, max_samples: int = 1024) -> None:
        self.max_drop = max_drop
        self.max_samples = max_samples
        self.start_acc: float | None = None
        self.collapsed_epochs: list[int] = []
        self._counts: torch.Tensor | None = None
        self._handle: Any = None

    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        model = pl_module.model
        return getattr(model, "_orig_mod", model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "val_tensors"):
            return
        try:
            x, y = dm.val_tensors()
        except Exception:  # a datamodule without a validation split: nothing to compare against
            return
        x, y = x[: self.max_samples].to(pl_module.device), y[: self.max_samples].to(pl_module.device)
        model = self._model(pl_module)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), full_quantization(model):
                pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
        finally:
            model.train(was_training)
        self.start_acc = (pred == y).float().mean().item() if len(y) else None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._counts = None

        def hook(_m: torch.nn.Module, _i: Any, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                counts = torch.bincount(out.detach().argmax(1).cpu(), minlength=out.shape[1])
                self._counts = counts if self._counts is None else self._counts + counts

        self._handle = self._model(pl_module).register_forward_hook(hook)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        counts = self._counts
        if counts is None or trainer.sanity_checking:
            return
        # Validation also runs the robust-validation attack through the model; its forward passes count too,
        # which only makes a constant output harder to miss (every pass gives the one class).
        if int((counts > 0).sum()) == 1 and int(counts.sum()) > 1:
            epoch = int(trainer.current_epoch)
            if not self.collapsed_epochs:
                rank_zero_warn(
                    f"training collapse at epoch {epoch}: every validation input gets class "
                    f"{int(counts.argmax())} (constant output; the pairing term is zero there)"
                )
            self.collapsed_epochs.append(epoch)

    def flags(self, final_val_acc: float | None) -> list[dict[str, Any]]:
        out = []
        if self.collapsed_epochs:
            out.append(
                flag(
                    "training_collapse",
                    f"constant output on the validation split at epoch(s) {self.collapsed_epochs[:10]}",
                    epochs=self.collapsed_epochs,
                )
            )
        if self.start_acc is not None and final_val_acc is not None and final_val_acc < self.start_acc - self.max_drop:
            out.append(
                flag(
                    "accuracy_drop",
                    f"validation clean accuracy fell from {100 * self.start_acc:.1f}% at the "
                    f"start of training to {100 * final_val_acc:.1f}%",
                    start_acc=self.start_acc,
                    final_acc=final_val_acc,
                )
            )
        return out
