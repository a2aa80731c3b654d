"""DigitsDataModule: the 1797 8x8 sklearn digits, shipped with scikit-learn, for fast CPU runs and tests."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from esq_lightning.data.augment import CropFlip
from esq_lightning.data.base import TensorDataModule
from esq_lightning.data.loader import AugmentFn


class DigitsDataModule(TensorDataModule):
    """sklearn digits as 1x8x8 float32 in [0, 1] (pixel values 0..16 divided by 16).

    A fixed stratified split, seeded by `split_seed`: `test_size` samples for test, then `val_size`
    of the rest for validation, the remainder (1197 by default) for training. `val_size=0` makes
    validation use the test split. `seed` drives shuffling and augmentation only. `augment=True`
    applies a random crop with 1-pixel zero padding and no flip (a mirrored digit is another
    symbol).
    """

    num_classes = 10
    in_channels = 1
    image_size = 8
    # Measured on all 1797 images (mean 0.30526, std 0.37605).
    mean = (0.3053,)
    std = (0.3760,)

    # The defaults serve the Python API; for runs, conf/data/digits.yaml is their source.
    def __init__(
        self,
        batch_size: int = 64,
        val_size: int = 300,
        test_size: int = 300,
        split_seed: int = 0,
        seed: int = 0,
        device_resident: bool = False,
        num_workers: int = 0,
        augment: bool = False,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, device_resident, num_workers, eval_batch_size)
        if test_size < 1 or val_size < 0:
            raise ValueError(f"need test_size >= 1 and val_size >= 0, got {test_size}, {val_size}")
        self.val_size = val_size
        self.test_size = test_size
        self.split_seed = split_seed
        self.augment = augment
        self.split_indices: dict[str, torch.Tensor] = {}

    def _load(self):
        digits = load_digits()
        x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
        y = torch.from_numpy(digits.target).long()
        idx = torch.arange(len(y)).numpy()
        rest, test = train_test_split(idx, test_size=self.test_size, stratify=y.numpy(), random_state=self.split_seed)
        if self.val_size > 0:
            train, val = train_test_split(
                rest, test_size=self.val_size, stratify=y.numpy()[rest], random_state=self.split_seed
            )
        else:
            train, val = rest, test
        train, val, test = (torch.as_tensor(sorted(s)) for s in (train, val, test))
        # Indices into load_digits(), kept so callers can check or reproduce the split.
        self.split_indices = {"train": train, "val": val, "test": test}
        x_test, y_test = x[test], y[test]
        if self.val_size == 0:  # the same tensors, not a copy
            return x[train], y[train], x_test, y_test, x_test, y_test
        return x[train], y[train], x[val], y[val], x_test, y_test

    def _augment_fn(self) -> AugmentFn | None:
        return CropFlip(padding=1, flip=False) if self.augment else None
