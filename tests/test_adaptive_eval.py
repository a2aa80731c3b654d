"""Attacks that do not trust the loss scale, the per-sample worst case, the checks and their verdict, the audit.

A tiny CNN trained once on sklearn digits (1x8x8 in [0, 1]), and copies built to trigger each check: logits
scaled by 1000 (same predictions, saturated softmax), a rounding input layer without a straight-through
estimator (zero input gradients), and a randomized forward (input noise).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esq_lightning.attacks import ATTACKS, pgd, run_attack
from esq_lightning.config.threat import ThreatModel
from esq_lightning.evaluation import evaluate_robustness
from esq_lightning.evaluation.audit import audit_model
from esq_lightning.evaluation.checks import FLAGS, Thresholds, curve_flags, evaluation_checks, verdict
from esq_lightning.evaluation.sequence import EvalSettings
from esq_lightning.evaluation.whitebox import attack_budget
from esq_lightning.evaluation.worstcase import worst_case

EPS = 0.1
NEW_ATTACKS = ("pgd_margin", "pgd_dlr", "pgd_mt", "pgd_pp", "pgd_pairing", "pgd_schedule")
FAST = {"steps": 10}


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.3) / 0.4


class RoundInput(nn.Module):
    """Rounding with no straight-through estimator: zero input gradient everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


class Noisy(nn.Module):
    """A randomized forward: Gaussian input noise on every call, also in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * torch.randn_like(x)


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from tests.fakes import train_tiny_digits_model

    torch.manual_seed(0)
    model, x, y = train_tiny_digits_model(_cnn())
    return model, x[:200], y[:200]


def scaled(model: nn.Module, factor: float = 1000.0) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[-1].weight.mul_(factor)
        out[-1].bias.mul_(factor)
    return out


def acc(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> float:
    return run_attack(name, model, x, y, eps=EPS, **params).correct.float().mean().item()


@pytest.mark.parametrize("name", NEW_ATTACKS)
def test_each_new_attack_lowers_accuracy(trained, name):
    model, x, y = trained
    clean = (model(x).argmax(1) == y).float().mean().item()
    params = (
        {"steps": 10, "restarts": 1, "step_fractions": [0.25], "losses": ["margin"]}
        if name == "pgd_schedule"
        else dict(FAST)
    )
    out = run_attack(name, model, x, y, eps=EPS, **params)
    assert out.correct.float().mean().item() < clean - 0.1
    assert out.norms.max() <= EPS * (1 + 1e-5) and out.params["eps"] == EPS
    assert out.params["step_size"] == pytest.approx(0.25 * EPS) if name != "pgd_schedule" else True


def test_margin_and_dlr_ignore_the_logit_scale_while_ce_fails(trained):
    model, x, y = trained
    big = scaled(model)
    assert torch.equal(model(x).argmax(1), big(x).argmax(1))
    for name in ("pgd_margin", "pgd_dlr"):
        assert abs(acc(name, model, x, y, **FAST) - acc(name, big, x, y, **FAST)) <= 0.01
    # Cross-entropy PGD saturates on the scaled copy: the reason for the attacks above.
    assert acc("pgd20", big, x, y) > acc("pgd20", model, x, y) + 0.3


def test_pgd_keep_best_never_returns_a_worse_point_and_default_is_last_iterate(trained):
    model, x, y = trained
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    last = pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=g())
    again = pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=g(), loss_fn="ce")
    assert torch.equal(last, again)
    best = pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=g(), keep_best=True)
    fooled_last = model(last).argmax(1) != y
    fooled_best = model(best).argmax(1) != y
    assert bool((fooled_best | ~fooled_last).all()) and fooled_best.sum() >= fooled_last.sum()


def test_worst_case_is_at_most_every_attack_and_ignores_other_threat_models(trained):
    model, x, y = trained
    attacks = ["fgsm", "pgd20", "pgd_margin", "ddn"] if "ddn" in ATTACKS else ["fgsm", "pgd20", "pgd_margin"]
    ev = evaluate_robustness(
        model,
        x,
        y,
        ThreatModel("linf", EPS, fgsm_factor=2.0),
        EvalSettings(["fgsm", "pgd20", "pgd_margin"], params={"pgd_margin": FAST}, progress=False),
    )
    wc = ev["robust_acc"]["worst_case"]
    assert list(ev["robust_acc"])[0] == "worst_case"
    # FGSM ran at 2 x eps: its own threat model, outside the worst case.
    assert ev["attacks"]["fgsm"]["eps"] == pytest.approx(2 * EPS)
    assert ev["worst_case"]["attacks"] == ["pgd20", "pgd_margin"] and ev["worst_case"]["excluded"] == ["fgsm"]
    for name in ("pgd20", "pgd_margin"):
        assert wc <= ev["robust_acc"][name]
    both = (ev["correct"]["pgd20"] & ev["correct"]["pgd_margin"]).float().mean().item()
    assert wc == pytest.approx(both)
    assert attacks  # the L2 attacks never enter (worst_case() filters on norm and eps)
    none = worst_case(ev["clean_correct"], ev["correct"], ev["attacks"], "l2", 1.0)
    assert none["acc"] is None and none["attacks"] == []


def test_threat_model_sets_every_linf_budget():
    eps, params = attack_budget("pgd20", 0.1, {})
    assert eps == 0.1 and params == {}
    assert attack_budget("fgsm", 0.1, {}, fgsm_factor=1.0)[0] == 0.1
    assert attack_budget("fgsm", 8 / 255, {}, fgsm_factor=2.0)[0] == 16 / 255
    assert attack_budget("fgsm", 0.1, {"eps": 0.3})[0] == 0.3  # its own eps: its own threat model
    out = run_attack("pgd20", _cnn().eval(), torch.rand(4, 1, 8, 8), torch.arange(4), eps=0.1)
    assert out.params["step_size"] == pytest.approx(0.025)


def _flag_names(audit: dict) -> set[str]:
    return {f["name"] for f in audit["flags"]}


def test_normal_model_passes_every_check(trained):
    model, x, y = trained
    rec = audit_model(
        model,
        x,
        y,
        ThreatModel("linf", EPS),
        EvalSettings(["pgd20", "pgd_margin", "pgd_dlr"], params={"pgd_margin": FAST, "pgd_dlr": FAST}, progress=False),
        budget="quick",
    )
    assert rec["verdict"] == "pass", rec["flags"]
    assert rec["worst_case"]["acc"] <= min(v for k, v in rec["robust_acc"].items() if k != "worst_case")
    assert len(rec["eps_curve"]["worst_case"]) == 5 and rec["unbounded"]["acc"] <= 0.2


def test_scaled_logits_are_flagged_and_margin_pgd_still_measures(trained):
    model, x, y = trained
    big = scaled(model)
    rec = audit_model(
        big,
        x,
        y,
        ThreatModel("linf", EPS),
        EvalSettings(
            ["fgsm", "pgd20", "pgd_margin", "pgd_dlr"], params={"pgd_margin": FAST, "pgd_dlr": FAST}, progress=False
        ),
        budget="quick",
    )
    names = _flag_names(rec)
    assert rec["verdict"] != "pass"
    assert {"loss_scale_sensitivity", "weak_attack_overstates", "saturated_gradients"} <= names
    # The cheap checks of the end-of-training evaluation catch it from fgsm + pgd20 alone (margin-PGD probe).
    ev = evaluate_robustness(big, x, y, ThreatModel("linf", EPS), EvalSettings(["fgsm", "pgd20"], progress=False))
    audit = evaluation_checks(big, x, y, ev, "linf", EPS)
    assert audit["verdict"] != "pass" and "loss_scale_sensitivity" in _flag_names(audit)
    assert audit["probes"]["pgd_margin"]["acc"] < ev["robust_acc"]["pgd20"] - 0.3


def test_rounding_without_ste_is_a_failed_verdict_not_a_crash(trained):
    model, x, y = trained
    rounded = nn.Sequential(RoundInput(), model)
    ev = evaluate_robustness(
        rounded, x, y, ThreatModel("linf", EPS), EvalSettings(["pgd20"], progress=False), on_gradient_error="record"
    )
    assert "pgd20" in ev["unattackable"] and "pgd20" not in ev["robust_acc"]
    audit = evaluation_checks(rounded, x, y, ev, "linf", EPS)
    assert audit["verdict"] == "fail" and {"zero_gradients", "unattackable"} <= _flag_names(audit)
    # Square (gradient-free) against a gradient attack that found nothing; the unbounded probe cannot run without
    # gradients, so the zero-gradient flag is the reason given.
    ev2 = {
        "clean_acc": 0.9,
        "robust_acc": {"pgd20": 0.9, "square": 0.5},
        "attacks": {"pgd20": {"norm": "linf", "eps": EPS}, "square": {"norm": "linf", "eps": EPS}},
    }
    from esq_lightning.evaluation.checks import attack_flags, unbounded_flags

    assert "gradient_free_beats_gradient" in {f["name"] for f in attack_flags(ev2, "linf", EPS, Thresholds())}
    assert unbounded_flags(0.9, 0.5, 10, Thresholds(), "pgd_margin")[0]["name"] == "unbounded_budget"
    assert not unbounded_flags(0.1, 0.5, 10, Thresholds(), "pgd_margin")


def test_randomized_forward_is_flagged(trained):
    model, x, y = trained
    noisy = nn.Sequential(Noisy(), model)
    ev = evaluate_robustness(noisy, x, y, ThreatModel("linf", EPS), EvalSettings(["pgd20"], progress=False))
    audit = evaluation_checks(noisy, x, y, ev, "linf", EPS, margin_probe_steps=None)
    assert "randomized_forward" in _flag_names(audit) and audit["verdict"] == "fail"


def test_constant_output_and_curve_checks():
    constant = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.arange(10.0))
    x, y = torch.rand(60, 1, 8, 8), torch.arange(60) % 10
    ev = evaluate_robustness(
        constant, x, y, ThreatModel("linf", EPS), EvalSettings(["pgd20"], progress=False), on_gradient_error="record"
    )
    names = _flag_names(evaluation_checks(constant, x, y, ev, "linf", EPS))
    assert {"constant_output", "chance_accuracy", "zero_gradients"} <= names
    rising = curve_flags([0.1, 0.2, 0.4], [0.5, 0.3, 0.45], Thresholds(), "pgd_margin")
    assert [f["name"] for f in rising] == ["non_monotone_eps"]
    assert not curve_flags([0.1, 0.2, 0.4], [0.5, 0.3, 0.1], Thresholds(), "pgd_margin")
    assert set(FLAGS.values()) == {"warn", "fail"} and verdict([]) == "pass"


# --- end to end: esq-train's verdict, the threat model, esq-eval mode=audit ---------------------------------------

TRAIN = [
    "threads=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "method=natural",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "callbacks.pgd.val_every_n_epochs=0",
    "callbacks.quant_ratio.start=1.0",
    "quant=full",
    "eval.n_samples=40",
    "logger=none",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    from esq_lightning.commands.train import train
    from tests.hydra_utils import compose_config

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    cfg = compose_config("train", [*TRAIN, "eval.eps=0.1", "eval.attacks=[fgsm,pgd20]", "setting=NF"], run_dir)
    results, _ = train(cfg)
    return results


def test_eval_eps_sets_fgsm_and_pgd_step(tiny_run):
    import json
    from pathlib import Path

    on_disk = json.loads((Path(tiny_run["run_dir"]) / "results.json").read_text())
    assert on_disk["attacks"]["fgsm"]["eps"] == pytest.approx(0.1)  # digits: FGSM at 1x eps, not data's 0.2
    assert on_disk["attacks"]["pgd20"]["step_size"] == pytest.approx(0.025)
    assert on_disk["threat_model"] == {"norm": "linf", "eps": 0.1, "fgsm_eps": pytest.approx(0.1)}
    assert list(on_disk["robust_acc"])[0] == "worst_case"
    assert on_disk["robust_acc"]["worst_case"] <= min(on_disk["robust_acc"]["fgsm"], on_disk["robust_acc"]["pgd20"])
    assert on_disk["audit"]["verdict"] in ("pass", "warn", "fail") and "flags" in on_disk["audit"]


def test_audit_mode_writes_audit_files_and_verdict(tiny_run, tmp_path):
    import json

    from esq_lightning.commands.evaluate import evaluate
    from tests.hydra_utils import compose_config

    cfg = compose_config(
        "eval",
        [
            "threads=1",
            "progress=false",
            "mode=audit",
            f"ckpt_path={tiny_run['checkpoint']}",
            "eval.budget=quick",
            "eval.n_samples=30",
            "eval.eps=0.1",
            "eval.audit.attacks=[pgd20,pgd_margin]",
            "eval.audit.eps_factors=[0.5,1,2]",
            "++eval.params.pgd_margin.steps=5",
        ],
        tmp_path,
    )
    record = evaluate(cfg)
    for name in ("audit.json", "audit.md", "audit.png", "results.json"):
        assert (tmp_path / name).is_file(), name
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["audit"]["verdict"] in ("pass", "warn", "fail") and isinstance(res["audit"]["flags"], list)
    assert res["robust_acc"]["worst_case"] <= min(res["robust_acc"]["pgd20"], res["robust_acc"]["pgd_margin"])
    assert res["attacks"]["pgd_margin"]["steps"] == 5
    model = record["models_audit"][0]
    assert model["eps_curve"]["eps"] == pytest.approx([0.05, 0.1, 0.2])
    assert "worst case" in (tmp_path / "audit.md").read_text()


def test_unattackable_training_run_writes_results_and_fails_in_one_line(tmp_path, monkeypatch):
    """A model whose input gradients are zero (input rounding without STE) is a result: verdict fail, exit 3."""
    import importlib
    import json

    from esq_lightning.errors import EvaluationFailed
    from tests.hydra_utils import compose_config

    # The module whose build_network esq-train calls.
    train_mod = importlib.import_module("esq_lightning.commands.train")
    build = train_mod.build_network
    monkeypatch.setattr(train_mod, "build_network", lambda m, q, **kw: nn.Sequential(RoundInput(), build(m, q, **kw)))
    cfg = compose_config("train", [*TRAIN, "trainer.max_epochs=1", "eval.attacks=[fgsm,pgd20]"], tmp_path)
    results, _ = train_mod.train(cfg)
    with pytest.raises(EvaluationFailed, match="cannot be attacked honestly"):
        train_mod.raise_if_unattackable(results)  # what esq-train does with it: one line, exit code 3
    res = json.loads((tmp_path / "results.json").read_text())
    assert res == results
    assert res["audit"]["verdict"] == "fail" and res["clean_acc"] > 0.3
    assert {"zero_gradients", "unattackable"} <= {f["name"] for f in res["audit"]["flags"]}
    assert "pgd20" not in res["robust_acc"]


def test_transfer_refuses_minimum_norm_attacks_and_amplification_says_where_it_measures(trained):
    from esq_lightning.commands.evaluate import check_transfer_attack
    from esq_lightning.errors import ESQUserError
    from esq_lightning.evaluation import measured_at, transfer_matrix
    from esq_lightning.models import MODELS

    model, x, y = trained
    with pytest.raises(ValueError, match="minimum-norm"):
        transfer_matrix([model], ["m"], x[:4], y[:4], attack="ddn", eps=0.05, progress=False)
    with pytest.raises(ESQUserError, match="eval.transfer.attack: cw is a minimum-norm attack"):
        check_transfer_attack("cw")
    check_transfer_attack("pgd20")
    assert "no ReLU follows the add" in measured_at(MODELS["preact_resnet18"](num_classes=10))
    assert measured_at(MODELS["resnet20"](num_classes=10)) == "after the add and ReLU"
