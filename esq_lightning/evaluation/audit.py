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
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from esq_lightning.evaluation.checks import (
    Thresholds,
    attack_flags,
    curve_flags,
    format_verdict,
    probe_flags,
    probe_model,
    unbounded_flags,
    verdict,
)
from esq_lightning.evaluation.masking import DEFAULT_TOLERANCE

# The attack sets of eval.budget (docs/evaluation.md). Steps, restarts, targets and queries per attack; every
# L_inf attack at eval.eps, PGD steps at eps/4 unless the schedule says otherwise.
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "fgsm": {}, "pgd20": {}, "pgd_margin": {"steps": 20}, "pgd_dlr": {"steps": 20},
        "pgd_pp": {"steps": 20}, "pgd_pairing": {"steps": 20},
    },
    "standard": {
        "fgsm": {}, "pgd20": {}, "pgd100": {"restarts": 2},
        "pgd_margin": {"steps": 100, "restarts": 2}, "pgd_dlr": {"steps": 100, "restarts": 2},
        "pgd_mt": {"steps": 50, "targets": 3}, "pgd_pp": {"steps": 100}, "pgd_pairing": {"steps": 100},
        "square": {"n_queries": 1000}, "autoattack": {},
    },
    "thorough": {
        "fgsm": {}, "pgd20": {}, "pgd100": {"restarts": 5},
        "pgd_margin": {"steps": 200, "restarts": 5}, "pgd_dlr": {"steps": 200, "restarts": 5},
        "pgd_mt": {"steps": 100, "targets": 9}, "pgd_pp": {"steps": 200, "restarts": 5},
        "pgd_pairing": {"steps": 200, "restarts": 5},
        "pgd_schedule": {"steps": 200, "restarts": 5}, "square": {"n_queries": 5000}, "autoattack": {},
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
    from esq_lightning.attacks import ATTACKS, library_available

    return {k: v for k, v in BUDGETS[budget].items() if library_available(ATTACKS[k])}


def _merge(base: Mapping[str, Any], user: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**base, **(user or {})}


def audit_model(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, budget: str = "standard",
    params: Mapping[str, Mapping[str, Any]] | None = None, pairing: Mapping[str, Any] | None = None,
    eps_factors: Sequence[float] = EPS_FACTORS, unbounded_eps: float | None = UNBOUNDED_EPS,
    thresholds: Thresholds | None = None, batch_size: int = 500, device: torch.device | str = "cpu",
    seed: int = 0, progress: bool = False, attacks: Sequence[str] | None = None, fgsm_factor: float = 1.0,
    masking_tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """The audit of one model at L_inf eps: {"clean_acc", "robust_acc" (worst_case first), "attacks", "worst_case",
    "eps_curve", "unbounded", "probe", "verdict", "flags", "budget", "runtime_s"}. `attacks` overrides the set."""
    from esq_lightning.evaluation.whitebox import attack_in_batches, evaluate_robustness
    from esq_lightning.evaluation.worstcase import worst_case
    from esq_lightning.quant import full_quantization

    if budget not in BUDGETS:
        from esq_lightning.errors import ESQUserError

        raise ESQUserError(f"eval.budget: {budget!r} is not a budget; allowed: {', '.join(BUDGETS)}")
    th = thresholds or Thresholds()
    start = time.perf_counter()
    chosen = attack_set(budget)
    names = list(attacks) if attacks else list(chosen)
    # The audit's threat model decides every budget: an eps in eval.params is not used here.
    user = {k: {p: v for p, v in dict(val or {}).items() if p != "eps"} for k, val in (params or {}).items()}
    run_params = {name: _merge(chosen.get(name, {}), user.get(name)) for name in names}
    if "pgd_pairing" in names and pairing:
        run_params["pgd_pairing"] = {**pairing, **run_params["pgd_pairing"]}
    ev = evaluate_robustness(model, x, y, attacks=names, eps=eps, params=run_params, batch_size=batch_size,
                             device=device, seed=seed, progress=progress, norm="linf", on_gradient_error="record",
                             fgsm_factor=fgsm_factor, masking_tolerance=masking_tolerance)
    clean_correct = ev["clean_correct"]
    n = len(clean_correct)
    x, y = x[:n], y[:n]
    curve: dict[str, Any] = {"factors": list(eps_factors), "eps": [min(1.0, f * eps) for f in eps_factors],
                             "attacks": {}, "worst_case": []}
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
                    correct, _, _ = attack_in_batches(name, model, x, y, e, _merge(p, user.get(name)), batch_size,
                                                      device, progress=False)
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
                correct, _, _ = attack_in_batches("pgd_margin", model, x, y, float(unbounded_eps), {"steps": 50},
                                                  batch_size, device, progress=False)
                unbounded = {"attack": "pgd_margin", "steps": 50, "eps": float(unbounded_eps),
                             "acc": (correct & clean_correct).float().mean().item()}
    finally:
        model.train(was_training)
    flags = probe_flags(probe, ev["clean_acc"], th) + attack_flags(ev, "linf", eps, th)
    for name, c in curve["attacks"].items():
        flags += curve_flags(curve["eps"], c["acc"], th, name)
    if unbounded:
        flags += unbounded_flags(unbounded["acc"], unbounded["eps"], probe["num_classes"], th, unbounded["attack"])
    wc = worst_case(clean_correct, ev["correct"], ev["attacks"], "linf", eps)
    return {
        "budget": budget, "clean_acc": ev["clean_acc"], "robust_acc": ev["robust_acc"], "attacks": ev["attacks"],
        "worst_case": {k: v for k, v in wc.items() if k != "mask"}, "eps_curve": curve, "unbounded": unbounded,
        "probe": probe, "unattackable": ev["unattackable"], "gradient_masking": ev["gradient_masking"],
        "verdict": verdict(flags), "flags": flags, "n_samples": n, "runtime_s": round(time.perf_counter() - start, 1),
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
    lines = [f"# Audit: {dataset}, L_inf eps={eps:.4g}, budget {records[0]['budget']}, "
             f"{records[0]['n_samples']} test inputs, eval mode, full quantization", "",
             f"Command: `{command}`", "",
             "| model | clean | worst case | " + " | ".join(head(a, records[0]) for a in attacks) + " | verdict |",
             "|---|---|---|" + "---|" * len(attacks) + "---|"]
    for rec in records:
        cells = [pct(rec["robust_acc"].get(a)) for a in attacks]
        lines.append(f"| {rec['label']} | {pct(rec['clean_acc'])} | **{pct(rec['worst_case']['acc'])}** | "
                     + " | ".join(cells) + f" | {rec['verdict']} |")
    factors = records[0]["eps_curve"]["factors"]
    lines += ["", "Accuracy vs eps (independent runs per eps; worst case over "
              f"{', '.join(records[0]['eps_curve']['attacks'])}):", "",
              "| model | curve | " + " | ".join(f"{f:g}x eps ({min(1.0, f * eps):.3g})" for f in factors) + " |",
              "|---|---|" + "---|" * len(factors)]
    for rec in records:
        lines.append(f"| {rec['label']} | worst case | "
                     + " | ".join(pct(v) for v in rec["eps_curve"]["worst_case"]) + " |")
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
    from matplotlib.figure import Figure

    from esq_lightning.evaluation.plots import _save

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
            line = ax2.plot([0.0] + [p[0] for p in pts], [100 * rec["clean_acc"]] + [p[1] for p in pts], marker="o",
                            label=f"{rec['label']} worst case")[0]
            fgsm = (curve["attacks"].get("fgsm") or {}).get("acc")
            if fgsm:
                ax2.plot([0.0, *curve["eps"]], [100 * rec["clean_acc"], *[100 * v for v in fgsm]], linestyle="--",
                         marker="x", color=line.get_color(), label=f"{rec['label']} FGSM")
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right", fontsize=7)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("L_inf eps")
    ax2.set_ylabel("accuracy (%): worst case (solid), FGSM (dashed)")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _plain(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def evaluate_audit(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """esq-eval mode=audit: audit.json, audit.md, audit.png and results.json (one per checkpoint)."""
    import sys

    from esq_lightning.attacks import pairing_attack_params
    from esq_lightning.evaluation.modes import (
        _header,
        checkpoint_paths,
        default_device,
        load_checkpoints,
        load_test_split,
        run_config_with_eval,
    )
    from esq_lightning.evaluation.threat import fgsm_factor
    from esq_lightning.artifacts.results import build_results, print_results
    from esq_lightning.artifacts.atomic import atomic_write_json, atomic_write_text

    paths = checkpoint_paths(cfg, "audit")
    loaded = load_checkpoints(paths, "audit")
    run_cfg = run_config_with_eval(loaded[0].train_config, cfg)
    ev_cfg = run_cfg.eval
    if str(ev_cfg.get("norm", "linf")) != "linf":
        from esq_lightning.errors import ESQUserError

        raise ESQUserError("eval.norm: mode=audit audits the L_inf threat model; allowed: linf")
    audit_cfg = _plain(ev_cfg.get("audit"))
    budget = str(ev_cfg.get("budget", "standard"))
    eps = float(ev_cfg.eps)
    params = _plain(ev_cfg.get("params"))
    th = Thresholds.from_config(_plain(ev_cfg.get("checks")))
    x, y = load_test_split(run_cfg, int(loaded[0].train_config["seed"]), ev_cfg.n_samples)
    records = []
    for i, item in enumerate(loaded):
        rec = audit_model(
            item.model, x, y, eps, budget=budget, params=params, pairing=pairing_attack_params(item.train_config),
            eps_factors=[float(f) for f in audit_cfg["eps_factors"]], unbounded_eps=audit_cfg["unbounded_eps"],
            thresholds=th, masking_tolerance=float(ev_cfg.masking.tolerance),
            batch_size=int(ev_cfg.batch_size), device=default_device(), seed=int(cfg.seed),
            progress=bool(cfg.get("progress", True)), attacks=audit_cfg.get("attacks"), fgsm_factor=fgsm_factor(run_cfg),
        )
        rec = {"label": item.label, "checkpoint": item.path, **rec}
        records.append(rec)
        model_cfg = run_config_with_eval(item.train_config, cfg)
        ev = {**rec, "audit": {"verdict": rec["verdict"], "flags": rec["flags"], "budget": budget}}
        results = build_results(model_cfg, ev, checkpoint=item.path, run_dir=str(out), mode="audit")
        target = out / "results.json" if len(loaded) == 1 else out / f"model{i}" / "results.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, results)
        print_results(results)
        print(format_verdict(rec["verdict"], rec["flags"]), flush=True)
    command = "esq-eval " + " ".join(sys.argv[1:]) if sys.argv[1:] else "esq-eval mode=audit"
    title = (f"{run_cfg.data.name}: audit ({budget}), L_inf eps={eps:.4g}, {len(y)} test inputs, eval mode, ratio 1")
    png = plot_audit(records, out / "audit.png", title)
    record = {**_header("audit", cfg, run_cfg, loaded, out, len(y)), "budget": budget,
              "threat_model": {"norm": "linf", "eps": eps}, "attack_sets": {"attacks": BUDGETS[budget],
                                                                        "curve": CURVE_ATTACKS[budget]},
              "models_audit": records, "figure": str(png), "command": command}
    atomic_write_json(out / "audit.json", record)
    atomic_write_text(out / "audit.md", audit_markdown(records, eps, run_cfg.data.name, command))
    print(f"wrote {out / 'audit.json'}, {out / 'audit.md'} and {png}", flush=True)
    return record
