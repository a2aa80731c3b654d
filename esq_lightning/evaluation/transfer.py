"""Transfer matrix (Tables 2b/3b): adversarial examples made on each row model, accuracy of each column model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from esq_lightning.attacks import ATTACKS
from esq_lightning.evaluation.whitebox import attack_in_batches, predict
from esq_lightning.quant import full_quantization


def transfer_matrix(
    models: Sequence[nn.Module],
    labels: Sequence[str],
    x: Tensor,
    y: Tensor,
    attack: str,
    eps: float | None,
    params: Mapping[str, Any] | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """matrix[i][j]: accuracy of model j on the adversarial examples of `attack` against model i.

    A sample counts as correct for model j when j classifies both the clean input and x_adv correctly,
    the definition of the white-box robust accuracy; the diagonal is therefore model i's white-box
    accuracy under the same attack, batch size and seed. Every model is evaluated in eval mode at full
    quantization and restored after.
    """
    if len(models) != len(labels):
        raise ValueError(f"{len(models)} models but {len(labels)} labels")
    if attack in ATTACKS and ATTACKS[attack].kind != "budgeted":
        raise ValueError(
            f"transfer_matrix: {attack} is a minimum-norm attack whose examples are not limited to eps; "
            "use a budgeted attack (pgd20, fgsm, ...)"
        )
    params = dict(params or {})
    states = [m.training for m in models]
    for m in models:
        m.eval().to(device)
    try:
        clean = []
        for m in models:
            with full_quantization(m):
                clean.append(predict(m, x, batch_size, device) == y)
        matrix: list[list[float]] = []
        records: list[dict[str, Any]] = []
        for i, source in enumerate(tqdm(models, desc="transfer rows", disable=not progress)):
            # The same seeding as the white-box evaluation, so the diagonal reproduces it.
            torch.manual_seed(seed)
            with full_quantization(source):
                _, x_adv, record = attack_in_batches(
                    attack, source, x, y, eps, params, batch_size, device, progress, keep_adv=True
                )
            assert x_adv is not None
            row = []
            for j, target in enumerate(models):
                with full_quantization(target):
                    adv_right = predict(target, x_adv, batch_size, device) == y
                row.append((adv_right & clean[j]).float().mean().item())
            matrix.append(row)
            records.append({**record, "source": labels[i]})
    finally:
        for m, was in zip(models, states):
            m.train(was)
    return {
        "labels": list(labels),
        "matrix": matrix,
        "clean_acc": [c.float().mean().item() for c in clean],
        "attack": attack,
        "params": records[0] if records else {},
        "params_per_row": records,
        "n_samples": len(y),
        "seed": seed,
        "definition": "matrix[i][j] = accuracy of column model j on the adversarial examples made on row "
        "model i (correct on the clean input and on x_adv)",
    }


def markdown_table(result: Mapping[str, Any], digits: int = 2) -> str:
    """The matrix as a markdown table in percent, rows = source (attacked) model, columns = target model."""
    labels = result["labels"]
    p = result.get("params", {})
    eps = p.get("eps")
    threat = f"{p.get('norm', '')} eps={eps:.4g}" if isinstance(eps, (int, float)) else ""
    head = f"| source \\ target ({result['attack']}{', ' + threat if threat else ''}) | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    lines.append("| clean | " + " | ".join(f"{100 * a:.{digits}f}" for a in result["clean_acc"]) + " |")
    for label, row in zip(labels, result["matrix"]):
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.{digits}f}" for a in row) + " |")
    note = (
        f"\nAccuracy (%) of each column model on {result['attack']} examples made on each row model; "
        f"{result['n_samples']} test inputs, seed {result['seed']}. The diagonal is white-box accuracy.\n"
    )
    return "\n".join(lines) + "\n" + note
