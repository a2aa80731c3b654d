"""esq-lightning: Error-Silenced Quantization with PyTorch Lightning and Hydra."""

from esq_lightning.config import register_resolvers

__version__ = "0.1.0"

# The configs use ${eval_frac:8/255} and ${int_mul:...}; registering here makes them resolvable wherever
# the package is imported (entry points, tests, notebooks).
register_resolvers()
