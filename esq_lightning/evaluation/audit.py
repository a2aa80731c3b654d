"""esq-eval mode=audit: the per-sample worst case over a documented attack set, an eps curve and every check.

For each checkpoint (ckpt_path=... or ckpts=[...], paths or setting:NAME): clean accuracy, each attack of the
budget's set at the threat model (eval.eps, L_inf), robust_acc.worst_case over them, accuracy vs eps of the
worst case of the curve attacks at eval.audit.eps_factors x eps (0.25, 0.5, 1, 2, 4), the unbounded-budget
probe at L_inf eps 0.5, and the checks of evaluation/checks.py with their verdict. Writes audit.json,
audit.md, audit.png and a results.json per checkpoint (audit.verdict, audit.flags, robust_acc.worst_case).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.attacks import ATTACKS, library_available
from esq_lightning.config.threat import ThreatModel
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.checks import (
    attack_flags,
    curve_flags,
    flag,
    probe_flags,
    probe_model,
    unbounded_flags,
    verdict,
)
from esq_lightning.evaluation.sequence import EvalSettings
from esq_lightning.evaluation.whitebox import attack_in_batches, evaluate_robustness
from esq_lightning.evaluation.worstcase import worst_case
from esq_lightning.figures import save_figure
from esq_lightning.quant import full_quantization

# The attack sets of eval.budget (docs/evaluation.md). Steps, restarts, targets and queries per attack; every
# L_inf attack at eval.eps, PGD steps at eps/4 unless the schedule says otherwise.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "fgsm": {},
        "pgd20": {},
        "pgd_margin": {"steps": 20},
        "pgd_dlr": {"steps": 20},
        "pgd_pp": {"steps": 20},
        "pgd_pairing": {"steps": 20},
    },
    "standard": {
        "fgsm": {},
        "pgd20": {},
        "pgd100": {"restarts": 2},
        "pgd_margin": {"steps": 100, "restarts": 2},
        "pgd_dlr": {"steps": 100, "restarts": 2},
        "pgd_mt": {"steps": 50, "targets": 3},
        "pgd_pp": {"steps": 100},
        "pgd_pairing": {"steps": 100},
        "square": {"n_queries": 1000},
        "autoattack": {},
    },
    "thorough": {
        "fgsm": {},
        "pgd20": {},
        "pgd100": {"restarts": 5},
        "pgd_margin": {"steps": 200, "restarts": 5},
        "pgd_dlr": {"steps": 200, "restarts": 5},
        "pgd_mt": {"steps": 100, "targets": 9},
        "pgd_pp": {"steps": 200, "restarts": 5},
        "pgd_pairing": {"steps": 200, "restarts": 5},
        "pgd_schedule": {"steps": 200, "restarts": 5},
        "square": {"n_queries": 5000},
        "autoattack": {},
    },
}
# The eps curve: independent runs (not nested), so a rise with eps is visible (non_monotone_eps).
# FGSM is on the curve too (the paper's Table 1 reports it per eps), at eps itself (factor 1 on the curve).
CURVE_ATTACKS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"fgsm": {}, "pgd_margin": {"steps": 20}},
    "standard": {"fgsm": {}, "pgd_margin": {"steps": 50}, "pgd_dlr": {"steps": 50}},
    "thorough": {"fgsm": {}, "pgd_margin": {"steps": 100, "restarts": 2}, "pgd_dlr": {"steps": 100, "restarts": 2}},
}
# The Python API's defaults of audit_model; runs take eval.audit.eps_factors / unbounded_eps (conf/eval/default.yaml).
EPS_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
UNBOUNDED_EPS = 0.5


def attack_set(budget: str) -> dict[str, dict[str, Any]]:
    """The budget's attacks, without those whose optional library (AttackSpec.library) is not installed."""
    return {k: v for k, v in BUDGETS[budget].items() if library_available(ATTACKS[k])}


def missing_attacks(budget: str) -> dict[str, str]:
    """{attack: package} of the budget's attacks whose optional library is not installed."""
    from esq_lightning.attacks import ATTACKS, library_available

    return {k: str(ATTACKS[k].library) for k in BUDGETS[budget] if not library_available(ATTACKS[k])}


def pack_mask(mask: Tensor) -> str:
    """A per-sample bool mask as base64 of its bits (numpy.packbits order); unpack_mask reverses it."""
    import base64

    import numpy as np

    return base64.b64encode(np.packbits(mask.detach().cpu().bool().numpy()).tobytes()).decode("ascii")


def unpack_mask(text: str, n: int) -> Tensor:
    import base64

    import numpy as np

    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


def survival_table(clean_correct: Tensor, correct: Mapping[str, Tensor]) -> dict[str, Any]:
    """Which test inputs stayed correctly classified, clean and under each attack (input i = bit i, the order of the
    test split): a worst case over any subset of attacks, or against another library's results, is the AND of
    these masks, recomputed without attacking again (unpack_mask)."""
    return {
        "n": int(len(clean_correct)),
        "encoding": "base64 numpy.packbits, input i = bit i",
        "clean": pack_mask(clean_correct),
        "attacks": {k: pack_mask(v) for k, v in correct.items()},
    }


def _merge(base: Mapping[str, Any], user: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**base, **(user or {})}


def audit_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    settings: EvalSettings,
    *,
    budget: str = "standard",
    pairing: Mapping[str, Any] | None = None,
    eps_factors: Sequence[float] = EPS_FACTORS,
    unbounded_eps: float | None = UNBOUNDED_EPS,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The audit of one model at the L_inf threat model: {"clean_acc", "robust_acc" (worst_case first), "attacks",
    "worst_case", "eps_curve", "unbounded", "probe", "verdict", "flags", "budget", "runtime_s"}.

    settings.attacks, when not empty, overrides the budget's set; settings.params adds to the budget's
    parameters (an eps there is not used: the threat model decides every budget); n_samples is not used.
    """
    if budget not in BUDGETS:
        raise ESQUserError(f"eval.budget: {budget!r} is not a budget; allowed: {', '.join(BUDGETS)}")
    th, eps, seed, batch_size = settings.thresholds, threat.eps, settings.seed, settings.batch_size
    start = time.perf_counter()
    chosen = attack_set(budget)
    names = list(settings.attacks) if settings.attacks else list(chosen)
    # The budget's attacks whose package is missing: the audit says so and cannot end `pass`.
    missing = {} if settings.attacks else missing_attacks(budget)
    # The audit's threat model decides every budget: an eps in eval.params is not used here.
    user = {k: {p: v for p, v in dict(val or {}).items() if p != "eps"} for k, val in (settings.params or {}).items()}
    run_params = {name: _merge(chosen.get(name, {}), user.get(name)) for name in names}
    if "pgd_pairing" in names and pairing:
        run_params["pgd_pairing"] = {**pairing, **run_params["pgd_pairing"]}
    ev = evaluate_robustness(
        model,
        x,
        y,
        ThreatModel("linf", eps, threat.fgsm_factor),
        replace(settings, attacks=names, params=run_params, n_samples=None),
        device=device,
        on_gradient_error="record",
    )
    clean_correct = ev["clean_correct"]
    n = len(clean_correct)
    x, y = x[:n], y[:n]
    curve: dict[str, Any] = {
        "factors": list(eps_factors),
        "eps": [min(1.0, f * eps) for f in eps_factors],
        "attacks": {},
        "worst_case": [],
    }
    unbounded: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        with full_quantization(model):
            probe = probe_model(model, x.to(device), y.to(device))
            gradients_ok = probe["zero_margin_gradient_share"] <= th.zero_gradient_share
            curve_attacks = CURVE_ATTACKS[budget] if gradients_ok else {}
            per_eps: list[dict[str, Tensor]] = [{} for _ in curve["eps"]]
            for name, p in curve_attacks.items():
                accs = []
                for i, e in enumerate(curve["eps"]):
                    torch.manual_seed(seed)
                    correct, _, _ = attack_in_batches(
                        name, model, x, y, e, _merge(p, user.get(name)), batch_size, device, progress=False
                    )
                    per_eps[i][name] = correct & clean_correct
                    accs.append(per_eps[i][name].float().mean().item())
                curve["attacks"][name] = {"acc": accs, "params": p}
            for masks in per_eps:
                mask = clean_correct.clone()
                for m in masks.values():
                    mask &= m
                curve["worst_case"].append(mask.float().mean().item() if masks and n else None)
            if unbounded_eps is not None and gradients_ok:
                torch.manual_seed(seed)
                correct, _, _ = attack_in_batches(
                    "pgd_margin", model, x, y, float(unbounded_eps), {"steps": 50}, batch_size, device, progress=False
                )
                unbounded = {
                    "attack": "pgd_margin",
                    "steps": 50,
                    "eps": float(unbounded_eps),
                    "acc": (correct & clean_correct).float().mean().item(),
                }
    finally:
        model.train(was_training)
    flags = probe_flags(probe, ev["clean_acc"], th) + attack_flags(ev, "linf", eps, th)
    for name, c in curve["attacks"].items():
        flags += curve_flags(curve["eps"], c["acc"], th, name)
    if unbounded:
        flags += unbounded_flags(unbounded["acc"], unbounded["eps"], probe["num_classes"], th, unbounded["attack"])
    if missing:
        flags.append(
            flag(
                "attack_set_incomplete",
                f"the {budget} budget's {', '.join(missing)} did not run: "
                + "; ".join(f"{k} needs the {v} package" for k, v in missing.items())
                + "; the worst case is over the other attacks only",
                missing=missing,
            )
        )
    wc = worst_case(clean_correct, ev["correct"], ev["attacks"], "linf", eps)
    return {
        "missing_attacks": missing,
        "per_sample": survival_table(clean_correct, ev["correct"]),
        "budget": budget,
        "clean_acc": ev["clean_acc"],
        "robust_acc": ev["robust_acc"],
        "attacks": ev["attacks"],
        "worst_case": {k: v for k, v in wc.items() if k != "mask"},
        "eps_curve": curve,
        "unbounded": unbounded,
        "probe": probe,
        "unattackable": ev["unattackable"],
        "gradient_masking": ev["gradient_masking"],
        "verdict": verdict(flags, attacked=bool(ev["attacks"])),
        "flags": flags,
        "n_samples": n,
        "runtime_s": round(time.perf_counter() - start, 1),
    }


def audit_markdown(records: Sequence[Mapping[str, Any]], eps: float, dataset: str, command: str) -> str:
    """audit.md: one row per model (clean, each attack, worst case, verdict), the eps curve, the flags."""
    attacks: list[str] = []
    for rec in records:
        for name in rec["robust_acc"]:
            if name != "worst_case" and name not in attacks:
                attacks.append(name)

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    def head(name: str, rec: Mapping[str, Any]) -> str:
        e = (rec["attacks"].get(name) or {}).get("eps")
        return name if e is None or abs(e - eps) < 1e-9 else f"{name} (eps={e:.3g})"

    lines = [
        f"# Audit: {dataset}, L_inf eps={eps:.4g}, budget {records[0]['budget']}, "
        f"{records[0]['n_samples']} test inputs, eval mode, full quantization",
        "",
        f"Command: `{command}`",
        "",
        "| model | clean | worst case | " + " | ".join(head(a, records[0]) for a in attacks) + " | verdict |",
        "|---|---|---|" + "---|" * len(attacks) + "---|",
    ]
    for rec in records:
        cells = [pct(rec["robust_acc"].get(a)) for a in attacks]
        lines.append(
            f"| {rec['label']} | {pct(rec['clean_acc'])} | **{pct(rec['worst_case']['acc'])}** | "
            + " | ".join(cells)
            + f" | {rec['verdict']} |"
        )
    factors = records[0]["eps_curve"]["factors"]
    lines += [
        "",
        f"Accuracy vs eps (independent runs per eps; worst case over {', '.join(records[0]['eps_curve']['attacks'])}):",
        "",
        "| model | curve | " + " | ".join(f"{f:g}x eps ({min(1.0, f * eps):.3g})" for f in factors) + " |",
        "|---|---|" + "---|" * len(factors),
    ]
    for rec in records:
        lines.append(
            f"| {rec['label']} | worst case | " + " | ".join(pct(v) for v in rec["eps_curve"]["worst_case"]) + " |"
        )
        fgsm = (rec["eps_curve"]["attacks"].get("fgsm") or {}).get("acc")
        if fgsm:
            lines.append(f"| {rec['label']} | FGSM | " + " | ".join(pct(v) for v in fgsm) + " |")
    lines += ["", "Flags (docs/evaluation.md, 'Checks and the verdict'):", ""]
    for rec in records:
        if not rec["flags"]:
            lines.append(f"- {rec['label']}: none (verdict pass)")
        for f in rec["flags"]:
            lines.append(f"- {rec['label']}: [{f['severity']}] {f['name']}: {f['message']}")
    return "\n".join(lines) + "\n"


def plot_audit(records: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Left: accuracy per attack (bars) per model; right: worst-case accuracy vs eps per model."""
    from matplotlib.figure import Figure  # matplotlib loads only when a figure is drawn

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = ["clean", *[a for a in records[0]["robust_acc"]]]
    width = 0.8 / max(len(records), 1)
    for i, rec in enumerate(records):
        vals = [rec["clean_acc"], *[rec["robust_acc"].get(a, 0.0) for a in names[1:]]]
        ax1.bar([j + i * width for j in range(len(names))], [100 * v for v in vals], width=width, label=rec["label"])
        curve = rec["eps_curve"]
        pts = [(e, 100 * v) for e, v in zip(curve["eps"], curve["worst_case"]) if v is not None]
        if pts:
            line = ax2.plot(
                [0.0] + [p[0] for p in pts],
                [100 * rec["clean_acc"]] + [p[1] for p in pts],
                marker="o",
                label=f"{rec['label']} worst case of the curve attacks",
            )[0]
            fgsm = (curve["attacks"].get("fgsm") or {}).get("acc")
            if fgsm:
                ax2.plot(
                    [0.0, *curve["eps"]],
                    [100 * rec["clean_acc"], *[100 * v for v in fgsm]],
                    linestyle="--",
                    marker="x",
                    color=line.get_color(),
                    label=f"{rec['label']} FGSM",
                )
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right", fontsize=7)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.legend(fontsize=7)
    # The two panels' worst cases are over different attack sets: say which.
    ax1.set_title("at the threat model; worst_case = over every attack of the bars", fontsize=8)
    curve_attacks = sorted({a for rec in records for a in (rec.get("eps_curve") or {}).get("attacks", {})})
    ax2.set_title(
        f"accuracy vs eps; worst case over {', '.join(curve_attacks) or 'the curve attacks'} only", fontsize=8
    )
    ax2.set_xlabel("L_inf eps")
    ax2.set_ylabel("accuracy (%): worst case (solid), FGSM (dashed)")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(top=0.84, bottom=0.22)
    return save_figure(fig, path)
