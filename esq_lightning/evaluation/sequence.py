"""The one evaluation sequence of a trained model, shared by the end of esq-train and esq-eval mode=whitebox.

White-box attacks at the threat model (FGSM at its eps factor; pgd_pairing at the run's own pairing), the
per-sample worst case, the gradient-masking report, the named checks and the verdict. What varies between
the two callers is carried by two objects: the ThreatModel (config/threat.py) and the EvalSettings below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from esq_lightning.attacks import pairing_attack_params
from esq_lightning.config.threat import ThreatModel
from esq_lightning.evaluation.checks import Thresholds, evaluation_checks, verdict
from esq_lightning.evaluation.masking import DEFAULT_TOLERANCE
from esq_lightning.evaluation.whitebox import evaluate_robustness


@dataclass(frozen=True)
class EvalSettings:
    """How an evaluation runs, apart from the threat model: the attacks and their parameters, the inputs
    (the first n_samples test inputs), batching, the seed every attack starts from, and the check thresholds."""

    attacks: Sequence[str]
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    n_samples: int | None = None
    batch_size: int = 500
    seed: int = 0
    masking_tolerance: float = DEFAULT_TOLERANCE
    thresholds: Thresholds = field(default_factory=Thresholds)
    progress: bool = True

    @classmethod
    def from_config(
        cls, run_cfg: Any, train_config: Mapping[str, Any], seed: int, progress: bool = True
    ) -> EvalSettings:
        """The settings of `run_cfg.eval`; pgd_pairing attacks at the pairing of the run `train_config` describes
        (its layers, distance and weights), unless eval.params.pgd_pairing says otherwise."""
        ev = run_cfg.eval
        params = OmegaConf.to_container(ev.get("params") or {}, resolve=True)
        params["pgd_pairing"] = {**pairing_attack_params(train_config), **(params.get("pgd_pairing") or {})}
        return cls(
            attacks=list(ev.attacks),
            params=params,
            n_samples=ev.n_samples,
            batch_size=int(ev.batch_size),
            seed=int(seed),
            masking_tolerance=float(ev.masking.tolerance),
            thresholds=Thresholds.from_config(ev.get("checks")),
            progress=progress,
        )


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
    store: Any | None = None,
    shard: Any | None = None,
    extra_flags: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """evaluate_robustness (an attack that cannot get gradients is recorded, not raised), then, in the main
    process, the checks of evaluation/checks.py under ev["audit"] with `extra_flags` (e.g. the training
    monitors') added before the verdict. store/shard: resumable and data-parallel evaluation (whitebox.py)."""
    ev = evaluate_robustness(
        model, x, y, threat, settings, device=device, store=store, shard=shard, on_gradient_error="record"
    )
    if shard is not None and not shard.is_main:
        return ev  # the checks run once, on the merged masks
    ev["audit"] = evaluation_checks(
        model,
        x,
        y,
        ev,
        threat.norm,
        threat.eps,
        settings.thresholds,
        device=device,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    if extra_flags is not None:
        ev["audit"]["flags"] += list(extra_flags)
        ev["audit"]["verdict"] = verdict(ev["audit"]["flags"], attacked=bool(ev.get("attacks")))
    return ev
