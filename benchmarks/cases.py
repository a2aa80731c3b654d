"""The timed variants (hand-written loop, Lightning with tensors or the datamodule, PGD ours/torchattacks) and the memory probe."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from benchmarks.common import (
    Clock,
    Settings,
    autocast,
    device_of,
    intervals,
    lightning_precision,
    make_data,
    quiet_lightning,
)
from esq_lightning.attacks import pgd
from esq_lightning.data import CropFlip, TensorDataModule
from esq_lightning.pairing import forward_with_activations
from esq_lightning.quant import draw_selection, quant_layers, sq_generator
from esq_lightning.rng import Stream, step_generator
from esq_lightning.training.callbacks import PGDCallback, QuantRatioCallback, TrainAttack
from esq_lightning.training.module import ESQModule
from esq_lightning.training.objectives import Objective

Batches = list[tuple[Tensor, Tensor]]


def sgd_factory() -> Callable[..., torch.optim.Optimizer]:
    """SPEC section 3's quantization-training optimizer."""
    return functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4)


def train_attack(s: Settings) -> TrainAttack:
    return TrainAttack(eps=s.eps, step_size=s.step_size, steps=s.pgd_steps)


class HandLoop:
    """The training step written in plain PyTorch: SQ draw, PGD, objective, backward, SGD step.

    The same arithmetic as ESQModule.training_step (same generators per step), without metrics,
    logging or any loop machinery: what Lightning's overhead is measured against.
    """

    def __init__(self, model: nn.Module, method: str, s: Settings, time_attack: bool = False) -> None:
        self.model, self.s = model, s
        self.objective = Objective(method)
        self.attack = train_attack(s)
        self.quantized = bool(quant_layers(model))
        self.optimizer = sgd_factory()(params=model.parameters())
        self.clock = Clock(device_of(s), s.clock)
        # With time_attack, the attack and the loss forward/backward inside each step are timed too (the
        # ESQ/Madry floor); a few more clock reads per step, each a device sync on CUDA, so only the Madry
        # variant does it.
        self.time_attack = time_attack
        self.attack_times: list[float] = []
        self.loss_times: list[float] = []

    def _timed_attack(self, *args: Any, **kwargs: Any) -> Tensor:
        t0 = self.clock.now()
        out = self.attack(*args, **kwargs)
        self.attack_times.append(self.clock.now() - t0)
        return out

    def step(self, i: int, x: Tensor, y: Tensor) -> Tensor:
        if self.s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.quantized:
            draw_selection(self.model, sq_generator(self.s.seed, i))
        fn = self._timed_attack if self.time_attack else self.attack
        attack = functools.partial(fn, self.model, generator=step_generator(self.s.seed, i, Stream.ATTACK))
        t0 = self.clock.now() if self.time_attack else 0.0
        with autocast(self.s):
            out = self.objective(self.model, x, y, attack)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.time_attack:
            # The loss forward/backward (objective minus its attack, plus backward): what ESQ does twice.
            self.loss_times.append(self.clock.now() - t0 - self.attack_times[-1])
        self.optimizer.step()
        return out.loss

    def run(self, batches: Batches, total: int) -> list[float]:
        """Wall time of each of `total` steps, stamped at the top of every iteration (batch fetch included)."""
        stamps = []
        self.attack_times, self.loss_times = [], []
        it = iter(batches)
        for i in range(total):
            stamps.append(self.clock.now())
            x, y = next(it)
            self.step(i, x, y)
        stamps.append(self.clock.now())
        return intervals(stamps)


class _StepStamps(pl.Callback):
    """Stamps every on_train_batch_start: consecutive stamps bound one full loop iteration (fetch, transfer,
    training_step, backward, optimizer step, logging and metric bookkeeping, callbacks)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.stamps: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.stamps.append(self.clock.now())


class _BenchESQModule(ESQModule):
    """ESQModule that ends the epoch at batch `stop_at`, after its start was stamped (-1: Lightning's skip)."""

    stop_at: int = -1

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if batch_idx == self.stop_at else None


class SyntheticDataModule(TensorDataModule):
    """The project's TensorDataModule over random CIFAR-like tensors, with the datasets' batched augmentation
    (crop + flip at 32x32 as CIFAR, 1-pixel crop without flip at 8x8 as digits); device-resident on CUDA."""

    def __init__(self, s: Settings, n_train: int) -> None:
        super().__init__(batch_size=s.batch, seed=s.seed, device_resident=device_of(s).type == "cuda")
        self.s, self.n_train = s, n_train
        self.num_classes, self.in_channels, self.image_size = s.num_classes, s.in_channels, s.image_size

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        x, y = make_data(self.s, self.n_train, seed=1)
        xv, yv = make_data(self.s, self.s.batch, seed=2)
        return x, y, xv, yv, xv, yv

    def _augment_fn(self) -> CropFlip:
        big = self.s.image_size >= 32
        return CropFlip(padding=4 if big else 1, flip=big)


class _Batches:
    """Ready batches as one loader (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LightningRun:
    """ESQModule driven by a real pl.Trainer, one fit per run; the model and its weights persist across runs."""

    def __init__(self, model: nn.Module, s: Settings, data: str = "tensors", method: str = "esq") -> None:
        self.s, self.data = s, data
        self.module = _BenchESQModule(
            model=model,
            objective=Objective(method),
            num_classes=s.num_classes,
            optimizer=sgd_factory(),
            seed=s.seed,
            channels_last=s.channels_last,
        )
        self.clock = Clock(device_of(s), s.clock)

    def _trainer(self, stamps: _StepStamps) -> pl.Trainer:
        dev = device_of(self.s)
        accelerator = "gpu" if dev.type == "cuda" else dev.type
        devices = [dev.index] if dev.index is not None else 1
        callbacks = [
            PGDCallback(eps=self.s.eps, step_size=self.s.step_size, steps=self.s.pgd_steps, val_every_n_epochs=0),
            # The ratio stays at the benchmark's value: the schedule's next stage is a million epochs away.
            QuantRatioCallback(start=self.s.ratio, step=0.2, every_n_epochs=10**6),
            stamps,
        ]
        # Progress bar, logger, checkpointing and model summary are off: they print or write per N steps or per
        # epoch, not per step, and would only add noise. Everything the module does per step stays on.
        return pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            max_epochs=1,
            precision=lightning_precision(self.s),
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,
            use_distributed_sampler=False,
            callbacks=callbacks,
        )

    def run(self, batches: Batches, total: int) -> list[float]:
        stamps = _StepStamps(self.clock)
        self.module.stop_at = total
        with quiet_lightning():
            trainer = self._trainer(stamps)
            if self.data == "datamodule":
                dm = SyntheticDataModule(self.s, n_train=self.s.batch * (total + 1))
                trainer.fit(self.module, datamodule=dm)
            else:
                trainer.fit(self.module, train_dataloaders=_Batches(batches[: total + 1]))
        if len(stamps.stamps) != total + 1:
            raise RuntimeError(f"Lightning ran {len(stamps.stamps)} batch starts, expected {total + 1}")
        return intervals(stamps.stamps)


class PGDRun:
    """Only the training attack on a fixed (quantized, selection drawn) model: ours or torchattacks' PGD."""

    def __init__(self, model: nn.Module, s: Settings, library: str = "ours") -> None:
        self.model, self.s, self.library = model, s, library
        self.clock = Clock(device_of(s), s.clock)
        if library == "torchattacks":
            import torchattacks

            self.atk = torchattacks.PGD(model, eps=s.eps, alpha=s.step_size, steps=s.pgd_steps, random_start=True)

    def attack(self, i: int, x: Tensor, y: Tensor) -> Tensor:
        with autocast(self.s):
            if self.library == "torchattacks":
                return self.atk(x, y)
            return pgd(
                self.model,
                x,
                y,
                eps=self.s.eps,
                step_size=self.s.step_size,
                steps=self.s.pgd_steps,
                generator=step_generator(self.s.seed, i, Stream.ATTACK),
            )

    def run(self, batches: Batches, total: int) -> list[float]:
        stamps = []
        for i in range(total):
            x, y = batches[i % len(batches)]
            stamps.append(self.clock.now())
            self.attack(i, x, y)
        stamps.append(self.clock.now())
        return intervals(stamps)


def _saved_storages(fn: Callable[[], Any]) -> tuple[Any, dict[tuple[str, int], int]]:
    """Run fn and record, per storage, the bytes autograd saved for backward (views share their base's storage)."""
    seen: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def esq_memory(model: nn.Module, batch: tuple[Tensor, Tensor], s: Settings, pairing: list[str]) -> dict[str, Any]:
    """Bytes saved for backward by one error-silenced loss graph (clean + adversarial forward + pairing).

    All of it is alive at once just before backward, so unique storages add up to the activation memory
    at the step's peak. The attack runs first, outside the probe: its graphs are freed step by step.
    """
    x, y = batch
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if quant_layers(model):
        draw_selection(model, sq_generator(s.seed, 0))
    with autocast(s):
        x_adv = train_attack(s)(model, x, y, generator=step_generator(s.seed, 0, Stream.ATTACK))
    objective = Objective("esq", pairing_layers=pairing, pairing_lambdas=[1.0] * len(pairing))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with autocast(s):
        out, seen = _saved_storages(lambda: objective(model, x, y, lambda *a, **k: x_adv))
    total = sum(seen.values())
    param_bytes = sum(b for (_, ptr), b in seen.items() if ptr in params)
    with torch.no_grad(), autocast(s):
        _, acts = forward_with_activations(model, x, [n for n in pairing if n != "logits"])
    paired = sum(a.numel() * a.element_size() for a in acts.values())
    del out
    result: dict[str, Any] = {
        "pairing": pairing,
        "saved_bytes": total,
        "saved_activation_bytes": total - param_bytes,
        "paired_output_bytes": paired,  # one branch (clean) of the paired module outputs, logits excluded
    }
    if device_of(s).type == "cuda":
        result["cuda_peak_bytes"] = _cuda_step_peak(model, batch, s, pairing)
    return result


def _cuda_step_peak(model: nn.Module, batch: tuple[Tensor, Tensor], s: Settings, pairing: list[str]) -> int:
    """Peak CUDA memory of one whole training step above what was allocated before it."""
    dev = device_of(s)
    loop = HandLoop(copy.deepcopy(model), "esq", s)
    loop.objective = Objective("esq", pairing_layers=pairing, pairing_lambdas=[1.0] * len(pairing))
    loop.step(0, *batch)  # optimizer state allocated outside the measured step
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    loop.step(1, *batch)
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base
