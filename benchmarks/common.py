"""Benchmark plumbing: settings and presets, the model and batches, a CUDA-aware clock, machine info, medians."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from esq_lightning.models import MODELS
from esq_lightning.quant import draw_selection, quantize_model, set_sq_ratio
from esq_lightning.rng import step_generator
from esq_lightning.utils import physical_cores


@dataclass
class Settings:
    """What every variant of the benchmark shares: one model, one batch shape, one attack, one precision."""

    model: str = "resnet20"
    batch: int = 64
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    device: str = "cpu"
    threads: int = 1
    precision: str = "32"  # "32" (float32) or "bf16" (autocast, as trainer.precision=bf16-mixed)
    channels_last: bool = False
    quant: str = "bwn"
    ratio: float = 0.6  # SQ ratio of the quantized variants (the schedule's third stage)
    pgd_steps: int = 10
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 5  # timed steps per variant and round
    warmup: int = 1  # steps per run excluded from the timing (allocator, optimizer state, first-call caches)
    rounds: int = 3  # per round the two sides of each ratio run back to back, so machine drift hits both alike
    seed: int = 0
    # wall: perf_counter (after a CUDA sync). process: CPU time of this process, which does not advance while
    # other jobs hold the cores: steadier ratios on a shared CPU at 1 thread (CPU only; counts all threads' work).
    clock: str = "wall"
    memory_pairing: list[str] = field(default_factory=list)  # [] = every residual module of the model


# The full form: representative of CIFAR training (ResNet-20 / CIFAR-10 shapes, PGD-10, ratio 0.6).
FULL = Settings()
# The reduced form for CI: a tiny CNN on digits-shaped inputs, PGD-2, one round; it checks that every number
# is produced, not what the numbers are.
SMOKE = Settings(model="small_cnn", batch=32, in_channels=1, image_size=8, pgd_steps=2, steps=2, warmup=1, rounds=1)


def settings_dict(s: Settings) -> dict[str, Any]:
    return asdict(s)


def device_of(s: Settings) -> torch.device:
    return torch.device(s.device)


def build_base_model(s: Settings) -> nn.Module:
    """The full-precision architecture, seeded: every variant starts from a copy of the same weights."""
    torch.manual_seed(s.seed)
    model = MODELS[s.model](num_classes=s.num_classes, in_channels=s.in_channels)
    return prepare_model(model, s)


def prepare_model(model: nn.Module, s: Settings) -> nn.Module:
    model = model.to(device_of(s))
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def quantized_copy(base: nn.Module, s: Settings) -> nn.Module:
    """A BWN/TWN copy of the base model at the benchmark's SQ ratio, with a selection drawn."""
    model = quantize_model(copy.deepcopy(base), s.quant)
    set_sq_ratio(model, s.ratio)
    draw_selection(model, step_generator(s.seed, 0, 0))
    return model


def make_data(s: Settings, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n CIFAR-like samples: pixels on the 1/255 grid in [0, 1], uniform labels (on CPU)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, s.in_channels, s.image_size, s.image_size), generator=g).float() / 255
    y = torch.randint(0, s.num_classes, (n,), generator=g)
    return x, y


def preloaded_batches(s: Settings, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` distinct batches already sliced and on the device: the "no data pipeline" baseline."""
    x, y = make_data(s, s.batch * count)
    dev = device_of(s)
    out = []
    for i in range(count):
        xb, yb = x[i * s.batch : (i + 1) * s.batch].to(dev), y[i * s.batch : (i + 1) * s.batch].to(dev)
        if s.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out.append((xb, yb))
    return out


def autocast(s: Settings) -> contextlib.AbstractContextManager:
    """The forward-pass context of the configured precision (Lightning's bf16-mixed does the same)."""
    if s.precision == "bf16":
        return torch.autocast(device_type=device_of(s).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lightning_precision(s: Settings) -> str:
    return "bf16-mixed" if s.precision == "bf16" else "32-true"


class Clock:
    """perf_counter that first waits for queued CUDA work, so a step's time is its real time on the device;
    or, with kind="process", the CPU time of this process (CPU devices only)."""

    def __init__(self, device: torch.device, kind: str = "wall") -> None:
        if kind not in ("wall", "process"):
            raise ValueError(f"clock must be 'wall' or 'process', got {kind!r}")
        if kind == "process" and device.type != "cpu":
            raise ValueError("the process clock measures CPU work: use clock 'wall' on an accelerator")
        self.cuda = device.type == "cuda"
        self.device = device
        self.read = time.process_time if kind == "process" else time.perf_counter

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.read()


def intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners and tips; the benchmark prints its own table."""
    import logging
    import warnings

    names = ["pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(s: Settings) -> dict[str, Any]:
    """Where the numbers were taken: CPU, cores, torch, threads, device; load average shows a busy machine."""
    import pytorch_lightning as pl

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "device": s.device,
        "load_average_start": load_average(),
    }
    if device_of(s).type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device_of(s))
        info["cuda"] = torch.version.cuda
    try:
        import torchattacks

        info["torchattacks"] = torchattacks.__version__
    except ImportError:
        info["torchattacks"] = None
    return info
