"""Unstructured pruning of every Conv2d / Linear: magnitude (the baseline) and HYDRA (scores learned under the run's objective).

The `prune` config group (conf/prune/*.yaml, docs/compression.md):
  method       none | magnitude | hydra
  sparsity     the fraction of weights removed (per layer with scope=layer, over all layers with scope=global),
               or null with budget_bytes
  budget_bytes the packed payload (quant/packing.py: model_bytes) the model must fit: the sparsity is solved for it
  scope        layer (the same sparsity in every layer) | global (one ranking over all layers)
  score_epochs HYDRA: the first score_epochs epochs train the importance scores with every other parameter
               frozen; the kept weights are fine-tuned for the remaining epochs, with the same objective

HYDRA (Sehwag et al., NeurIPS 2020): a layer computes with W * top-k(|s|); the top-k passes the gradient
straight through to the scores s, initialized to sqrt(6 / fan_in) * W / max|W| (HYDRA's scaled init), so the
scores are trained by whatever loss the run trains (natural, adversarial, esq, trades). After the score phase
the mask is fixed, the pruned weights are set to 0 and stay 0 (their gradient through the mask is 0).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from esq_lightning.quant.masks import MASK, SCORES, PrunedConv2d, PrunedLinear, keep_mask, topk_mask

__all__ = [
    "METHODS",
    "SCOPES",
    "PruneCallback",
    "add_pruning",
    "init_pruning",
    "prunable_layers",
    "set_score_phase",
    "solve_sparsity",
    "sparsity_report",
]

METHODS = ("none", "magnitude", "hydra")
SCOPES = ("layer", "global")
_PRUNED_OF: dict[type, type] = {nn.Conv2d: PrunedConv2d, nn.Linear: PrunedLinear}
# The largest sparsity the budget solver tries: every layer keeps at least one weight per 1000.
MAX_SPARSITY = 0.999


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every Conv2d / Linear (quantized or not), in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def add_pruning(model: nn.Module, method: str) -> nn.Module:
    """Give every Conv2d / Linear a keep mask (all kept) and, for hydra, frozen scores: the structure a
    pruned checkpoint loads into. Plain layers become PrunedConv2d / PrunedLinear; quantized layers keep
    their class (they read the mask themselves). method none: the model unchanged."""
    if method not in METHODS:
        raise ValueError(f"unknown prune method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "none":
        return model
    for _, layer in prunable_layers(model):
        if type(layer) in _PRUNED_OF:
            layer.__class__ = _PRUNED_OF[type(layer)]
        w = layer.weight
        layer.register_buffer(MASK, torch.ones(w.shape, dtype=torch.bool, device=w.device))
        if method == "hydra":
            layer.register_parameter(SCORES, nn.Parameter(torch.zeros_like(w), requires_grad=False))
    return model


def _importance(layer: nn.Module) -> torch.Tensor:
    scores = layer._parameters.get(SCORES)
    return (scores if scores is not None else layer.weight).detach().abs()


def _keep_counts(layers: list[tuple[str, nn.Module]], sparsity: float, scope: str) -> list[int]:
    if scope == "layer":
        return [max(1, layer.weight.numel() - round(sparsity * layer.weight.numel())) for _, layer in layers]
    if scope != "global":
        raise ValueError(f"unknown prune scope {scope!r}; allowed: {', '.join(SCOPES)}")
    flat = torch.cat([_importance(layer).reshape(-1) for _, layer in layers])
    total = flat.numel()
    keep = topk_mask(flat, max(len(layers), total - round(sparsity * total)))
    counts = [int(c.sum()) for c in keep.split([layer.weight.numel() for _, layer in layers])]
    return [max(1, c) for c in counts]


@torch.no_grad()
def _set_masks(layers: list[tuple[str, nn.Module]], counts: list[int], zero_weights: bool) -> None:
    for (_, layer), k in zip(layers, counts):
        mask = topk_mask(_importance(layer), k)
        layer._buffers[MASK].copy_(mask)
        if zero_weights:
            layer.weight.mul_(mask.to(layer.weight.dtype))


def _payload(model: nn.Module) -> int:
    from esq_lightning.quant.packing import packed_size

    return packed_size(model)["model_bytes"]


def solve_sparsity(model: nn.Module, budget_bytes: int, scope: str) -> float:
    """The smallest sparsity (to 1e-4) whose packed payload fits ``budget_bytes``, found by bisection on a copy.

    ValueError when even MAX_SPARSITY does not fit (the dense parts, e.g. BatchNorm, take the rest)."""
    trial = copy.deepcopy(model)
    layers = prunable_layers(trial)

    def fits(s: float) -> bool:
        _set_masks(layers, _keep_counts(layers, s, scope), zero_weights=False)
        return _payload(trial) <= budget_bytes

    if fits(0.0):
        return 0.0
    if not fits(MAX_SPARSITY):
        raise ValueError(
            f"prune.budget_bytes={budget_bytes} is below the payload at sparsity {MAX_SPARSITY} "
            f"({_payload(trial)} bytes)"
        )
    lo, hi = 0.0, MAX_SPARSITY
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return round(hi, 6)


def init_pruning(model: nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Prune a model built with add_pruning, at the start of training; returns what was done (for results.json).

    magnitude: keep the largest |W|; hydra: initialize the scores (scaled |W|) and keep their top-k, the weights
    stay dense until the score phase ends (set_score_phase). The sparsity is prune.sparsity or solved for
    prune.budget_bytes."""
    method, scope = str(cfg["method"]), str(cfg.get("scope") or "layer")
    if method == "none":
        return {}
    layers = prunable_layers(model)
    if method == "hydra":
        with torch.no_grad():
            for _, layer in layers:
                w = layer.weight
                fan_in = w[0].numel()
                layer._parameters[SCORES].copy_(math.sqrt(6 / fan_in) * w / w.abs().max().clamp_min(1e-12))
    budget = cfg.get("budget_bytes")
    sparsity = solve_sparsity(model, int(budget), scope) if budget is not None else float(cfg["sparsity"])
    _set_masks(layers, _keep_counts(layers, sparsity, scope), zero_weights=method == "magnitude")
    return {
        "method": method,
        "scope": scope,
        "sparsity": sparsity,
        "budget_bytes": budget,
        "score_epochs": int(cfg.get("score_epochs") or 0) if method == "hydra" else 0,
    }


@torch.no_grad()
def set_score_phase(model: nn.Module, scoring: bool) -> None:
    """scoring=True: only the scores train (every other parameter frozen, HYDRA's score phase).

    scoring=False: the mask is fixed to the top-k of the scores, the pruned weights are set to 0, the scores
    freeze and every other parameter trains (the fine-tune phase). Idempotent, so a resumed run can call it."""
    layers = [layer for _, layer in prunable_layers(model) if layer._parameters.get(SCORES) is not None]
    if not layers:
        return
    for name, p in model.named_parameters():
        p.requires_grad_(scoring == (name.rsplit(".", 1)[-1] == SCORES))
    if not scoring:
        for layer in layers:
            mask = layer._buffers[MASK]
            mask.copy_(topk_mask(layer._parameters[SCORES], int(mask.sum())))
            layer.weight.mul_(mask.to(layer.weight.dtype))


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """{"layers": {name: {"kept", "total", "sparsity"}}, "kept", "total", "sparsity"} of the pruned layers."""
    per: dict[str, dict[str, Any]] = {}
    for name, layer in prunable_layers(model):
        mask = keep_mask(layer)
        if mask is None:
            continue
        kept, total = int(mask.sum()), mask.numel()
        per[name] = {"kept": kept, "total": total, "sparsity": 1 - kept / total}
    if not per:
        return {}
    kept = sum(v["kept"] for v in per.values())
    total = sum(v["total"] for v in per.values())
    return {"layers": per, "kept": kept, "total": total, "sparsity": 1 - kept / total}


class PruneCallback(pl.Callback):
    """HYDRA's two phases in one run: epochs < score_epochs train the scores, the rest fine-tune the kept weights."""

    def __init__(self, score_epochs: int) -> None:
        self.score_epochs = int(score_epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_score_phase(pl_module.model, trainer.current_epoch < self.score_epochs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The evaluated and exported model is the fine-tuned one with its mask fixed.
        set_score_phase(pl_module.model, False)
