"""White-box evaluation of one model: clean accuracy and accuracy under each attack, in eval mode at ratio 1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from esq_lightning.attacks import ATTACKS, GradientCheckError, run_attack
from esq_lightning.config.threat import ThreatModel
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.masking import gradient_masking_report
from esq_lightning.evaluation.store import run_in_batches
from esq_lightning.evaluation.worstcase import add_worst_case, worst_case
from esq_lightning.quant import full_quantization

if TYPE_CHECKING:  # an annotation only: evaluation/sequence.py imports this module
    from esq_lightning.evaluation.sequence import EvalSettings


def attack_budget(
    name: str, eps: float, params: Mapping[str, Any], fgsm_factor: float = 1.0
) -> tuple[float | None, dict[str, Any]]:
    """The eps an attack runs at, and its other parameters.

    The run's threat-model eps (L_inf) applies to the L_inf attacks (FGSM at fgsm_factor x eps, the
    threat model's FGSM budget); L2 attacks keep their own budget (their default, or
    eval.params.<name>.eps). An attack's own `eps` always wins.
    """
    if name not in ATTACKS:
        raise ESQUserError(f"eval.attacks: unknown attack '{name}'; allowed: {', '.join(ATTACKS)}")
    spec = ATTACKS[name]
    extra = {k: v for k, v in params.items() if k != "eps"}
    unknown = sorted(set(extra) - set(spec.defaults))
    if unknown:
        raise ESQUserError(
            f"eval.params.{name}: unknown parameters {unknown}; valid: {', '.join(sorted(spec.defaults))}, eps"
        )
    if params.get("eps") is not None:
        return float(params["eps"]), extra
    norm = str(extra.get("norm", spec.norm)).lower()
    attack_eps = float(eps) if norm in ("linf", "inf") and spec.kind == "budgeted" else spec.default_eps
    if name == "fgsm" and norm in ("linf", "inf"):
        attack_eps = float(eps) * float(fgsm_factor)
    if spec.kind == "budgeted" and attack_eps is None:
        raise ESQUserError(
            f"eval.params.{name}.eps: {name} is a budgeted {norm} attack with no default budget; "
            f"give one, e.g. eval.params.{name}.eps=1.0"
        )
    return attack_eps, extra


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500, device: torch.device | str = "cpu") -> Tensor:
    """Predicted labels of x, computed in batches on `device`."""
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def attack_in_batches(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | None,
    params: Mapping[str, Any],
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: bool = True,
    keep_adv: bool = False,
    store: Any | None = None,
    shard: Any | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Run one registry attack over (x, y) in batches on `device`.

    Returns (correct, x_adv or None, parameter record) with tensors on the CPU; `correct` is
    "correct on the clean input and on x_adv within eps". The caller sets eval mode and the SQ ratio.
    Without keep_adv, the batches go through evaluation.store.run_in_batches: with `store`, finished
    batches are kept and read back (resume); with `shard`, this process runs its share of the batches
    and the masks of all processes are merged (evaluation/distributed.py).
    """
    if not keep_adv:
        return _attack_per_batch(name, model, x, y, eps, params, batch_size, device, progress, store, shard, seed)
    correct, advs, used = [], [], {}
    batches = range(0, len(y), batch_size)
    for i in tqdm(batches, desc=f"attack {name}", disable=not progress, leave=False):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = run_attack(name, model, xb, yb, eps=eps, **params)
        correct.append(out.correct.cpu())
        if keep_adv:
            advs.append(out.x_adv.cpu())
        # Every batch runs with the same parameters; keep the record, add up the time.
        runtime = used.get("runtime_s", 0.0) + out.params.get("runtime_s", 0.0)
        used = {**out.params, "runtime_s": round(runtime, 3)}
    used["n_inputs"] = len(y)
    used["eval_batch_size"] = batch_size
    correct_all = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    return correct_all, (torch.cat(advs) if advs else x[:0].clone()) if keep_adv else None, used


def _attack_per_batch(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | None,
    params: Mapping[str, Any],
    batch_size: int,
    device: torch.device | str,
    progress: bool,
    store: Any | None,
    shard: Any | None,
    seed: int,
) -> tuple[Tensor, None, dict[str, Any]]:
    def compute(start: int, stop: int) -> tuple[Tensor, dict[str, Any]]:
        out = run_attack(name, model, x[start:stop].to(device), y[start:stop].to(device), eps=eps, **params)
        return out.correct, out.params

    correct, records = run_in_batches(
        name, len(y), batch_size, compute, store=store, shard=shard, seed=seed, device=device, progress=progress
    )
    # Every batch runs with the same parameters; keep the last batch's record, add up the time.
    used = {**(records[-1] if records else {}), "runtime_s": round(sum(r.get("runtime_s", 0.0) for r in records), 3)}
    used["n_inputs"] = len(y)
    used["eval_batch_size"] = batch_size
    return correct, None, used


def clean_correct_in_batches(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    store: Any | None = None,
    shard: Any | None = None,
) -> Tensor:
    """predict(...) == y, per batch through evaluation.store.run_in_batches (kept with `store`, split with `shard`)."""

    def compute(start: int, stop: int) -> tuple[Tensor, dict[str, Any]]:
        return predict(model, x[start:stop], batch_size, device) == y[start:stop], {}

    return run_in_batches("clean", len(y), batch_size, compute, store=store, shard=shard, device=device)[0]


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
    store: Any | None = None,
    shard: Any | None = None,
    on_gradient_error: str = "raise",
) -> dict[str, Any]:
    """Clean and robust accuracy (fractions) of `model` on (x, y).

    The model is put in eval mode at full quantization for the whole evaluation and restored after.
    `threat` (config/threat.py) sets every budget; `settings` (evaluation/sequence.py) the attacks, their
    parameters, the first n_samples inputs, the batch size, the seed and the masking tolerance.
    Returns {"clean_acc", "robust_acc": {attack: acc}, "attacks": {attack: parameters used}, "n_samples",
    "gradient_masking": the report of esq_lightning.evaluation.masking, with settings.masking_tolerance,
    "worst_case": the per-sample worst case at the threat model (norm, eps) (evaluation/worstcase.py; also
    robust_acc["worst_case"], first), "correct": per-attack per-sample masks (clean-correct and correct
    under the attack, CPU bool tensors), "clean_correct", "unattackable": {attack: why}}.

    on_gradient_error="record" turns an attack's GradientCheckError (zero or non-finite input gradients)
    into an entry of "unattackable" instead of an exception: such a model is a result (verdict fail).

    store (evaluation.store.EvalStore) keeps every (attack, batch) result as it finishes and reads back the
    finished ones (a resumed evaluation); shard (evaluation.distributed.Shard) runs this process's share of
    the batches and merges the masks of all processes. Either way the result equals an uninterrupted
    single-process run.
    """
    params, seed, batch_size = settings.params or {}, settings.seed, settings.batch_size
    if settings.n_samples is not None:
        x, y = x[: settings.n_samples], y[: settings.n_samples]
    was_training = model.training
    model.eval()
    model.to(device)
    result: dict[str, Any] = {"n_samples": len(y), "robust_acc": {}, "attacks": {}}
    masks: dict[str, Tensor] = {}
    unattackable: dict[str, str] = {}
    clean_correct = torch.zeros(0, dtype=torch.bool)
    try:
        with full_quantization(model):
            clean_correct = clean_correct_in_batches(model, x, y, batch_size, device, store=store, shard=shard)
            result["clean_correct"] = clean_correct
            result["clean_acc"] = clean_correct.float().mean().item()
            for name in settings.attacks:
                torch.manual_seed(seed)  # attacks with their own randomness (random starts, restarts) are repeatable
                attack_eps, extra = attack_budget(name, threat.eps, params.get(name, {}), threat.fgsm_factor)
                try:
                    correct, _, used = attack_in_batches(
                        name,
                        model,
                        x,
                        y,
                        attack_eps,
                        extra,
                        batch_size,
                        device,
                        settings.progress,
                        store=store,
                        shard=shard,
                        seed=seed,
                    )
                except GradientCheckError as exc:
                    if on_gradient_error != "record":
                        raise
                    unattackable[name] = str(exc)
                    continue
                masks[name] = correct & clean_correct
                result["robust_acc"][name] = masks[name].float().mean().item()
                result["attacks"][name] = used
    finally:
        model.train(was_training)
    result["gradient_masking"] = gradient_masking_report(
        result["clean_acc"], result["robust_acc"], result["attacks"], tolerance=settings.masking_tolerance
    )
    # Per-sample worst case over the attacks at the run's threat model (evaluation/worstcase.py).
    wc = worst_case(clean_correct, masks, result["attacks"], str(threat.norm), float(threat.eps))
    result["worst_case"] = {k: v for k, v in wc.items() if k != "mask"}
    result["robust_acc"] = add_worst_case(result["robust_acc"], wc)
    result["correct"], result["clean_correct"], result["unattackable"] = masks, clean_correct, unattackable
    return result
