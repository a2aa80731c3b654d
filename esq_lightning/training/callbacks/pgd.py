"""The PGD callback: owns the training attack (training/attacks.py, by name) and runs a robust validation every N
epochs: clean, multi-step PGD and single-step FGSM accuracy, watched for catastrophic overfitting
(callbacks/overfitting.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from esq_lightning.attacks import fgsm
from esq_lightning.config.choices import SINGLE_STEP_TRAIN_ATTACKS
from esq_lightning.quant import full_quantization
from esq_lightning.rng import Stream, step_generator
from esq_lightning.training.attacks import TrainAttack
from esq_lightning.training.callbacks.overfitting import OverfittingDetector


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
        val_step_size: float | None = None,
        name: str = "pgd",
        noise: float | None = None,
        project: bool = True,
        gradalign: float = 0.0,
        co_drop: float = 0.2,
        co_fgsm_tolerance: float = 0.05,
        co_stop: bool = False,
    ) -> None:
        for key, value in (("eps", eps), ("step_size", step_size)):
            if not value > 0:
                raise ValueError(f"callbacks.pgd.{key} must be > 0, got {value}")
        if steps < 0:
            raise ValueError(f"callbacks.pgd.steps must be >= 0, got {steps}")
        self.attack = TrainAttack(
            float(eps),
            float(step_size),
            int(steps),
            norm,
            bool(random_start),
            name=name,
            noise=None if noise is None else float(noise),
            project=bool(project),
            gradalign=float(gradalign),
        )
        self.val_every_n_epochs = int(val_every_n_epochs)
        self.val_n_samples = val_n_samples
        # Robust validation: multi-step PGD at eps, the training attack's steps and step size unless told otherwise
        # (conf/attack/*.yaml for the single-step attacks set val_steps and val_step_size to the dataset's PGD).
        # A single-step training attack is never its own watch: without val_steps, PGD-10 at eps/4 (the datasets' own).
        if self.attack.name in SINGLE_STEP_TRAIN_ATTACKS and val_steps is None:
            val_steps, val_step_size = 10, val_step_size or float(eps) / 4
        self.val_attack = TrainAttack(
            float(eps), float(val_step_size or step_size), int(val_steps or steps), norm, True
        )
        self.detector = OverfittingDetector(drop=float(co_drop), fgsm_tolerance=float(co_fgsm_tolerance))
        self.co_stop = bool(co_stop)
        self._best_state: dict[str, Any] | None = None
        self.restored_epoch: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.train_attack = self.attack
        pl_module.overfitting_monitor = self

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.val_every_n_epochs <= 0:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.val_every_n_epochs != 0 and not last:
            return
        clean, robust, single = self.robust_validation(trainer, pl_module)
        pl_module.log("val/pgd_acc", robust, prog_bar=True, sync_dist=True)
        pl_module.log("val/pgd_clean_acc", clean, sync_dist=True)
        pl_module.log("val/fgsm_acc", single, sync_dist=True)
        improved, fired = self.detector.update(epoch - 1, float(robust), float(single))
        # 0/1 every robust validation, so the curve shows when (metrics.csv, W&B).
        pl_module.log("val/catastrophic_overfitting", float(self.detector.fired), sync_dist=True)
        if improved and self.co_stop:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.model.state_dict().items()}
        if fired:
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(
                f"catastrophic_overfitting: {self.detector.message()}"
                + (
                    "; stopping and keeping the best weights (callbacks.pgd.co_stop=true)"
                    if self.co_stop
                    else "; training goes on (callbacks.pgd.co_stop=true stops and keeps the best weights)"
                )
            )
            if self.co_stop:
                self.restore_best(pl_module)
                trainer.should_stop = True

    # A resume (ckpt_path=last) continues the watch: its history and best travel in the checkpoint. The best
    # weights do not (they would double the file): after a resume co_stop keeps the best seen since.
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "restored_epoch": self.restored_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "detector" in state_dict:
            self.detector.load_state_dict(state_dict["detector"])
            self.restored_epoch = state_dict.get("restored_epoch")

    def restore_best(self, pl_module: pl.LightningModule) -> None:
        """Load the weights of the best robust validation into the module (they become final.ckpt)."""
        if self._best_state is None:
            return
        pl_module.model.load_state_dict(copy.deepcopy(self._best_state))
        self.restored_epoch = self.detector.best_epoch

    def record(self) -> dict[str, Any]:
        """results.json `catastrophic_overfitting`: what the watch saw, and whether the best weights were kept."""
        return {**self.detector.record(), "stop": self.co_stop, "restored_epoch": self.restored_epoch}

    def flags(self) -> list[dict[str, Any]]:
        from esq_lightning.evaluation.checks import flag

        if not self.detector.fired:
            return []
        kept = (
            f"; training stopped and kept the weights of epoch {self.restored_epoch}"
            if self.restored_epoch is not None
            else ""
        )
        return [flag("catastrophic_overfitting", self.detector.message() + kept, **self.record())]

    def robust_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor, Tensor]:
        model = pl_module.model
        num_classes = pl_module.val_acc.num_classes
        clean_acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(pl_module.device)
        pgd_acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(pl_module.device)
        fgsm_acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(pl_module.device)
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
                # Single-step FGSM at eps (no random start): it holds while PGD collapses under catastrophic overfitting.
                x_fgsm = fgsm(model, x, y, eps=self.val_attack.eps, norm=self.val_attack.norm)
                with torch.no_grad():
                    clean_acc(model(x), y)
                    pgd_acc(model(x_adv), y)
                    fgsm_acc(model(x_fgsm), y)
                seen += len(y)
        model.train(was_training)
        return clean_acc.compute(), pgd_acc.compute(), fgsm_acc.compute()
