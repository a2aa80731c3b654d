"""TensorBatchLoader: a fast, reproducible, DDP-aware batch iterable over in-memory tensors."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers; nearby tuples give unrelated streams."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TensorBatchLoader:
    """Yields (x[idx], y[idx]) batches from tensors on any device, without worker processes.

    Shuffling draws a permutation from a CPU torch.Generator seeded by (seed, epoch), where epoch is
    `epoch_fn()` when given (the datamodules pass the trainer's current epoch) and otherwise an
    internal counter that advances on every `__iter__`. Every rank draws the same permutation and
    keeps `perm[rank::world_size]`; the permutation is padded by wrapping around (drop_last=False)
    or truncated (drop_last=True) first, so every rank gets the same number of batches, as with
    DistributedSampler. `augment_fn(x_batch, generator)` runs once per batch on the whole batch
    with a generator seeded by (seed, epoch, batch index, rank).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment_fn: AugmentFn | None = None,
        epoch_fn: Callable[[], int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augment_fn = augment_fn
        self.epoch_fn = epoch_fn
        self.rank = rank
        self.world_size = world_size
        self._epoch_counter = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (padding included)."""
        n = len(self.x)
        if self.world_size == 1:
            return n
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order for `epoch` (CPU int64), before batching."""
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        if self.world_size > 1:
            total = self.num_samples * self.world_size
            if total > n:
                # Wrap around so all ranks get equally many samples (a few repeat, as in DistributedSampler).
                perm = torch.cat([perm, perm[: total - n].repeat(math.ceil((total - n) / max(n, 1)))[: total - n]])
            perm = perm[:total][self.rank :: self.world_size]
        return perm

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.epoch_fn is not None:
            epoch = int(self.epoch_fn())
        else:
            epoch = self._epoch_counter
            self._epoch_counter += 1
        idx = self.indices(epoch).to(self.x.device)
        bs = self.batch_size
        for b in range(len(self)):
            sel = idx[b * bs : (b + 1) * bs]
            xb = self.x[sel]
            yb = self.y[sel] if self.y.device == self.x.device else self.y[sel.to(self.y.device)]
            if self.augment_fn is not None:
                g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, b, self.rank))
                xb = self.augment_fn(xb, g)
            yield xb, yb
