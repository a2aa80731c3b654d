"""Error amplification (Figures 1/2): D_l = ||F_l(x) - F_l(x_adv)||_2 / ||F_l(x)||_2 after every residual module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from esq_lightning.attacks import check_gradients, frozen_eval, pgd
from esq_lightning.models.preact_resnet import PreActBlock
from esq_lightning.pairing import forward_with_activations, pairing_distance
from esq_lightning.quant import full_quantization

# D at the logit layer, as the paper writes it and on centred logits (the honest form).
LOGIT_DISTANCES = ("relative_l2", "centred_l2")


def module_names(model: nn.Module) -> list[str]:
    """The residual modules of `model` in forward order (what the x axis of the figure counts)."""
    inner = getattr(model, "_orig_mod", model)
    if not hasattr(inner, "residual_module_names"):
        raise TypeError(f"{type(inner).__name__} has no residual_module_names(): cannot measure error amplification")
    names = list(inner.residual_module_names())
    if not names:
        raise TypeError(f"{type(inner).__name__} lists no residual modules")
    return names


def amplification_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
    modules: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean D_l over (x, y) for each residual module, x_adv from `steps`-step PGD at `eps` against `model`.

    The model is measured (and attacked) in eval mode at full quantization; its mode and SQ state are
    restored after. PGD starts at a random point drawn from a CPU generator seeded by `seed`, so the curve
    is the same on any device. Returns {"modules", "d", "n_samples", "clean_acc", "adv_acc", "attack",
    "logits"}; "logits" holds D at the logit layer as {"relative_l2": the paper's form, "centred_l2": the same on
    centred logits z - mean_k z, which a common logit offset cannot lower (docs/pairing.md)}.
    """
    names = list(modules) if modules is not None else module_names(model)
    step_size = float(eps) / 4 if step_size is None else float(step_size)
    generator = torch.Generator().manual_seed(int(seed))
    model.to(device)
    n = len(y)
    # Sums stay on the device: one host sync at the end, not one per module and batch.
    sums = torch.zeros(len(names), device=device, dtype=torch.float64)
    logit_sums = torch.zeros(len(LOGIT_DISTANCES), device=device, dtype=torch.float64)
    clean_right = torch.zeros((), device=device, dtype=torch.long)
    adv_right = torch.zeros((), device=device, dtype=torch.long)
    with frozen_eval(model), full_quantization(model):
        for i in tqdm(range(0, n, batch_size), desc="amplification", disable=not progress, leave=False):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            if i == 0 and steps > 0 and eps > 0:
                # A quantizer without a straight-through path gives PGD nothing to follow: D_l would read 0.
                check_gradients(model, xb, yb)
            x_adv = pgd(
                model,
                xb,
                yb,
                eps=eps,
                step_size=step_size,
                steps=steps,
                norm=norm,
                random_start=True,
                generator=generator,
            )
            with torch.no_grad():
                logits_c, clean = forward_with_activations(model, xb, names)
                logits_a, adv = forward_with_activations(model, x_adv, names)
                # pairing_distance is the batch mean: weight by the batch size for the mean over all inputs.
                sums += torch.stack([pairing_distance(clean[m], adv[m], p=2) for m in names]).double() * len(yb)
                logit_sums += torch.stack(
                    [pairing_distance(logits_c, logits_a, distance=d) for d in LOGIT_DISTANCES]
                ).double() * len(yb)
                clean_right += (logits_c.argmax(1) == yb).sum()
                adv_right += (logits_a.argmax(1) == yb).sum()
    d = (sums / max(n, 1)).cpu().tolist()
    d_logits = (logit_sums / max(n, 1)).cpu().tolist()
    return {
        "modules": names,
        "d": d,
        "n_samples": n,
        "clean_acc": clean_right.item() / max(n, 1),
        "adv_acc": adv_right.item() / max(n, 1),
        "logits": dict(zip(LOGIT_DISTANCES, d_logits)),
        "attack": {
            "attack": "pgd",
            "norm": norm,
            "eps": float(eps),
            "steps": int(steps),
            "step_size": step_size,
            "random_start": True,
            "seed": int(seed),
            "batch_size": int(batch_size),
        },
    }


def measured_at(model: nn.Module) -> str:
    """Where F_l is taken for this model family: the output of each residual module as the model defines it.

    Post-activation blocks (ResNet-20/56, ResNet-152 bottlenecks) end with ReLU(add); pre-activation blocks
    (PreAct ResNet-18, WRN-28-10) end with the raw sum (the next block's BN-ReLU activates it); SmallCNN's
    blocks end with ReLU (and max-pooling in blocks 2 and 3).
    """
    model = getattr(model, "_orig_mod", model)
    blocks = tuple(getattr(model, "residual_block_types", ()))
    if any(issubclass(b, PreActBlock) for b in blocks):
        return "after the add (pre-activation block: no ReLU follows the add)"
    if type(model).__name__ == "SmallCNN":
        return "after each conv-BN-ReLU(-maxpool) block (no residual add)"
    return "after the add and ReLU"
