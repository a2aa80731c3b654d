"""What esq-train shows while it trains, under the one key `progress` (docs/configuration.md, "Progress").

- progress=true: a compact tqdm bar (`CompactProgressBar`: a few short metrics, never wider than the terminal, so
  it does not wrap at 80 columns).
- progress=false: no bar; one line per epoch instead (`EpochSummary`: epoch i/n, train loss, validation clean and
  robust accuracy, SQ ratio, seconds).
- Either way a one-line model summary (`ParamSummary`: parameters and size, without Lightning's FLOPs row, which
  reads 0 for a model without an example input).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelSummary, TQDMProgressBar
from pytorch_lightning.utilities.model_summary import get_human_readable_count

from esq_lightning.quant import quant_layers
from esq_lightning.training.callbacks.quant_ratio import QuantRatioCallback

# Progress-bar metrics by their short names, in the order shown; the rest stay in the loggers.
BAR_METRICS = {"train/loss_step": "loss", "train/loss": "loss", "val/clean_acc": "val", "val/pgd_acc": "pgd"}


def progress_enabled(cfg: Mapping[str, Any]) -> bool:
    """The one progress switch of esq-train: `progress`, with `trainer.enable_progress_bar=false` (the older
    spelling) switching it off as well."""
    trainer = cfg.get("trainer") or {}
    return bool(cfg.get("progress", True)) and trainer.get("enable_progress_bar", True) is not False


def _columns() -> int:
    # The terminal's width, else COLUMNS, else 80; one less so a full line never makes the terminal wrap.
    return max(shutil.get_terminal_size((80, 24)).columns - 1, 20)


class CompactProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the metrics of BAR_METRICS only, trimmed to the terminal's width (also when the
    output is not a terminal: then COLUMNS or 80)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        return {short: metrics[key] for key, short in BAR_METRICS.items() if key in metrics}

    def _fit(self, bar: Any) -> Any:
        bar.dynamic_ncols = lambda _fp: (_columns(), None)
        bar.ncols = _columns()
        return bar

    def init_sanity_tqdm(self) -> Any:
        return self._fit(super().init_sanity_tqdm())

    def init_train_tqdm(self) -> Any:
        return self._fit(super().init_train_tqdm())

    def init_validation_tqdm(self) -> Any:
        return self._fit(super().init_validation_tqdm())

    def init_test_tqdm(self) -> Any:
        return self._fit(super().init_test_tqdm())

    def init_predict_tqdm(self) -> Any:
        return self._fit(super().init_predict_tqdm())


class EpochSummary(pl.Callback):
    """One line per training epoch (rank zero), for runs without a progress bar; at the end of training, one line
    saying what the evaluation that follows runs (`evaluation`, e.g. "7 attacks on 1000 test inputs")."""

    def __init__(self, evaluation: str | None = None) -> None:
        self._start = time.perf_counter()
        self._validated = -1
        self.evaluation = evaluation

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(self.line(trainer), flush=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.evaluation:
            print(f"training done; evaluating the final model: {self.evaluation}", flush=True)

    def line(self, trainer: pl.Trainer) -> str:
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch
        parts = [f"epoch {epoch + 1}/{trainer.max_epochs}"]
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train loss {float(loss):.4f}")
        if self._validated == epoch:
            for key, name in (("val/clean_acc", "val clean"), ("val/pgd_acc", "val pgd")):
                if key in metrics:
                    parts.append(f"{name} {100 * float(metrics[key]):.1f}%")
        ratio = _sq_ratio(trainer)
        if ratio is not None:
            parts.append(f"SQ ratio {ratio:g}")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        return "  ".join(parts)


def _sq_ratio(trainer: pl.Trainer) -> float | None:
    model = getattr(trainer.lightning_module, "model", None)
    if model is None or not quant_layers(model):
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, QuantRatioCallback):
            return float(cb.ratio)
    return None


class ParamSummary(ModelSummary):
    """Lightning's model summary as one line: the network's type, its parameters and their size at float32."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        names, types = columns.get("Name", []), columns.get("Type", [])
        kind = types[names.index("model")] if "model" in names else "model"
        print(
            f"model: {kind}, {get_human_readable_count(total_parameters)} parameters "
            f"({get_human_readable_count(trainable_parameters)} trainable), {model_size:.3f} MB at float32",
            flush=True,
        )


def _evaluation(cfg: Mapping[str, Any]) -> str | None:
    ev = cfg.get("eval") or {}
    attacks = list(ev.get("attacks") or [])
    if not attacks:
        return None
    inputs = f"the first {ev['n_samples']}" if ev.get("n_samples") else "all"
    return f"{len(attacks)} attacks ({', '.join(attacks)}) on {inputs} test inputs"


def progress_callbacks(cfg: Mapping[str, Any]) -> list[pl.Callback]:
    """The callbacks of `progress` (and the one-line model summary unless trainer.enable_model_summary=false)."""
    callbacks: list[pl.Callback] = [CompactProgressBar() if progress_enabled(cfg) else EpochSummary(_evaluation(cfg))]
    if (cfg.get("trainer") or {}).get("enable_model_summary", True) is not False:
        callbacks.append(ParamSummary())
    return callbacks
