"""AmplificationCallback: the error-amplification curve D_l on validation data every N epochs, logged per module."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from esq_lightning.evaluation.amplification import amplification_curve


class AmplificationCallback(pl.Callback):
    """Every `every_n_epochs` epochs (0: never), measure D_l after each residual module on the first
    `n_samples` validation inputs (PGD at `eps`, eval mode, ratio 1) and log `amplification/<module>`.

    With a WandbLogger attached the curve also goes to W&B as a line plot and a table
    (`amplification/curve`, `amplification/table`). The PGD start is seeded by (seed, nothing else), so
    the curves of different epochs measure the same perturbation procedure.
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        n_samples: int | None = 256,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        norm: str = "linf",
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"callbacks.amplification.every_n_epochs must be >= 0 (0: off), got {every_n_epochs}")
        if not eps > 0:
            raise ValueError(f"callbacks.amplification.eps must be > 0, got {eps}")
        self.every_n_epochs = int(every_n_epochs)
        self.n_samples = n_samples
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = step_size
        self.norm = norm
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.last: dict[str, Any] | None = None  # the latest curve, for callers and tests

    def due(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs <= 0 or trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer):
            return
        x, y = self.validation_inputs(trainer)
        model = getattr(pl_module, "model", pl_module)
        curve = amplification_curve(
            model,
            x,
            y,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            norm=self.norm,
            batch_size=self.batch_size,
            device=pl_module.device,
            seed=self.seed,
        )
        curve["epoch"] = trainer.current_epoch
        self.last = curve
        # Every rank sees the same (unsharded) validation inputs, so the values agree without syncing.
        for name, value in zip(curve["modules"], curve["d"]):
            pl_module.log(f"amplification/{name}", float(value), on_epoch=True, sync_dist=False)
        # D at the logit layer, raw (the paper's form) and centred (what a logit offset cannot lower).
        pl_module.log("amplification/logits", float(curve["logits"]["relative_l2"]), on_epoch=True, sync_dist=False)
        pl_module.log(
            "amplification/logits_centred", float(curve["logits"]["centred_l2"]), on_epoch=True, sync_dist=False
        )
        if trainer.is_global_zero:
            self.log_wandb(trainer.loggers, curve, trainer.global_step)

    def validation_inputs(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        """The first n_samples validation inputs, from the datamodule's tensors or else the val loader."""
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_tensors"):
            x, y = dm.val_tensors()
        else:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            xs, ys, seen = [], [], 0
            for xb, yb in loader:
                xs.append(xb)
                ys.append(yb)
                seen += len(yb)
                if self.n_samples is not None and seen >= self.n_samples:
                    break
            x, y = torch.cat(xs), torch.cat(ys)
        if self.n_samples is not None:
            x, y = x[: self.n_samples], y[: self.n_samples]
        return x, y

    @staticmethod
    def log_wandb(loggers: list[Any], curve: dict[str, Any], step: int) -> None:
        """A W&B line plot (x: module index, y: D_l) and the table behind it, for each WandbLogger."""
        from pytorch_lightning.loggers import WandbLogger

        wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        import wandb

        rows = [
            [i + 1, name, float(d), int(curve.get("epoch", -1))]
            for i, (name, d) in enumerate(zip(curve["modules"], curve["d"]))
        ]
        for logger in wandb_loggers:
            table = wandb.Table(columns=["module_index", "module", "D_l", "epoch"], data=rows)
            plot = wandb.plot.line(
                table, "module_index", "D_l", title=f"Error amplification D_l, epoch {curve.get('epoch')}"
            )
            # The same step key as WandbLogger.log_metrics, so the plot lines up with the scalars.
            logger.experiment.log(
                {"amplification/curve": plot, "amplification/table": table, "trainer/global_step": step}
            )
