"""Weight quantizers (BWN, TWN, k-bit uniform), their integer codes and the per-filter relative error.

The functions here are the math of the built-in families; each family's entry
(esq_lightning/config/quantizers.py) names its codes function, and quantize_codes calls the entry's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from esq_lightning.config.choices import QUANT_FAMILIES, UNIFORM_BITS
from esq_lightning.config.quantizers import QuantizerSpec, quantizer_spec

__all__ = [
    "KINDS",
    "TWN_DELTA_FACTOR",
    "codes_function",
    "bwn",
    "bwn_codes",
    "twn",
    "twn_codes",
    "uniform",
    "uniform_codes",
    "uniform_levels",
    "UNIFORM_BITS",
    "UNIFORM_SCALE_ITERS",
    "quantize_weight",
    "quantize_codes",
    "act_quantize",
    "dequantize",
    "relative_error",
]

# The registered families (a live view: a family registered later appears).
KINDS = QUANT_FAMILIES.keys()
TWN_DELTA_FACTOR: float = 0.7
# Alternating least-squares steps of the uniform scale (see uniform_codes); each never raises the error.
UNIFORM_SCALE_ITERS: int = 5


def _rows(w: Tensor, per_filter: bool) -> Tensor:
    # One row per group that shares an alpha: a filter (dim 0), or the whole layer.
    return w.reshape(w.shape[0], -1) if per_filter else w.reshape(1, -1)


def _check_weight(w: Tensor) -> None:
    if w.dim() < 1 or w.shape[0] == 0 or w.numel() == 0:
        raise ValueError(f"expected a non-empty weight, output filters on dim 0; got shape {tuple(w.shape)}")


def dequantize(codes: Tensor, alpha: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """alpha * code, one alpha per row of ``codes`` ([O, d] or [1, O*d]), reshaped to ``shape``.

    bwn(), twn() and the export loader all build their weights here, so an exported model
    dequantizes to exactly the tensor that the training forward used.
    """
    return (alpha.reshape(-1, 1) * codes.to(alpha.dtype)).reshape(shape)


def _kept(w: Tensor, mask: Tensor | None, per_filter: bool) -> tuple[Tensor, Tensor | None]:
    # (rows of w with pruned entries set to 0, rows of the keep mask or None): a pruned weight never
    # enters a scale, a threshold or an error, whatever value the dense tensor holds there.
    rows = _rows(w.detach(), per_filter)
    if mask is None:
        return rows, None
    keep = _rows(mask.to(torch.bool), per_filter)
    return torch.where(keep, rows, torch.zeros_like(rows)), keep


def _mean_abs(rows: Tensor, keep: Tensor | None) -> Tensor:
    # mean |W| per row over the kept weights (every weight without a mask; 0 for a row with none kept).
    if keep is None:
        return rows.abs().mean(dim=1)
    return rows.abs().sum(dim=1) / keep.sum(dim=1).clamp_min(1).to(rows.dtype)


def _masked_codes(codes: Tensor, keep: Tensor | None) -> Tensor:
    return codes if keep is None else torch.where(keep, codes, torch.zeros_like(codes))


def _check_bits(kind: str, bits: int, only: int) -> None:
    if int(bits) != only:
        raise ValueError(f"{kind} quantizer bits {bits!r}; allowed: {only}")


def bwn_codes(w: Tensor, per_filter: bool = True, bits: int = 1, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sign codes (int8 in {-1, +1}, sign(0) = +1) with one row per alpha, and alpha = mean |W|.

    Codes have shape [O, d] (per_filter) or [1, O*d]; alpha has shape [O] or [1], dtype of w. ``bits``
    is BWN's one width, taken so that every family's codes function has the same call. ``mask`` (bool, the
    shape of w; True = kept) restricts the quantizer to the kept weights of a pruned layer: alpha is the
    mean |W| over the kept weights only and a pruned weight gets code 0 (the same in twn_codes, uniform_codes).
    """
    _check_bits("bwn", bits, 1)
    _check_weight(w)
    rows, keep = _kept(w, mask, per_filter)
    alpha = _mean_abs(rows, keep)
    codes = torch.where(rows >= 0, 1, -1).to(torch.int8)
    return _masked_codes(codes, keep), alpha


def twn_codes(w: Tensor, per_filter: bool = True, bits: int = 2, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Ternary codes (int8 in {-1, 0, +1}) and alpha, with Delta = 0.7 * mean |W| per row.

    alpha is the mean of |W| over the entries above Delta, 0 where there are none. ``bits`` is TWN's
    one width (see bwn_codes).
    """
    _check_bits("twn", bits, 2)
    _check_weight(w)
    rows, keep = _kept(w, mask, per_filter)
    mag = rows.abs()
    delta = TWN_DELTA_FACTOR * _mean_abs(rows, keep).unsqueeze(1)
    above = mag > delta
    count = above.sum(dim=1)
    # clamp keeps an empty set at 0 / 1 = 0 instead of NaN, without a host sync.
    alpha = torch.where(above, mag, torch.zeros_like(mag)).sum(dim=1) / count.clamp_min(1).to(mag.dtype)
    codes = (torch.where(rows > delta, 1, 0) - torch.where(rows < -delta, 1, 0)).to(torch.int8)
    return _masked_codes(codes, keep), alpha


def uniform_levels(bits: int) -> int:
    """L = 2^(bits-1) - 1: the codes of the symmetric uniform quantizer are the integers -L..L."""
    if int(bits) not in UNIFORM_BITS:
        raise ValueError(f"uniform quantizer bits {bits!r}; allowed: {', '.join(map(str, UNIFORM_BITS))}")
    return 2 ** (int(bits) - 1) - 1


def uniform_codes(w: Tensor, bits: int, per_filter: bool = True, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric uniform codes (int8 in -L..L, L = 2^(bits-1) - 1) and one scale s per row.

    The scale is fitted to the mean squared error ||W_i - s_i c_i||^2 by alternating minimization,
    starting from max-abs (s = max |W_i| / L, no clipping):
        c = clamp(round(W / s), -L, L)      (the best codes for s)
        s = <W, c> / <c, c>                 (the best scale for c; 0 when c = 0)
    UNIFORM_SCALE_ITERS times, and the last (c, s) pair is returned, so s is exactly the
    least-squares scale of the returned codes. Each half-step never raises the error, so the result
    is at least as close to W as max-abs scaling; at 3-4 bits the fit clips a few outliers and gives
    the bulk of the weights finer steps (the max-abs step is set by one outlier). A learned scale
    (LSQ) would add parameters to the state_dict, which the quantized layers keep identical to the
    plain layers'. An all-zero row gets codes 0 and s = 0.
    """
    _check_weight(w)
    levels = uniform_levels(bits)
    rows, keep = _kept(w, mask, per_filter)
    scale = rows.abs().amax(dim=1) / levels
    tiny = torch.finfo(rows.dtype).tiny if rows.is_floating_point() else 1e-38
    codes = torch.zeros_like(rows)
    for _ in range(UNIFORM_SCALE_ITERS):
        codes = torch.clamp(torch.round(rows / scale.clamp_min(tiny).unsqueeze(1)), -levels, levels)
        codes = torch.where(scale.unsqueeze(1) > 0, codes, torch.zeros_like(codes))
        norm = (codes * codes).sum(dim=1)
        scale = torch.where(norm > 0, (rows * codes).sum(dim=1) / norm.clamp_min(1), torch.zeros_like(norm))
    return _masked_codes(codes.to(torch.int8), keep), scale


_CODES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}


def codes_function(spec: QuantizerSpec) -> Callable[..., tuple[Tensor, Tensor]]:
    """The family's codes function: the entry's own, or the one its "module:function" path names (imported once)."""
    if callable(spec.codes):
        return spec.codes
    fn = _CODES.get(spec.codes)
    if fn is None:
        module, _, name = spec.codes.partition(":")
        fn = getattr(importlib.import_module(module), name)
        _CODES[spec.codes] = fn
    return fn


def quantize_codes(
    w: Tensor,
    kind: str,
    per_filter: bool = True,
    bits: int | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(codes, alpha) of the registered family ``kind`` at ``bits`` (None: the family's only width).

    ``mask`` (bool, True = kept): a pruned layer, quantized over its kept weights only (the family's codes
    function takes ``mask``, as the built-in ones do; docs/compression.md).

    The family's entry (esq_lightning/config/quantizers.py) gives the function; see the *_codes functions.
    """
    spec = quantizer_spec(kind)
    if bits is None:
        if len(spec.widths) != 1:
            raise ValueError(f"the {kind} quantizer needs bits")
        bits = spec.widths[0]
    if int(bits) not in spec.widths:
        raise ValueError(f"{kind} quantizer bits {bits!r}; allowed: {', '.join(map(str, spec.widths))}")
    if mask is None:
        return codes_function(spec)(w, per_filter=per_filter, bits=int(bits))
    return codes_function(spec)(w, per_filter=per_filter, bits=int(bits), mask=mask)


def bwn(w: Tensor, per_filter: bool = True) -> Tensor:
    """Binary weights alpha_i * sign(W_i) per output filter (per_filter=False: one alpha per layer)."""
    codes, alpha = bwn_codes(w, per_filter)
    return dequantize(codes, alpha, w.shape)


def twn(w: Tensor, per_filter: bool = True) -> Tensor:
    """Ternary weights in {-alpha_i, 0, +alpha_i} per output filter (per_filter=False: per layer)."""
    codes, alpha = twn_codes(w, per_filter)
    return dequantize(codes, alpha, w.shape)


def uniform(w: Tensor, bits: int, per_filter: bool = True) -> Tensor:
    """Symmetric uniform weights s_i * c, c in -L..L (L = 2^(bits-1) - 1), per output filter or per layer."""
    codes, scale = uniform_codes(w, bits, per_filter)
    return dequantize(codes, scale, w.shape)


def quantize_weight(w: Tensor, kind: str, per_filter: bool = True, bits: int | None = None) -> Tensor:
    """Quantized copy of ``w`` (no gradient) by the registered family ``kind`` at ``bits`` (see quantize_codes)."""
    codes, alpha = quantize_codes(w, kind, per_filter, bits)
    return dequantize(codes, alpha, w.shape)


def relative_error(w: Tensor, q: Tensor) -> Tensor:
    """e_i = ||W_i - Q_i||_1 / ||W_i||_1 per output filter, 0 for an all-zero filter."""
    w2 = w.detach().reshape(w.shape[0], -1)
    q2 = q.detach().reshape(q.shape[0], -1)
    num = (w2 - q2).abs().sum(dim=1)
    den = w2.abs().sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def act_quantize(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Unsigned k-bit activations on [0, alpha] (PACT): round(clamp(x, 0, alpha) * n / alpha) * alpha / n, n = 2^k - 1.

    Straight-through: the gradient to x is 1 inside (0, alpha) and 0 where the clamp cuts, the
    rounding passes the gradient unchanged; the gradient to alpha is 1 where x >= alpha (PACT's
    estimator). Attacks therefore differentiate through the straight-through path (BPDA) and see
    the gradient of the clipped activation, not the zero gradient of the rounding.
    """
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"activation bits {bits!r}; allowed: 1..8 (32 = no activation quantization)")
    n = 2 ** int(bits) - 1
    y = torch.minimum(x.clamp_min(0), alpha)
    step = alpha.detach() / n
    q = torch.round(y.detach() / step) * step
    return y + (q - y.detach())
