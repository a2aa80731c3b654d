"""Mixed precision per layer: bits by layer name, a first/last rule, and a robustness-aware allocation under a byte budget.

quant.layer_bits {name: bits} sets layers explicitly; quant.first_last_bits sets the first Conv2d and the last
Linear; quant.budget_bytes allocates bits from quant.allocate_bits to every layer so that the packed payload
(quant/packing.py: model_bytes) fits the budget:

  sensitivity  for each layer l and width b: the drop of FGSM accuracy (eps = eval.eps, on n_samples validation
               inputs drawn with the run's seed, eval mode) when l alone is quantized to b bits and every other
               layer stays in full precision, from the model the run starts from;
  allocation   every layer starts at the smallest width; greedily, the upgrade (one layer to its next width)
               with the largest drop removed per byte added that still fits the budget is taken, until none
               fits (ties: the earlier layer, the smaller width).

Everything is deterministic given the start weights and the seed, so the same run allocates the same bits.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["allocate_bits", "fgsm_accuracy", "layer_sensitivity", "resolve_layer_bits"]


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def resolve_layer_bits(model: nn.Module, cfg_quant: Mapping[str, Any]) -> dict[str, int]:
    """{layer name: bits} of quant.first_last_bits (first Conv2d, last Linear) and quant.layer_bits (which wins).

    ValueError naming an unknown layer and the model's layer names."""
    named = _layers(model)
    names = [n for n, _ in named]
    out: dict[str, int] = {}
    first_last = cfg_quant.get("first_last_bits")
    if first_last is not None:
        convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in named if isinstance(m, nn.Linear)]
        out.update({n: int(first_last) for n in convs[:1] + linears[-1:]})
    explicit = dict(cfg_quant.get("layer_bits") or {})
    unknown = [k for k in explicit if k not in names]
    if unknown:
        raise ValueError(
            f"quant.layer_bits names {', '.join(map(str, unknown))}: not a Conv2d/Linear of the model; "
            f"allowed: {', '.join(names)}"
        )
    out.update({str(k): int(v) for k, v in explicit.items()})
    return out


def fgsm_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> float:
    """Accuracy under FGSM (L_inf, one step of size eps, inputs in [0, 1]) in eval mode at full quantization."""
    from esq_lightning.attacks import frozen_eval
    from esq_lightning.quant import full_quantization

    with frozen_eval(model), full_quantization(model):
        xa = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        (grad,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            adv = (x + eps * grad.sign()).clamp(0, 1)
            return float((model(adv).argmax(1) == y).float().mean())


def _plain_copy(model: nn.Module) -> nn.Module:
    from esq_lightning.quant.modules import QuantMixin, _to_plain

    plain = copy.deepcopy(model)
    for _, m in plain.named_modules():
        if isinstance(m, QuantMixin):
            _to_plain(m)
    return plain


def layer_sensitivity(model: nn.Module, x: Tensor, y: Tensor, eps: float, widths: Sequence[int]) -> dict[str, Any]:
    """{"reference": FGSM accuracy in full precision, "drop": {layer: {bits: drop}}} (see the module docstring)."""
    from esq_lightning.quant import quantize_model

    plain = _plain_copy(model)
    reference = fgsm_accuracy(plain, x, y, eps)
    drop: dict[str, dict[int, float]] = {}
    for name, _ in _layers(plain):
        drop[name] = {}
        for b in widths:
            if int(b) >= 32:
                drop[name][int(b)] = 0.0
                continue
            trial = quantize_model(copy.deepcopy(plain), "full", layer_bits={name: int(b)})
            drop[name][int(b)] = reference - fgsm_accuracy(trial, x, y, eps)
    return {"reference": reference, "drop": drop}


def _payload(model: nn.Module, layer_bits: Mapping[str, int]) -> int:
    from esq_lightning.quant import quantize_model
    from esq_lightning.quant.packing import packed_size

    return packed_size(quantize_model(_plain_copy(model), "full", layer_bits=dict(layer_bits)))["model_bytes"]


def allocate_bits(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    widths: Sequence[int],
    budget_bytes: int,
) -> dict[str, Any]:
    """The greedy allocation under ``budget_bytes``: {"layer_bits", "model_bytes", "sensitivity", ...}.

    ValueError when even the smallest width everywhere does not fit."""
    widths = sorted({int(b) for b in widths})
    sens = layer_sensitivity(model, x, y, eps, widths)
    names = list(sens["drop"])
    bits = {n: widths[0] for n in names}
    size = _payload(model, bits)
    if size > budget_bytes:
        raise ValueError(
            f"quant.budget_bytes={budget_bytes} is below the payload with every layer at {widths[0]} bits "
            f"({size} bytes)"
        )
    # The payload is a sum over tensors, so each layer's cost of a width is measured once against the base.
    cost = {n: {b: _payload(model, {**bits, n: b}) - size for b in widths} for n in names}
    while True:
        best: tuple[float, int, str, int] | None = None
        for i, n in enumerate(names):
            k = widths.index(bits[n])
            if k + 1 == len(widths):
                continue
            nxt = widths[k + 1]
            added = cost[n][nxt] - cost[n][bits[n]]
            if size + added > budget_bytes:
                continue
            gain = (sens["drop"][n][bits[n]] - sens["drop"][n][nxt]) / max(added, 1)
            key = (gain, -i, n, nxt)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            break
        _, _, n, nxt = best
        size += cost[n][nxt] - cost[n][bits[n]]
        bits[n] = nxt
    return {
        "layer_bits": bits,
        "model_bytes": size,
        "budget_bytes": int(budget_bytes),
        "widths": widths,
        "sensitivity": {
            "metric": "fgsm",
            "eps": eps,
            "n_samples": int(len(x)),
            "reference": sens["reference"],
            "drop": {n: {str(b): d for b, d in v.items()} for n, v in sens["drop"].items()},
        },
    }
