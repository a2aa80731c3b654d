"""Adding an attack is one AttackSpec plus its runner: a toy attack registered here, with no other edit, runs in
esq-eval, enters the masking report by its family and the per-sample worst case, gets its title in esq-report, and
its declared parameter range is what the config check enforces."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esq_lightning.attacks import (
    ATTACKS,
    AttackSpec,
    ParamRange,
    attack_title,
    check_attack_params,
    register_attack,
    run_attack,
    unregister_attack,
)
from esq_lightning.attacks.spec import ADAPTIVE, BUDGETED, CE, GRADIENT_FREE, ITERATIVE, SINGLE_STEP
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.masking import gradient_masking_report
from tests.hydra_utils import FAST, compose_config

TOY = "toy_sign"


def _run_toy(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: dict[str, Any]) -> tuple[Tensor, dict]:
    """One signed-gradient step of scale x eps (an FGSM of its own)."""
    assert eps is not None
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + p["scale"] * eps * grad.sign()).clamp(0, 1).detach(), {"step": p["scale"] * eps}


def toy_spec(name: str = TOY) -> AttackSpec:
    return AttackSpec(
        name=name,
        kind=BUDGETED,
        norm="linf",
        library="esq_lightning",
        gradient_based=True,
        default_eps=8 / 255,
        defaults={"norm": "linf", "scale": 1.0},
        runner=_run_toy,
        description="A one-step sign attack of scale x eps (the test's toy attack).",
        family=SINGLE_STEP,
        loss=CE,
        title="Toy-Sign",
        ranges={"scale": ParamRange(float, gt=0, le=1, note="a fraction of eps")},
    )


@pytest.fixture
def toy() -> Any:
    spec = register_attack(toy_spec())
    yield spec
    unregister_attack(TOY)


TINY = [
    *FAST,
    "method=natural",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "callbacks.pgd.val_every_n_epochs=0",
    "callbacks.quant_ratio.start=1.0",
    "eval.attacks=[fgsm]",
    "eval.n_samples=16",
]
# pgd20 and the toy attack at the threat model (eps 0.1): the masking report compares the single step with PGD.
EVAL = [
    "threads=1",
    "progress=false",
    "eval.n_samples=30",
    "eval.batch_size=30",
    "eval.eps=0.1",
    f"eval.attacks=[{TOY},pgd20]",
    "++eval.params.pgd20.steps=5",
]


def test_a_registered_attack_runs_everywhere_without_other_edits(
    toy: AttackSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from esq_lightning.commands.evaluate import evaluate
    from esq_lightning.commands.train import train
    from esq_lightning.reporting.report import make_report

    results, _ = train(compose_config("train", TINY, tmp_path / "train"))
    ckpt = results["checkpoint"]
    capsys.readouterr()
    run = tmp_path / "eval"
    ev = evaluate(compose_config("eval", [*EVAL, f"ckpt_path={ckpt}", "++eval.params.toy_sign.scale=0.5"], run))
    printed = capsys.readouterr().out

    # The whitebox table and record: the attack ran at the threat model with its parameters recorded.
    assert f"{TOY} acc (eps=0.1)" in printed
    record = ev["attacks"][TOY]
    assert record["attack"] == TOY and record["scale"] == 0.5 and record["eps"] == pytest.approx(0.1)
    assert record["step"] == pytest.approx(0.05)
    assert 0.0 <= ev["robust_acc"][TOY] <= ev["clean_acc"]
    # The per-sample worst case takes it in (same norm and eps as pgd20).
    assert ev["worst_case"]["attacks"] == [TOY, "pgd20"]
    assert ev["robust_acc"]["worst_case"] <= min(ev["robust_acc"][TOY], ev["robust_acc"]["pgd20"])
    # The masking report compares it as the single-step attack it declares itself to be.
    checks = ev["gradient_masking"]["checks"]
    assert [(c["weaker"], c["stronger"]) for c in checks["single_step_beats_iterative"]] == [(TOY, "pgd20")]
    assert {c["attack"] for c in checks["clean_only_failure"]} == {TOY, "pgd20"}

    # esq-report's white-box table heads its column with the attack's title.
    report = make_report(run, out=tmp_path / "report", fmt="md")
    header = next(line for line in report["markdown"].splitlines() if line.startswith("| setting"))
    assert "Toy-Sign" in header and "PGD-20" in header and "worst case" in header


def test_a_parameter_out_of_its_declared_range_fails_in_one_line(toy: AttackSpec) -> None:
    from omegaconf import OmegaConf

    with pytest.raises(ESQUserError) as err:
        check_attack_params(OmegaConf.create({TOY: {"scale": 2}}), "eval.params")
    assert (
        str(err.value) == "eval.params.toy_sign.scale: 2 is out of range; allowed: 0 < scale <= 1 (a fraction of eps)"
    )
    with pytest.raises(ESQUserError, match=r"^eval\.params\.toy_sign\.scale: 'big' is not a number; allowed: 0 < "):
        check_attack_params({TOY: {"scale": "big"}}, "eval.params")
    with pytest.raises(ESQUserError, match=r"unknown parameter of toy_sign \(did you mean 'scale'\?\); allowed: eps"):
        check_attack_params({TOY: {"scales": 0.5}}, "eval.params")
    check_attack_params({TOY: {"scale": 1, "eps": 0.1}}, "eval.params")  # within the range


def test_the_declared_range_fails_an_eval_config_before_any_attack(toy: AttackSpec, tmp_path: Path) -> None:
    from esq_lightning.commands.checks import validate_config

    cfg = compose_config("train", [*FAST, f"eval.attacks=[{TOY}]", f"++eval.params.{TOY}.scale=0"], tmp_path)
    with pytest.raises(ESQUserError) as err:
        validate_config(cfg)
    assert (
        str(err.value) == "eval.params.toy_sign.scale: 0 is out of range; allowed: 0 < scale <= 1 (a fraction of eps)"
    )


def test_registration_is_checked_and_undone() -> None:
    assert TOY not in ATTACKS
    spec = register_attack(toy_spec())
    try:
        with pytest.raises(ValueError, match="attack 'toy_sign' is already registered"):
            register_attack(toy_spec())
        with pytest.raises(ValueError, match="attack 'fgsm' is already registered"):
            register_attack(toy_spec("fgsm"))
        assert attack_title(TOY) == "Toy-Sign" and ATTACKS[TOY] is spec
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        out = run_attack(TOY, model, torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1]), eps=0.1, scale=0.5)
        assert out.params["attack"] == TOY and out.norms.max() <= 0.05 + 1e-6
    finally:
        unregister_attack(TOY)
    assert TOY not in ATTACKS and attack_title(TOY) == TOY
    with pytest.raises(KeyError, match="'toy_sign' is not registered"):
        unregister_attack(TOY)


def test_a_spec_contradicting_itself_is_refused() -> None:
    base = dict(
        name="bad",
        kind=BUDGETED,
        norm="linf",
        library="esq_lightning",
        defaults={"steps": 1},
        runner=_run_toy,
        description="",
    )
    with pytest.raises(TypeError, match="family"):
        AttackSpec(**base, gradient_based=True)  # no default family: every attack says what it is
    with pytest.raises(ValueError, match="family 'gradient-free' contradicts gradient_based=True"):
        AttackSpec(**base, gradient_based=True, family=GRADIENT_FREE)
    with pytest.raises(ValueError, match="family 'sideways' is not one of"):
        AttackSpec(**base, gradient_based=True, family="sideways")
    with pytest.raises(ValueError, match=r"ranges for parameters it does not take: \['scale'\]"):
        AttackSpec(**base, gradient_based=True, family=ITERATIVE, ranges={"scale": ParamRange()})
    with pytest.raises(ValueError, match="kind 'sometimes' is not one of"):
        AttackSpec(**{**base, "kind": "sometimes"}, gradient_based=True, family=ITERATIVE)


def test_the_builtin_families_titles_and_budgets_are_the_registry_s() -> None:
    """What the scattered tables said, now read from the specs."""
    fam = {name: spec.family for name, spec in ATTACKS.items()}
    assert [n for n, f in fam.items() if f == SINGLE_STEP] == ["fgsm"]
    assert [n for n, f in fam.items() if f == ITERATIVE] == ["pgd20", "pgd100", "ddn", "cw", "autoattack"]
    assert [n for n, f in fam.items() if f == GRADIENT_FREE] == ["boundary", "nattack", "square"]
    assert all(f == ADAPTIVE for n, f in fam.items() if n.startswith("pgd_"))
    assert [n for n, s in ATTACKS.items() if s.query_budget is not None] == ["boundary", "nattack", "square"]
    assert ATTACKS["nattack"].query_budget({"max_iter": 10, "population": 20})["max_queries"] == 1 + 10 * 21
    assert [attack_title(n) for n in ("pgd20", "cw", "nattack", "pgd_pp", "unknown")] == [
        "PGD-20",
        "C&W",
        "N Attack",
        "PGD++",
        "unknown",
    ]


def test_the_masking_report_follows_a_registered_family(toy: AttackSpec) -> None:
    """A gradient-free toy below PGD-20 at the same threat model is flagged; as a single step it is not compared
    as a black-box attack."""
    attacks = {TOY: {"norm": "linf", "eps": 0.1}, "pgd20": {"norm": "linf", "eps": 0.1, "steps": 20}}
    acc = {TOY: 0.2, "pgd20": 0.5}
    single = gradient_masking_report(0.9, acc, attacks)
    assert [f.split(":")[0] for f in single["flags"]] == ["single_step_beats_iterative"]
    unregister_attack(TOY)
    register_attack(dataclasses.replace(toy_spec(), gradient_based=False, family=GRADIENT_FREE))
    free = gradient_masking_report(0.9, acc, attacks)
    assert [f.split(":")[0] for f in free["flags"]] == ["blackbox_beats_whitebox"]
