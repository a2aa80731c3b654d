"""Data: in-memory LightningDataModules (digits, CIFAR-10/100), the tensor batch loader and batched augmentation."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

from esq_lightning.data.augment import CropFlip, random_crop_flip
from esq_lightning.data.base import TensorDataModule
from esq_lightning.data.cifar import (
    CIFAR_META,
    CIFARDataModule,
    CorruptArchiveError,
    download_cifar,
    extract_cifar,
    load_cifar,
)
from esq_lightning.data.digits import DigitsDataModule
from esq_lightning.data.loader import TensorBatchLoader, derive_seed

DATAMODULES: dict[str, type[TensorDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": CIFARDataModule,
    "cifar100": CIFARDataModule,
}

# Keys the data configs carry for other groups (model configs interpolate them), not constructor args.
# `attack` holds the dataset's default attack strength, read by the callbacks and eval groups.
METADATA_KEYS = ("name", "num_classes", "in_channels", "image_size", "mean", "std", "attack")


def build_datamodule(cfg_data: Mapping[str, Any] | Any, seed: int = 0) -> pl.LightningDataModule:
    """Instantiate a datamodule from its config group with the run's `seed`.

    Metadata keys (METADATA_KEYS) are dropped unless the target's constructor takes them (the
    CIFAR module takes `name`). Without `_target_`, `name` picks the class from DATAMODULES.
    """
    from hydra.utils import get_class, instantiate
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.to_container(cfg_data, resolve=True) if isinstance(cfg_data, DictConfig) else dict(cfg_data)
    assert isinstance(cfg, dict)
    if "_target_" in cfg:
        cls = get_class(cfg["_target_"])
    else:
        name = cfg.get("name")
        if name not in DATAMODULES:
            raise KeyError(f"data config has no _target_ and name={name!r} is not one of {sorted(DATAMODULES)}")
        cls = DATAMODULES[name]
        cfg["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
    params = inspect.signature(cls.__init__).parameters
    for key in METADATA_KEYS:
        if key not in params:
            cfg.pop(key, None)
    cfg["seed"] = seed
    return instantiate(cfg, _convert_="all")


__all__ = [
    "CIFAR_META",
    "CIFARDataModule",
    "CorruptArchiveError",
    "CropFlip",
    "DATAMODULES",
    "DigitsDataModule",
    "METADATA_KEYS",
    "TensorBatchLoader",
    "TensorDataModule",
    "build_datamodule",
    "derive_seed",
    "download_cifar",
    "extract_cifar",
    "load_cifar",
    "random_crop_flip",
]
