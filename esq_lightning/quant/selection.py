"""Stochastic Quantization filter selection (Dong et al., BMVC 2017): roulette without replacement."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from esq_lightning.config.choices import SQ_FUNCTIONS, SQ_VARIANTS
from esq_lightning.rng import Stream, step_generator

__all__ = [
    "VARIANTS",
    "SELECTION_FUNCTIONS",
    "num_quantized",
    "selection_probabilities",
    "sample_selection",
    "sq_generator",
]

VARIANTS: tuple[str, ...] = SQ_VARIANTS
SELECTION_FUNCTIONS: tuple[str, ...] = SQ_FUNCTIONS
_EPS = 1e-7


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def num_quantized(ratio: float, n: int) -> int:
    """Number of filters quantized at SQ ratio ``ratio`` out of ``n``: round(ratio * n), clipped.

    Python's round (half to even); the schedule's ratios (multiples of 0.2) never hit a tie.
    """
    if ratio >= 1:
        return n
    if ratio <= 0:
        return 0
    return min(n, max(0, round(ratio * n)))


def _normalize(w: Tensor) -> Tensor:
    # NaN/inf errors (a diverged layer) must not crash the draw; no mass at all means uniform.
    # The host sync is harmless: the selection is drawn once per layer and step, off the forward.
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0).clamp_min_(0)
    total = float(w.sum())
    if not (0 < total < math.inf):
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


def selection_probabilities(err: Tensor, variant: str = "paper", f: str = "linear") -> Tensor:
    """Roulette probabilities (float64, sum 1) over the filters of one layer.

    paper: probability of being QUANTIZED, p_i ∝ f(1 / (e_i + 1e-7)).
    reference: probability of being KEPT full precision, p_i ∝ e_i (``f`` is ignored).
    """
    _check_choice("SQ variant", variant, VARIANTS)
    _check_choice("SQ selection function f", f, SELECTION_FUNCTIONS)
    e = err.detach().reshape(-1).to(torch.float64)
    if variant == "reference":
        return _normalize(e)
    x = 1.0 / (e + _EPS)
    if f == "constant":
        w = torch.ones_like(x)
    elif f == "linear":
        w = x
    elif f == "softmax":
        w = torch.exp(x - x.max())
    else:  # sigmoid
        w = torch.sigmoid(x)
    return _normalize(w)


def _roulette(p: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k distinct indices drawn one after another with probability ∝ p among those left.

    torch.multinomial refuses k larger than the number of positive entries; the remainder is
    then filled uniformly from the zero-probability entries (the roulette has no mass left there).
    """
    positive = p > 0
    # selection_probabilities always leaves some mass (uniform when there is none), so k_pos >= 1.
    k_pos = min(k, int(positive.sum()))
    picked = torch.multinomial(p, k_pos, replacement=False, generator=generator)
    if k > k_pos:
        zero_idx = torch.nonzero(~positive).reshape(-1)
        order = torch.randperm(zero_idx.numel(), generator=generator, device=p.device)
        picked = torch.cat([picked, zero_idx[order[: k - k_pos]]])
    return picked


def sample_selection(
    err: Tensor,
    ratio: float,
    generator: torch.Generator | None,
    variant: str = "paper",
    f: str = "linear",
) -> Tensor:
    """Bool mask [O] (True = filter quantized) with exactly num_quantized(ratio, O) True entries.

    The draw runs on the generator's device (the default device of ``err`` without one) so that a
    given seed gives the same selection on CPU and GPU; the mask is returned on ``err.device``.
    """
    _check_choice("SQ variant", variant, VARIANTS)
    _check_choice("SQ selection function f", f, SELECTION_FUNCTIONS)
    n = err.numel()
    k = num_quantized(ratio, n)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=err.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=err.device)
    draw_device = generator.device if generator is not None else err.device
    p = selection_probabilities(err.detach().to(draw_device), variant, f)
    mask = torch.zeros(n, dtype=torch.bool, device=draw_device)
    if variant == "paper":
        mask[_roulette(p, k, generator)] = True
    else:
        # The reference code draws the full-precision filters and quantizes the rest.
        mask.fill_(True)
        mask[_roulette(p, n - k, generator)] = False
    return mask.to(err.device)


def sq_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator seeded from (seed, step) alone: the SQ stream of `esq_lightning.rng.step_generator`.

    The training step draws with the same generator for its global step, so every data-parallel rank and
    a resumed run draw the same selection without communicating.
    """
    return step_generator(seed, step, Stream.SQ)
