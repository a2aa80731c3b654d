"""Model zoo: SmallCNN for digits and the CIFAR ResNets, each with in-model normalization and named residual modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from esq_lightning.models.common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    Normalize,
    ResidualNet,
    residual_module_by_index,
)
from esq_lightning.models.preact_resnet import PreActBlock, PreActResNet, preact_resnet18
from esq_lightning.models.resnet_bottleneck import Bottleneck, BottleneckResNet, resnet152
from esq_lightning.models.resnet_cifar import BasicBlock, CifarResNet, resnet20, resnet56
from esq_lightning.models.small_cnn import SmallCNN
from esq_lightning.models.wide_resnet import WideBlock, WideResNet, wrn28_10

# Config name -> constructor (a class or a factory taking the same keyword arguments).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "preact_resnet18": preact_resnet18,
    "wrn28_10": wrn28_10,
    "resnet152": resnet152,
}


def build_model(cfg_model: Mapping[str, Any] | Any) -> nn.Module:
    """Instantiate a model from its config group (a dict or DictConfig node).

    Interpolations such as `${data.num_classes}` are resolved against the node's root config, the
    non-constructor key `name` is dropped, and `_target_` is instantiated with `_convert_="all"` so
    lists arrive as plain lists. Without `_target_`, `name` picks the constructor from MODELS.
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg_model, DictConfig):
        cfg = OmegaConf.to_container(cfg_model, resolve=True)
    else:
        cfg = dict(cfg_model)
    assert isinstance(cfg, dict)
    name = cfg.pop("name", None)
    if "_target_" in cfg:
        return instantiate(cfg, _convert_="all")
    if name not in MODELS:
        raise KeyError(f"model config has no _target_ and name={name!r} is not one of {sorted(MODELS)}")
    return MODELS[name](**cfg)


__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "BottleneckResNet",
    "CifarResNet",
    "Normalize",
    "PreActBlock",
    "PreActResNet",
    "ResidualNet",
    "SmallCNN",
    "WideBlock",
    "WideResNet",
    "build_model",
    "preact_resnet18",
    "resnet152",
    "resnet20",
    "resnet56",
    "residual_module_by_index",
    "wrn28_10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
]
