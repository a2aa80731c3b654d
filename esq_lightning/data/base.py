"""TensorDataModule: the shared LightningDataModule over in-memory train/val/test tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch

from esq_lightning.data.loader import AugmentFn, TensorBatchLoader


class TensorDataModule(pl.LightningDataModule):
    """Holds (x, y) tensors per split and serves them through TensorBatchLoader.

    Subclasses implement `_load()` returning the six tensors (x float32 in [0, 1], y int64) and set
    `num_classes`, `in_channels`, `image_size`, `mean`, `std`. The train loader shuffles, augments
    and shards by rank; validation and test loaders are unshuffled and unsharded (every rank
    evaluates the whole split, so metrics are exact without gathering). `num_workers` is accepted
    for API compatibility only: slicing in-memory tensors needs no worker processes.
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        device_resident: bool = False,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.device_resident = device_resident
        self.num_workers = num_workers
        self.x_train: torch.Tensor | None = None
        self.y_train: torch.Tensor | None = None
        self.x_val: torch.Tensor | None = None
        self.y_val: torch.Tensor | None = None
        self.x_test: torch.Tensor | None = None
        self.y_test: torch.Tensor | None = None

    # --- to implement -------------------------------------------------------------------------
    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _augment_fn(self) -> AugmentFn | None:
        return None

    # --- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load the splits once (idempotent); with device_resident, move them to the trainer's device."""
        if self.x_train is None:
            (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test) = self._load()
        if self.device_resident and self.trainer is not None:
            self.to(self.trainer.strategy.root_device)

    def to(self, device: torch.device | str) -> TensorDataModule:
        """Move every split to `device` (then Lightning's batch transfer is a no-op)."""
        self._require_loaded()
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _epoch_fn(self) -> Callable[[], int] | None:
        trainer = self.trainer
        if trainer is None:
            return None
        return lambda: trainer.current_epoch

    def train_dataloader(self) -> TensorBatchLoader:
        self._require_loaded()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return TensorBatchLoader(
            self.x_train,
            self.y_train,
            self.batch_size,
            shuffle=True,
            drop_last=False,
            seed=self.seed,
            augment_fn=self._augment_fn(),
            epoch_fn=self._epoch_fn(),
            rank=rank,
            world_size=world,
        )

    def val_dataloader(self) -> TensorBatchLoader:
        self._require_loaded()
        return TensorBatchLoader(self.x_val, self.y_val, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatchLoader:
        self._require_loaded()
        return TensorBatchLoader(self.x_test, self.y_test, self.eval_batch_size, shuffle=False)

    # --- direct access for evaluation code ------------------------------------------------------
    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the training split, unaugmented."""
        self._require_loaded()
        return self.x_train, self.y_train

    def val_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the validation split."""
        self._require_loaded()
        return self.x_val, self.y_val

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the test split; call setup() first, or this calls it."""
        self._require_loaded()
        return self.x_test, self.y_test

    def _require_loaded(self) -> None:
        if self.x_train is None:
            self.setup()
