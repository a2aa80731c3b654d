"""The PGD callback: owns the training attack and runs a robust validation (clean and PGD accuracy) every N epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from esq_lightning.attacks import pgd
from esq_lightning.quant import full_quantization
from esq_lightning.rng import Stream, step_generator


@dataclass
class TrainAttack:
    """Untargeted PGD used to make x_adv during training (SPEC section 3)."""

    eps: float
    step_size: float
    steps: int
    norm: str = "linf"
    random_start: bool = True

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None, loss_fn: Any = None
    ) -> Tensor:
        return pgd(
            model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm,
            random_start=self.random_start, loss_fn=loss_fn, generator=generator,
        )


class PGDCallback(pl.Callback):
    """Plugs the training attack into the module and logs `val/pgd_acc` every `val_every_n_epochs` epochs."""

    # The strength has no default (a run takes it from data.attack via conf/callbacks/default.yaml); the
    # other defaults serve the Python API only: for runs, conf/callbacks/default.yaml (pgd) is their source.
    def __init__(
        self,
        eps: float,
        step_size: float,
        steps: int,
        norm: str = "linf",
        random_start: bool = True,
        val_every_n_epochs: int = 1,
        val_n_samples: int | None = 512,
        val_steps: int | None = None,
    ) -> None:
        for key, value in (("eps", eps), ("step_size", step_size)):
            if not value > 0:
                raise ValueError(f"callbacks.pgd.{key} must be > 0, got {value}")
        if steps < 0:
            raise ValueError(f"callbacks.pgd.steps must be >= 0, got {steps}")
        self.attack = TrainAttack(float(eps), float(step_size), int(steps), norm, bool(random_start))
        self.val_every_n_epochs = int(val_every_n_epochs)
        self.val_n_samples = val_n_samples
        # Robust validation uses the training attack's strength unless told otherwise.
        self.val_attack = TrainAttack(float(eps), float(step_size), int(val_steps or steps), norm, True)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.train_attack = self.attack

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.val_every_n_epochs <= 0:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.val_every_n_epochs != 0 and not last:
            return
        clean, robust = self.robust_validation(trainer, pl_module)
        pl_module.log("val/pgd_acc", robust, prog_bar=True, sync_dist=True)
        pl_module.log("val/pgd_clean_acc", clean, sync_dist=True)

    def robust_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        model = pl_module.model
        num_classes = pl_module.val_acc.num_classes
        clean_acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(pl_module.device)
        pgd_acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(pl_module.device)
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        seen = 0
        was_training = model.training
        model.eval()
        with full_quantization(model), torch.enable_grad():
            for i, (x, y) in enumerate(loader):
                if self.val_n_samples is not None and seen >= self.val_n_samples:
                    break
                if self.val_n_samples is not None:
                    x, y = x[: self.val_n_samples - seen], y[: self.val_n_samples - seen]
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                # Fixed per-batch seeds: the validation attack is the same every epoch.
                gen = step_generator(pl_module.seed, i, Stream.VALIDATION_ATTACK)
                x_adv = self.val_attack(model, x, y, generator=gen)
                with torch.no_grad():
                    clean_acc(model(x), y)
                    pgd_acc(model(x_adv), y)
                seen += len(y)
        model.train(was_training)
        return clean_acc.compute(), pgd_acc.compute()
