"""The random streams of a training step: every draw comes from a generator seeded by (seed, step, stream).

A step's randomness is then a pure function of the seed and the global step: identical on every data-parallel
rank and after a resume, with no communication and no saved RNG state. Each consumer has its own Stream, so
adding a draw to one never shifts another's numbers.
"""

from __future__ import annotations

from enum import IntEnum

import torch

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


class Stream(IntEnum):
    """Who draws from a step generator. The values are part of reproducibility: never renumber them."""

    SQ = 0  # Stochastic Quantization's roulette selection (quant/selection.py)
    ATTACK = 1  # the training PGD's random start (training/module.py)
    VALIDATION_ATTACK = 2  # the PGD of the validation attack callback, per batch (training/callbacks/pgd.py)
    GRADALIGN = 3  # the GradAlign regulariser's point x + eta (training/attacks.py gradalign_term)


def step_generator(seed: int, step: int, stream: int = Stream.SQ) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream)."""
    # SplitMix64-style mixing keeps nearby (seed, step) pairs far apart.
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    g = torch.Generator()
    g.manual_seed(z & _MASK63)
    return g
