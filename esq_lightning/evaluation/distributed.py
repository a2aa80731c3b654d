"""Distributed evaluation: esq-eval over the processes of a `trainer=` config, every test input exactly once.

`trainer=ddp_cpu` (2 CPU processes, gloo) or `trainer=ddp` (GPUs, nodes) start the processes the way
esq-train does (Lightning's launcher re-runs the command for ranks 1..N-1 in the same Hydra run
directory; under torchrun or SLURM the launcher's environment is used). The test inputs are cut into
the same batches as a single-process run, and each process takes a contiguous block of whole batches:
no input is padded, repeated or dropped (unlike torch's DistributedSampler, which pads the last ranks
with repeated inputs so every rank has the same count, and so changes the accuracy). The per-sample
masks are gathered by batch index and put back in order, so the merged result is the single-process one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from esq_lightning.errors import ESQUserError


@dataclass
class Shard:
    """This process's place among the evaluation's processes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, n_batches: int) -> range:
        """The block of batch indices of this process: sizes differ by at most one, every index exactly once."""
        per, extra = divmod(n_batches, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def merge(self, done: Mapping[int, tuple[Tensor, dict[str, Any]]]) -> dict[int, tuple[Tensor, dict[str, Any]]]:
        """The union of every process's {batch index: (mask, record)}; an index seen twice is an error."""
        if self.world_size == 1:
            return dict(done)
        mine = {i: (mask.tolist(), rec) for i, (mask, rec) in done.items()}
        parts: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, mine)
        merged: dict[int, tuple[Tensor, dict[str, Any]]] = {}
        for part in parts:
            for i, (mask, rec) in part.items():
                if i in merged:
                    raise RuntimeError(f"batch {i} was evaluated by two processes")
                merged[i] = (torch.tensor(mask, dtype=torch.bool), rec)
        return merged

    def broadcast(self, obj: Any) -> Any:
        """rank 0's obj on every process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


# Trainer keys esq-eval uses; the others (epochs, batches per epoch, ...) are training's.
_USED = ("accelerator", "strategy", "devices", "num_nodes")


def _single_device(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ESQUserError("trainer.accelerator=gpu: no CUDA device here; allowed: trainer=cpu or trainer=ddp_cpu")
        return "cuda"
    if accelerator == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_distributed(trainer: Mapping[str, Any] | None) -> bool:
    if not trainer:
        return False
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    many = (
        nodes > 1
        or devices == -1
        or (isinstance(devices, list) and len(devices) > 1)
        or (isinstance(devices, int) and devices > 1)
        or (isinstance(devices, str) and devices not in ("1", "auto"))
    )
    return str(trainer.get("strategy", "auto")) == "ddp" or many


def launch(trainer: Mapping[str, Any] | None) -> Shard:
    """Start the evaluation's processes as `trainer` says and return this one's shard.

    None (esq-eval's default) or a single-device trainer: this process alone, on the GPU when there is
    one (accelerator=auto) or on trainer.accelerator. strategy=ddp: one process per device and node,
    with the process group set up (gloo on CPU, NCCL on GPUs); evaluation is float32 whatever
    trainer.precision says.
    """
    trainer = dict(trainer or {})
    accelerator = str(trainer.get("accelerator", "auto"))
    if not is_distributed(trainer):
        return Shard(0, 1, _single_device(accelerator))
    strategy = str(trainer.get("strategy", "auto"))
    if strategy not in ("ddp", "auto"):
        raise ESQUserError(
            f"trainer.strategy={strategy}: esq-eval runs one process per device with strategy=ddp "
            "(trainer=ddp_cpu or trainer=ddp); allowed: ddp, auto"
        )
    from lightning_fabric import Fabric

    fabric = Fabric(
        accelerator=accelerator,
        strategy="ddp",
        devices=trainer.get("devices", "auto"),
        num_nodes=int(trainer.get("num_nodes", 1) or 1),
        precision="32-true",
    )
    fabric.launch()
    return Shard(fabric.global_rank, fabric.world_size, fabric.device)
