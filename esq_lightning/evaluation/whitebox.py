"""White-box evaluation of one model: clean accuracy and accuracy under each attack, in eval mode at ratio 1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from esq_lightning.attacks import ATTACKS, run_attack
from esq_lightning.quant import full_quantization


def attack_budget(name: str, eps: float, params: Mapping[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """The eps an attack runs at, and its other parameters.

    The run's threat-model eps (L_inf) applies to the L_inf attacks; L2 attacks keep their own
    budget (their default, or eval.params.<name>.eps). An attack's own `eps` always wins.
    """
    if name not in ATTACKS:
        raise ValueError(f"eval.attacks: unknown attack '{name}'; allowed: {', '.join(ATTACKS)}")
    extra = {k: v for k, v in params.items() if k != "eps"}
    if "eps" in params:
        return float(params["eps"]), extra
    spec = ATTACKS[name]
    norm = extra.get("norm", spec.norm)
    return (float(eps) if norm == "linf" and spec.kind == "budgeted" else None), extra


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500, device: torch.device | str = "cpu") -> Tensor:
    """Predicted labels of x, computed in batches on `device`."""
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str],
    eps: float,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    n_samples: int | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean and robust accuracy (fractions) of `model` on (x, y).

    The model is put in eval mode at full quantization for the whole evaluation and restored after.
    Returns {"clean_acc", "robust_acc": {attack: acc}, "attacks": {attack: parameters used}, "n_samples"}.
    """
    params = params or {}
    if n_samples is not None:
        x, y = x[:n_samples], y[:n_samples]
    was_training = model.training
    model.eval()
    model.to(device)
    result: dict[str, Any] = {"n_samples": len(y), "robust_acc": {}, "attacks": {}}
    try:
        with full_quantization(model):
            clean_correct = predict(model, x, batch_size, device) == y
            result["clean_acc"] = clean_correct.float().mean().item()
            for name in attacks:
                torch.manual_seed(seed)  # attacks with their own randomness (random starts, restarts) are repeatable
                attack_eps, extra = attack_budget(name, eps, params.get(name, {}))
                correct, used = [], {}
                batches = range(0, len(y), batch_size)
                for i in tqdm(batches, desc=f"attack {name}", disable=not progress, leave=False):
                    xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
                    out = run_attack(name, model, xb, yb, eps=attack_eps, **extra)
                    correct.append(out.correct.cpu() & clean_correct[i : i + batch_size])
                    used = out.params
                used["n_inputs"] = len(y)
                result["robust_acc"][name] = torch.cat(correct).float().mean().item()
                result["attacks"][name] = used
    finally:
        model.train(was_training)
    return result
