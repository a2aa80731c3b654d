"""Library notices that say nothing to a user of esq-lightning, filtered one by one (never all warnings).

`quiet_library_notices()` runs when an entry point is imported (before Hydra starts a sweeper), at the start of
every command and of the Python API. Each filter names the exact message it drops, so a new warning from a library
still shows.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

# Messages of Python warnings, as regular expressions matched at the start of the message.
WARNING_MESSAGES = (
    # torch deprecated LeafSpec; Lightning's own _pytree.py still uses it (nothing a user can change).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
# Substrings of Lightning's INFO log lines, per logger.
LOG_MESSAGES = {
    # An advertisement printed by every Trainer that has no LitLogger.
    "pytorch_lightning.utilities.rank_zero": (
        "try installing [litlogger]",
        # esq-train installs its one-line model summary (training/callbacks/progress.py) on purpose.
        "Trainer already configured with model summary callbacks",
    ),
    # Printed when Lightning reloads its own checkpoint (esq-lightning writes and reads those itself).
    "pytorch_lightning.trainer.connectors.checkpoint_connector": ("`weights_only` was not set",),
}
# Lines said once per process: every Trainer (each job of a sweep in one process) repeats the device lines.
ONCE_MESSAGES = {
    "pytorch_lightning.utilities.rank_zero": ("GPU available:", "TPU available:", "HPU available:"),
}
# Set-up lines of a sweeper, shown only when the logger is at DEBUG (hydra.verbose=true, or hydra.verbose=<logger>).
VERBOSE_MESSAGES = {
    "hydra_plugins.hydra_optuna_sweeper._impl": ("Study name:", "Storage:", "Sampler:", "Directions:"),
    "optuna.storages._in_memory": ("A new study created",),
    "optuna.storages._rdb.storage": ("A new study created",),
    # optuna imports alembic, which logs one line per plugin it registers.
    "alembic.runtime.plugins": ("setup plugin",),
}


class _DropMessages(logging.Filter):
    def __init__(self, substrings: tuple[str, ...]) -> None:
        super().__init__()
        self.substrings = substrings

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self.substrings)


class _Once(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefixes):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _UnlessVerbose(_DropMessages):
    def filter(self, record: logging.LogRecord) -> bool:
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG) or super().filter(record)


_installed = False


def filter_warnings() -> None:
    """The warnings filters alone (also inside a `warnings.catch_warnings()` block, which resets them)."""
    for message in WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message)


def quiet_library_notices() -> None:
    """Install the filters (idempotent)."""
    global _installed
    if _installed:
        return
    filter_warnings()
    for name, substrings in LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(substrings))
    for name, prefixes in ONCE_MESSAGES.items():
        logging.getLogger(name).addFilter(_Once(prefixes))
    for name, substrings in VERBOSE_MESSAGES.items():
        logging.getLogger(name).addFilter(_UnlessVerbose(substrings))
    _installed = True


def quiet_wandb_logger(logger: Any) -> Any:
    """Lightning's WandbLogger passes anonymous=None to wandb.init, and wandb >= 0.19 warns that the setting
    "has no effect" whenever the key is present; drop the key when it carries no value."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", 0) is None:
        del init["anonymous"]
    return logger
