"""Named checks of a robustness evaluation, a verdict (pass / warn / fail), and the flags that decide it.

Each flag is documented in docs/evaluation.md ("Checks and the verdict"). A flag is a dict
{"name", "severity" ("warn" or "fail"), "message", and the numbers it was decided on}. The verdict is
`fail` when any fail flag fired, `warn` when any warn flag fired, else `pass`. The checks of the older
gradient-masking report (evaluation/masking.py) enter as warn flags under their own names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esq_lightning.attacks.registry import attack_spec
from esq_lightning.attacks.spec import CE, GRADIENT_FREE, ITERATIVE, SCALE_FREE, SINGLE_STEP
from esq_lightning.attacks.utils import as_autograd_input, frozen_eval, grad_enabled, margin
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.whitebox import attack_in_batches
from esq_lightning.evaluation.worstcase import WORST_CASE, same_threat
from esq_lightning.quant import full_quantization

WARN, FAIL = "warn", "fail"
# The flag of a run that ended before its SQ schedule reached ratio 1 (results.json sq_ratio_final < 1).
SQ_SCHEDULE_SHORT = "sq_schedule_short"

# name -> severity. Model probes first (cheap), then comparisons of attacks, then the eps curve.
FLAGS: dict[str, str] = {
    "zero_gradients": FAIL,  # margin input gradient exactly zero or non-finite for most inputs
    "saturated_gradients": WARN,  # CE input gradient exactly zero for a share of inputs (softmax saturated)
    "randomized_forward": FAIL,  # two forward passes on one input differ
    "constant_output": FAIL,  # one prediction for every input
    "chance_accuracy": FAIL,  # clean accuracy at or below chance
    "low_clean_accuracy": WARN,  # clean accuracy within a few times chance: too short a run, or it failed
    "sq_schedule_short": WARN,  # the SQ ratio never reached 1 in training: evaluated beyond what it trained
    "unattackable": FAIL,  # an attack refused to run (GradientCheckError)
    "loss_scale_sensitivity": WARN,  # CE-based PGD far above margin / DLR PGD
    "weak_attack_overstates": WARN,  # PGD-20 (etc.) far above the worst case
    "gradient_free_beats_gradient": WARN,  # a gradient-free attack below a gradient attack, same threat model
    "autoattack_flags": WARN,  # AutoAttack's own warnings
    "non_monotone_eps": WARN,  # accuracy rising with eps on the eps curve
    "unbounded_budget": FAIL,  # accuracy far from 0 at a budget that must break any classifier
    "single_step_beats_iterative": WARN,
    "more_iterations_raise_accuracy": WARN,
    "blackbox_beats_whitebox": WARN,
    "clean_only_failure": WARN,
    "training_collapse": WARN,  # constant output on the validation split during training
    "accuracy_drop": WARN,  # the run ended far below the accuracy it started from
    "catastrophic_overfitting": WARN,  # validation PGD accuracy collapsed while FGSM accuracy held (training)
    "attack_set_incomplete": WARN,  # an attack of the audit's set did not run (its package is missing)
}
# The verdict of an evaluation that ran no attack: it says nothing of robustness (neither pass nor fail).
NONE = "none"


def is_ce_attack(name: str) -> bool:
    """A multi-step cross-entropy attack (AttackSpec family iterative, loss ce). FGSM is one step: comparing it with
    a 20-step margin PGD says nothing of the loss."""
    spec = attack_spec(name)
    return spec is not None and spec.family == ITERATIVE and spec.loss == CE


def is_scale_free_attack(name: str) -> bool:
    """PGD of the same kind on a loss that does not saturate (loss scale-free): what loss_scale_sensitivity compares
    CE-PGD with (an ensemble like AutoAttack is stronger for other reasons: weak_attack_overstates covers that gap)."""
    spec = attack_spec(name)
    return spec is not None and spec.loss == SCALE_FREE


def _family(name: str) -> str | None:
    spec = attack_spec(name)
    return spec.family if spec is not None else None


@dataclass(frozen=True)
class Thresholds:
    """The stated margins of the checks (fractions of accuracy unless said otherwise); eval.checks.* sets them."""

    zero_gradient_share: float = 0.5  # zero_gradients: more than this share of inputs
    saturated_share: float = 0.1  # saturated_gradients: more than this share of inputs
    loss_scale_gap: float = 0.05  # loss_scale_sensitivity: CE-PGD above margin/DLR PGD by more
    weak_gap: float = 0.05  # weak_attack_overstates: above the worst case by more
    gradient_free_gap: float = 0.01  # gradient_free_beats_gradient: below the gradient attack by more
    monotone_tolerance: float = 0.02  # non_monotone_eps: a rise larger than this
    unbounded_margin: float = 0.1  # unbounded_budget: above chance (1 / classes) by more
    chance_margin: float = 0.02  # chance_accuracy: clean accuracy below chance + this
    useful_clean_factor: float = 3.0  # low_clean_accuracy: clean accuracy below this many times chance
    weak_attacks: tuple[str, ...] = ("pgd20",)

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> Thresholds:
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(node) - known)
        if unknown:
            raise ESQUserError(f"eval.checks: unknown keys {unknown}; allowed: {', '.join(sorted(known))}")
        if "weak_attacks" in node:
            node["weak_attacks"] = tuple(node["weak_attacks"])
        return cls(**node)


def flag(name: str, message: str, **numbers: Any) -> dict[str, Any]:
    return {"name": name, "severity": FLAGS[name], "message": message, **numbers}


def verdict(flags: Sequence[Mapping[str, Any]], attacked: bool = True) -> str:
    """fail / warn by the worst flag; without any attack (attacked=False) `none` instead of pass or warn."""
    severities = {f["severity"] for f in flags}
    if FAIL in severities:
        return FAIL
    if not attacked:
        return NONE
    return WARN if WARN in severities else "pass"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


# ---- model probes ---------------------------------------------------------------------------------------------


def probe_model(model: nn.Module, x: Tensor, y: Tensor, max_samples: int = 256) -> dict[str, Any]:
    """Input-gradient shares (margin and CE), forward randomness, prediction spread; the model in eval mode."""
    n = min(len(x), max_samples)
    with grad_enabled(), frozen_eval(model):
        xs = as_autograd_input(x[:n]).requires_grad_(True)
        ys = as_autograd_input(y[:n])
        logits = model(xs)
        shares: dict[str, float] = {}
        for name, value in (
            ("margin", lambda z: margin(z, ys).sum()),
            ("ce", lambda z: F.cross_entropy(z, ys, reduction="sum")),
        ):
            if not logits.requires_grad:
                shares[name] = 1.0
                continue
            (g,) = torch.autograd.grad(value(logits), xs, retain_graph=True, allow_unused=True)
            if g is None:
                shares[name] = 1.0
                continue
            g = g.detach().flatten(1)
            bad = (g.abs().amax(dim=1) == 0) | ~torch.isfinite(g).all(dim=1)
            shares[name] = bad.float().mean().item()
        with torch.no_grad():
            first = model(xs.detach())
            second = model(xs.detach())
    pred = first.argmax(dim=1)
    return {
        "n": n,
        "zero_margin_gradient_share": shares["margin"],
        "zero_ce_gradient_share": shares["ce"],
        "forward_max_abs_diff": (first - second).abs().max().item() if n else 0.0,
        "distinct_predictions": int(pred.unique().numel()) if n else 0,
        "num_classes": int(first.shape[1]) if n else 0,
    }


def probe_flags(probe: Mapping[str, Any], clean_acc: float, th: Thresholds) -> list[dict[str, Any]]:
    out = []
    if probe["zero_margin_gradient_share"] > th.zero_gradient_share:
        out.append(
            flag(
                "zero_gradients",
                f"the input gradient of the logit margin is zero or non-finite for "
                f"{_pct(probe['zero_margin_gradient_share'])} of {probe['n']} inputs: gradient attacks cannot "
                "work; the reported robustness is not measured",
                share=probe["zero_margin_gradient_share"],
            )
        )
    elif probe["zero_ce_gradient_share"] > th.saturated_share:
        out.append(
            flag(
                "saturated_gradients",
                f"the cross-entropy input gradient is exactly zero for "
                f"{_pct(probe['zero_ce_gradient_share'])} of {probe['n']} inputs (saturated softmax): "
                "CE-based FGSM/PGD find little; trust margin/DLR attacks",
                share=probe["zero_ce_gradient_share"],
            )
        )
    if probe["forward_max_abs_diff"] > 0:
        out.append(
            flag(
                "randomized_forward",
                f"two forward passes on the same inputs differ by up to "
                f"{probe['forward_max_abs_diff']:.3g} in the logits: the model is randomized; evaluate "
                "with expectation over transformation",
                max_abs_diff=probe["forward_max_abs_diff"],
            )
        )
    k = probe.get("num_classes") or 0
    # On a handful of inputs one class for all, or chance accuracy, is no evidence (a smoke run's 4 inputs):
    # these two need at least 5 inputs per class.
    enough = probe["n"] >= 5 * max(k, 1)
    if enough and probe["distinct_predictions"] == 1:
        out.append(
            flag(
                "constant_output",
                f"every one of {probe['n']} inputs gets the same class: the model has collapsed to a constant output",
                distinct_predictions=1,
            )
        )
    if enough and k and clean_acc <= 1.0 / k + th.chance_margin:
        out.append(
            flag(
                "chance_accuracy",
                f"clean accuracy {_pct(clean_acc)} is at chance ({_pct(1.0 / k)})",
                clean_acc=clean_acc,
                chance=1.0 / k,
            )
        )
    elif enough and k and clean_acc < th.useful_clean_factor / k:
        out.append(
            flag(
                "low_clean_accuracy",
                f"clean accuracy {_pct(clean_acc)} is below {th.useful_clean_factor:g}x "
                f"chance ({_pct(1.0 / k)}): the run is too short or failed to learn; its robust accuracies "
                "say little",
                clean_acc=clean_acc,
                chance=1.0 / k,
            )
        )
    return out


def sq_schedule_flags(sq_ratio_final: float | None) -> list[dict[str, Any]]:
    """SQ_SCHEDULE_SHORT when the last training epoch quantized less than every weight (ratio < 1): the model is
    evaluated at full quantization, which it never trained at (a run shorter than its SQ schedule)."""
    if sq_ratio_final is None or sq_ratio_final >= 1.0:
        return []
    return [
        flag(
            SQ_SCHEDULE_SHORT,
            f"the SQ schedule ended at ratio {sq_ratio_final:g} on the last training epoch, "
            "below 1: the network was never trained at the full quantization it is evaluated at (raise "
            "trainer.max_epochs, or lower callbacks.quant_ratio.every_n_epochs)",
            sq_ratio_final=sq_ratio_final,
        )
    ]


# ---- comparisons of the attacks of one evaluation -------------------------------------------------------------


def attack_flags(ev: Mapping[str, Any], norm: str, eps: float, th: Thresholds) -> list[dict[str, Any]]:
    """Flags from the accuracies of an evaluation (evaluate_robustness's result) at the threat model."""
    acc = {k: v for k, v in (ev.get("robust_acc") or {}).items() if k != WORST_CASE}
    records = ev.get("attacks") or {}
    at = {k: v for k, v in acc.items() if same_threat(records.get(k, {}), norm, eps)}
    out = []
    for name, why in (ev.get("unattackable") or {}).items():
        out.append(flag("unattackable", f"{name} could not run: {why}", attack=name))
    ce = {k: v for k, v in at.items() if is_ce_attack(k)}
    free = {k: v for k, v in at.items() if is_scale_free_attack(k)}
    if ce and free:
        # The strongest of each side: CE-PGD at its best far above margin/DLR PGD at its best.
        c_name, c_acc = min(ce.items(), key=lambda kv: kv[1])
        f_name, f_acc = min(free.items(), key=lambda kv: kv[1])
        if c_acc > f_acc + th.loss_scale_gap + 1e-9:
            out.append(
                flag(
                    "loss_scale_sensitivity",
                    f"{c_name} {_pct(c_acc)} is {_pct(c_acc - f_acc)} above "
                    f"{f_name} {_pct(f_acc)}: cross-entropy is saturated or its scale misleads the attack",
                    ce_attack=c_name,
                    ce_acc=c_acc,
                    scale_free_attack=f_name,
                    scale_free_acc=f_acc,
                )
            )
    wc = (ev.get("worst_case") or {}).get("acc")
    if wc is not None:
        for name in th.weak_attacks:
            if name in at and at[name] > wc + th.weak_gap + 1e-9:
                out.append(
                    flag(
                        "weak_attack_overstates",
                        f"{name} {_pct(at[name])} overstates the worst case "
                        f"{_pct(wc)} by {_pct(at[name] - wc)} (margin {_pct(th.weak_gap)})",
                        attack=name,
                        acc=at[name],
                        worst_case=wc,
                    )
                )
    for g_name, g_acc in at.items():
        if _family(g_name) != GRADIENT_FREE:
            continue
        for w_name, w_acc in at.items():
            if _family(w_name) in (GRADIENT_FREE, SINGLE_STEP):
                continue
            if g_acc < w_acc - th.gradient_free_gap - 1e-9:
                out.append(
                    flag(
                        "gradient_free_beats_gradient",
                        f"{g_name} {_pct(g_acc)} < {w_name} {_pct(w_acc)}: "
                        "a gradient-free attack beats a gradient attack (gradients mislead)",
                        gradient_free=g_name,
                        gradient_free_acc=g_acc,
                        gradient=w_name,
                        gradient_acc=w_acc,
                    )
                )
    aa = records.get("autoattack") or {}
    for msg in aa.get("flags") or []:
        out.append(flag("autoattack_flags", f"AutoAttack: {msg.strip()}", text=msg.strip()))
    for check, entries in ((ev.get("gradient_masking") or {}).get("checks") or {}).items():
        for e in entries:
            if e.get("flagged") and check in FLAGS:
                if "weaker" in e:
                    what = (
                        f"{e['weaker']} {_pct(e['weaker_acc'])} below {e['stronger']} {_pct(e['stronger_acc'])}"
                        " (the masking report)"
                    )
                else:
                    what = f"{e.get('attack')} {_pct(e.get('acc', 0.0))} equals clean accuracy (the masking report)"
                out.append(flag(check, what, **{k: v for k, v in e.items() if k != "flagged"}))
    return out


def curve_flags(
    eps_values: Sequence[float], accs: Sequence[float], th: Thresholds, attack: str
) -> list[dict[str, Any]]:
    """non_monotone_eps on an accuracy-vs-eps curve (eps in increasing order)."""
    out = []
    order = sorted(range(len(eps_values)), key=lambda i: eps_values[i])
    for a, b in zip(order, order[1:]):
        if accs[b] > accs[a] + th.monotone_tolerance + 1e-9:
            out.append(
                flag(
                    "non_monotone_eps",
                    f"{attack}: accuracy rises from {_pct(accs[a])} at eps "
                    f"{eps_values[a]:.4g} to {_pct(accs[b])} at eps {eps_values[b]:.4g}",
                    attack=attack,
                    eps_low=eps_values[a],
                    acc_low=accs[a],
                    eps_high=eps_values[b],
                    acc_high=accs[b],
                )
            )
    return out


def unbounded_flags(acc: float, eps: float, num_classes: int, th: Thresholds, attack: str) -> list[dict[str, Any]]:
    """unbounded_budget: at L_inf eps 0.5 every input can be moved to the grey image, so no classifier keeps more
    than about one class's share of the inputs."""
    limit = 1.0 / max(num_classes, 1) + th.unbounded_margin
    if math.isnan(acc) or acc <= limit + 1e-9:
        return []
    return [
        flag(
            "unbounded_budget",
            f"{attack} leaves {_pct(acc)} accuracy at L_inf eps {eps:.3g}, where any "
            f"classifier can be brought to about {_pct(1.0 / num_classes)}: the attack does not work on this model",
            attack=attack,
            eps=eps,
            acc=acc,
            limit=limit,
        )
    ]


def format_verdict(verdict_: str, flags: Sequence[Mapping[str, Any]]) -> str:
    """The lines printed after the results table: the checks that fired, one a line. The verdict itself is the
    table's row (artifacts/results.py format_table), printed once; `verdict_` is not repeated here."""
    if not flags:
        return "checks: none fired"
    lines = [f"checks: {len(flags)} fired (docs/evaluation.md, 'Checks and the verdict')"]
    lines += [f"  - [{f['severity']}] {f['name']}: {f['message']}" for f in flags]
    return "\n".join(lines)


# ---- the checks of one evaluation ---------------------------------------------------------------------------

MARGIN_PROBE = "pgd_margin"


def evaluation_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    ev: dict[str, Any],
    norm: str,
    eps: float,
    thresholds: Thresholds | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    margin_probe_steps: int | None = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """The cheap checks of an evaluation (evaluate_robustness's result `ev`): model probes, attack comparisons,
    and, when the attack list has a CE-based attack but no scale-free one, a margin-PGD probe (margin_probe_steps
    steps at the threat model; None skips it) whose accuracy feeds loss_scale_sensitivity only (it is reported
    under audit.probes and does not enter the worst case). Returns {"verdict", "flags", "probe", "probes"}.
    """
    th = thresholds or Thresholds()
    n = ev.get("n_samples", len(y))
    x, y = x[:n], y[:n]
    was_training = model.training
    model.eval()
    probes: dict[str, Any] = {}
    try:
        with full_quantization(model):
            probe = probe_model(model, x.to(device), y.to(device))
            records = ev.get("attacks") or {}
            at = [k for k in ev.get("robust_acc", {}) if same_threat(records.get(k, {}), norm, eps)]
            needs_probe = (
                margin_probe_steps
                and norm == "linf"
                and any(is_ce_attack(k) for k in at)
                and not any(is_scale_free_attack(k) for k in at)
                and probe["zero_margin_gradient_share"] <= th.zero_gradient_share
            )
            if needs_probe:
                torch.manual_seed(seed)
                correct, _, used = attack_in_batches(
                    MARGIN_PROBE,
                    model,
                    x,
                    y,
                    float(eps),
                    {"steps": int(margin_probe_steps)},
                    batch_size,
                    device,
                    progress=False,
                )
                clean = ev.get("clean_correct")
                mask = correct & clean if clean is not None and len(clean) == len(correct) else correct
                probes[MARGIN_PROBE] = {
                    "acc": mask.float().mean().item(),
                    "steps": int(margin_probe_steps),
                    "eps": float(eps),
                    "norm": norm,
                    "runtime_s": used.get("runtime_s"),
                }
    finally:
        model.train(was_training)
    flags = probe_flags(probe, float(ev["clean_acc"]), th)
    view = ev
    if probes:
        view = {
            **ev,
            "robust_acc": {**ev["robust_acc"], MARGIN_PROBE: probes[MARGIN_PROBE]["acc"]},
            "attacks": {**ev["attacks"], MARGIN_PROBE: {"norm": norm, "eps": float(eps)}},
        }
    flags += attack_flags(view, norm, eps, th)
    return {
        "verdict": verdict(flags, attacked=bool(ev.get("attacks"))),
        "flags": flags,
        "probe": probe,
        "probes": probes,
    }


def unattackable_verdict(audit: Mapping[str, Any]) -> str | None:
    """One line when the model could not be attacked honestly (zero gradients, constant output, chance), else None."""
    names = [
        f["name"]
        for f in audit.get("flags", [])
        if f["name"] in ("zero_gradients", "constant_output", "chance_accuracy", "unattackable")
    ]
    if not names:
        return None
    return (
        f"verdict fail: the model cannot be attacked honestly ({', '.join(sorted(set(names)))}); "
        "results.json records clean accuracy and the flags, no robust accuracy is claimed"
    )
