"""Small shared helpers: seeded per-step generators, threads, atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

_MASK63 = (1 << 63) - 1


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream).

    Every random draw of a training step (SQ selection, PGD random start) comes from one of these,
    so a step's randomness is a pure function of the seed and the global step: identical on every
    data-parallel rank and after a resume, with no communication and no saved RNG state.
    """
    # SplitMix64-style mixing keeps nearby (seed, step) pairs far apart.
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    z ^= z >> 31
    g = torch.Generator()
    g.manual_seed(z & _MASK63)
    return g


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave torch's default); returns the number in force."""
    if threads is not None and threads > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
