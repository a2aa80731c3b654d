"""The versions of the packages a result depends on, recorded in every results record (results.json)."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata

# This package's version (pyproject.toml's); esq_lightning.__version__ is this name.
__version__ = "0.1.0"

# The distributions whose versions can change a number: the numerics, the training loop, the configs, the
# attack libraries, and the logger that records it. constraints.txt pins all of them (make lock).
KEY_PACKAGES = (
    "torch",
    "pytorch-lightning",
    "numpy",
    "hydra-core",
    "omegaconf",
    "torchmetrics",
    "scikit-learn",
    "foolbox",
    "pyautoattack",
    "wandb",
)


def package_versions() -> dict[str, str | None]:
    """{"python": ..., "<distribution>": version or None when not installed}, cheap (no imports)."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
