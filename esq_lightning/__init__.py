"""esq-lightning: Error-Silenced Quantization with PyTorch Lightning and Hydra.

The Python API (esq_lightning/api.py), imported lazily so that `import esq_lightning` stays cheap:
    from esq_lightning import train, evaluate, export, load_model, load_results
"""

from typing import Any

from esq_lightning.artifacts.setting import register_setting_resolver
from esq_lightning.config.resolvers import register_resolvers
from esq_lightning.versions import __version__  # noqa: F401  (the package's version, pyproject.toml's)

# The configs use ${eval_frac:8/255} and ${int_mul:...}; registering here makes them resolvable wherever
# the package is imported (entry points, tests, notebooks).
register_resolvers()
register_setting_resolver()

API = ("train", "evaluate", "export", "load_model", "load_results")


def __getattr__(name: str) -> Any:
    if name in API:
        from esq_lightning import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'esq_lightning' has no attribute {name!r}")
