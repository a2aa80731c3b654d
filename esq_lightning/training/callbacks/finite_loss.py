"""FiniteLossCallback: stop training, before the optimizer step, when the loss or a gradient is not finite."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from esq_lightning.errors import ESQUserError


class NonFiniteLossError(ESQUserError):
    """The training loss or a gradient became NaN/inf; the message names the step and the last good checkpoint."""


class FiniteLossCallback(pl.Callback):
    """Raises NonFiniteLossError before a NaN/inf can reach the weights.

    The check runs right before the optimizer step, so the weights, the optimizer state and the
    epoch-end checkpoints on disk all stay those of the last good step; the exception ends `fit`
    without a results.json, and the CLI prints its one line with exit code 2.

    Cost: one host sync per optimizer step. The loss flag is kept on the device when it is computed
    and read together with the gradient flags (`check_grads`). Under data parallelism the gradients
    are already all-reduced, so a NaN loss on any rank shows up in every rank's gradients and all
    ranks stop at the same step; with `check_grads=false` the loss flag is all-reduced instead, so
    that the healthy ranks do not wait forever in the next all-reduce. Under 16-mixed precision the
    gradient check is left to the grad scaler, which skips inf steps on purpose.
    """

    def __init__(self, check_grads: bool) -> None:  # runs: conf/callbacks/default.yaml (finite_loss)
        self.check_grads = bool(check_grads)
        self._batch_idx = 0
        self._loss_ok: Tensor | None = None
        self._loss: Tensor | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        loss = loss.detach()
        ok = torch.isfinite(loss).all()
        # Over the micro-batches of one optimizer step (accumulate_grad_batches > 1): all must be finite,
        # and the value kept for the message is a non-finite one if there is any; no sync here.
        if self._loss_ok is None or self._loss is None:
            self._loss_ok, self._loss = ok, loss
        else:
            self._loss_ok, self._loss = self._loss_ok & ok, torch.where(ok, self._loss, loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        loss_ok, loss, self._loss_ok, self._loss = self._loss_ok, self._loss, None, None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads = (
            [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            if self.check_grads and scaler is None
            else []
        )
        flags = ([loss_ok.reshape(1)] if loss_ok is not None else []) + [
            torch.isfinite(g).all().reshape(1) for _, g in grads
        ]
        if not flags:
            return
        ok = bool(torch.cat([f.to(flags[0].device) for f in flags]).all())  # the one host sync
        if not grads:
            ok = bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
        if ok:
            return
        if loss_ok is not None and not bool(loss_ok):
            what = (
                f"train/loss is {loss.float().cpu().reshape(-1)[0].item()}"
                if loss is not None
                else "train/loss is not finite"
            )
        elif grads:
            bad = next((n for n, g in grads if not bool(torch.isfinite(g).all())), "a parameter")
            what = f"the gradient of {bad} is not finite"
        else:
            what = "train/loss is not finite on another rank"
        raise NonFiniteLossError(self._message(trainer, what))

    def _message(self, trainer: pl.Trainer, what: str) -> str:
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = (
            f"the last good checkpoint is {ckpt} (resume with ckpt_path=last and the same hydra.run.dir=)"
            if ckpt
            else "no checkpoint was written before it"
        )
        return (
            f"{what} at epoch {trainer.current_epoch}, batch {self._batch_idx} "
            f"(global step {trainer.global_step}): training stopped before the optimizer step; {kept}; "
            "lower optimizer.lr or check the data"
        )
