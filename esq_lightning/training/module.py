"""The LightningModule: owns the error-silenced training step; callbacks plug the attack and the SQ ratio into it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from esq_lightning.quant import draw_selection, full_quantization, quant_layers, sq_generator
from esq_lightning.rng import Stream, step_generator
from esq_lightning.training.attacks import gradalign_term
from esq_lightning.training.objectives import Objective

# Each kind of randomness in a training step has its own step_generator stream.


class ESQModule(pl.LightningModule):
    """Wraps a (quantized) classifier and a training objective.

    Per training step: one SQ draw (shared by every forward pass of the step: attack, clean and
    adversarial), one training attack (set by the PGD callback as `train_attack`), one objective.
    Validation and test always run at full quantization (ratio 1).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        config: dict | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = int(seed)
        self.config = config or {}
        self.channels_last = channels_last
        if channels_last:
            # Inputs are converted in _prepare; a model left in NCHW would convert back on every conv.
            self.model.to(memory_format=torch.channels_last)
        self.quantized = len(quant_layers(model)) > 0
        self.train_attack: Callable[..., Tensor] | None = None  # set by PGDCallback.setup
        # validate_args=False: the check calls torch.unique on the targets, a host sync on every training step
        # (cross-entropy already rejects bad targets).
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._eval_stack: ExitStack | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    # ---- training -------------------------------------------------------------------------------
    def step_attack(self) -> Callable[..., Tensor] | None:
        """The training attack bound to the model and to this step's generator."""
        if not self.objective.needs_attack:
            return None
        if self.train_attack is None:
            raise RuntimeError(f"method '{self.objective.name}' needs the PGD callback (callbacks.pgd)")
        gen = step_generator(self.seed, self.global_step, Stream.ATTACK)
        return partial(self.train_attack, self.model, generator=gen)

    def draw_sq_selection(self) -> None:
        if self.quantized:
            draw_selection(self.model, sq_generator(self.seed, self.global_step))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = self._prepare(x)
        self.draw_sq_selection()
        out = self.objective(self.model, x, y, self.step_attack(), epoch=self.current_epoch)
        weight = float(getattr(self.train_attack, "gradalign", 0.0) or 0.0) if self.objective.needs_attack else 0.0
        if weight:
            # GradAlign on top of any method's loss, under the step's one SQ selection (training/attacks.py).
            gen = step_generator(self.seed, self.global_step, Stream.GRADALIGN)
            align = gradalign_term(self.model, x, y, float(self.train_attack.eps), gen)
            out.loss = out.loss + weight * align
            out.terms["gradalign"] = align.detach()
        self.train_acc(out.logits.detach(), y)
        self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in out.terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True)
        return out.loss

    # ---- evaluation at ratio 1 ------------------------------------------------------------------
    def _enter_full_quantization(self) -> None:
        self._exit_full_quantization()
        self._eval_stack = ExitStack()
        self._eval_stack.enter_context(full_quantization(self.model))

    def _exit_full_quantization(self) -> None:
        if self._eval_stack is not None:
            self._eval_stack.close()
            self._eval_stack = None

    def on_validation_epoch_start(self) -> None:
        self._enter_full_quantization()

    def on_validation_epoch_end(self) -> None:
        self._exit_full_quantization()

    def on_test_epoch_start(self) -> None:
        self._enter_full_quantization()

    def on_test_epoch_end(self) -> None:
        self._exit_full_quantization()

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(self._prepare(x))
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log(f"{stage}/clean_acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    # ---- optimization and checkpoints -----------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("no optimizer configured (optimizer=sgd|adam)")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The resolved run config travels with the weights, so esq-eval and esq-export can rebuild the model.
        checkpoint["esq_config"] = self.config
