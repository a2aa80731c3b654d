"""Black-box curves (Figure 3): accuracy vs L2 budget under Boundary and N Attack, one curve per model and attack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from esq_lightning.attacks import ATTACKS, accuracy_curve, attack_spec, attack_title
from esq_lightning.errors import ESQUserError
from esq_lightning.quant import full_quantization


def query_budget(record: Mapping[str, Any]) -> dict[str, Any]:
    """Model queries per input an attack may spend, from its parameter record (stated with every result): the
    attack's AttackSpec.query_budget, else its steps."""
    spec = attack_spec(str(record.get("attack")))
    if spec is not None and spec.query_budget is not None:
        return spec.query_budget(record)
    return {"text": ", ".join(f"{k}={record[k]}" for k in ("steps",) if k in record)}


def blackbox_curves(
    models: Sequence[nn.Module],
    labels: Sequence[str],
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str],
    budgets: Sequence[float],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy at each L2 budget for every (model, attack), via esq_lightning.attacks.accuracy_curve.

    Minimum-norm attacks (Boundary) run once per batch and are read at every budget; budgeted ones
    (N Attack) run per budget in increasing order on the survivors. Budget 0 is clean accuracy and
    the curves are non-increasing. Models run in eval mode at full quantization, restored after.
    """
    params = params or {}
    budgets = [float(b) for b in budgets]
    curves: list[dict[str, Any]] = []
    jobs = [(i, a) for i in range(len(models)) for a in attacks]
    for i, name in tqdm(jobs, desc="black-box curves", disable=not progress):
        model = models[i]
        was_training = model.training
        model.eval().to(device)
        correct_sum = torch.zeros(len(budgets), dtype=torch.float64)
        record: dict[str, Any] = {}
        runtime = 0.0
        try:
            with full_quantization(model):
                for s in range(0, len(y), batch_size):
                    xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
                    acc, rec = accuracy_curve(name, model, xb, yb, budgets, **dict(params.get(name, {})))
                    correct_sum += torch.tensor(acc, dtype=torch.float64) * len(yb)
                    runtime += float(rec.get("runtime_s", 0.0))
                    record = rec
        finally:
            model.train(was_training)
        n = len(y)
        record.update({"runtime_s": round(runtime, 3), "n_inputs": n, "eval_batch_size": batch_size})
        budget = query_budget(record)
        accuracy = (correct_sum / max(n, 1)).tolist()
        curves.append(
            {
                "label": labels[i],
                "attack": name,
                "budgets": budgets,
                "accuracy": accuracy,
                "params": record,
                "query_budget": budget,
                "legend": f"{labels[i]}, {attack_title(name)} ({budget['text']})",
            }
        )
    return curves


def check_blackbox_attacks(attacks: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Only gradient-free attacks in L2 make sense on these curves; fail early, naming the key, on the others."""
    params = params or {}
    for name in attacks:
        spec = ATTACKS.get(name)
        if spec is None:
            raise ESQUserError(
                f"eval.blackbox.attacks: unknown attack '{name}'; allowed: "
                + ", ".join(n for n, s in ATTACKS.items() if not s.gradient_based)
            )
        if spec.gradient_based:
            raise ESQUserError(
                f"eval.blackbox.attacks: '{name}' uses gradients; black-box attacks are: "
                + ", ".join(n for n, s in ATTACKS.items() if not s.gradient_based)
            )
        own = dict(params.get(name) or {})
        if "eps" in own:
            raise ESQUserError(f"eval.blackbox.params.{name}.eps: the budgets are eval.blackbox.budgets; remove eps")
        unknown = sorted(set(own) - set(spec.defaults))
        if unknown:
            raise ESQUserError(
                f"eval.blackbox.params.{name}: unknown parameters {unknown}; valid: {', '.join(sorted(spec.defaults))}"
            )
        if str(own.get("norm", spec.norm)).lower() != "l2":
            raise ESQUserError(
                f"eval.blackbox.params.{name}.norm: the curves are over L2 budgets; "
                f"set eval.blackbox.params.{name}.norm=l2"
            )
