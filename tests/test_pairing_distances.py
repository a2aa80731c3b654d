"""The pairing distance registry (pairing.distance), the logit offset metrics and the drift warning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from esq_lightning.artifacts.results import LOGIT_OFFSET_WARNING, OFFSET_WARN_RATIO, logit_offset_warnings
from esq_lightning.commands.checks import validate_config
from esq_lightning.errors import ESQUserError
from esq_lightning.pairing import (
    DISTANCES,
    check_distance_for_layers,
    logit_offset_stats,
    pairing_distance,
    resolve_distance,
)
from esq_lightning.training.objectives import Objective
from tests.hydra_utils import FAST, compose_config

SHIFT_INVARIANT = [n for n, d in DISTANCES.items() if d.shift_invariant]
RELATIVE = [n for n, d in DISTANCES.items() if d.scale_invariant]


def _logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = 3 * torch.randn(16, 10, generator=g)
    return clean, clean + 0.7 * torch.randn(16, 10, generator=g)


def test_registry_names_the_papers_form() -> None:
    assert "paper" in DISTANCES["relative_l2"].description
    assert {"centred_l2", "log_softmax_l2", "kl"} <= set(SHIFT_INVARIANT)
    assert "relative_l2" not in SHIFT_INVARIANT and "relative_l1" not in SHIFT_INVARIANT
    assert {n for n, d in DISTANCES.items() if d.logits_only} == {"centred_l2", "log_softmax_l2", "kl"}


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
def test_a_common_logit_offset_leaves_shift_invariant_distances_unchanged(name: str) -> None:
    clean, adv = _logits()
    before = pairing_distance(clean, adv, distance=name)
    after = pairing_distance(clean + 25.0, adv + 25.0, distance=name)
    assert before.item() > 0
    assert after.item() == pytest.approx(before.item(), rel=1e-4)


@pytest.mark.parametrize("name", ["relative_l2", "relative_l1"])
def test_a_common_logit_offset_lowers_the_relative_distances(name: str) -> None:
    clean, adv = _logits()
    before = pairing_distance(clean, adv, distance=name)
    after = pairing_distance(clean + 25.0, adv + 25.0, distance=name)
    # The loophole: the same prediction errors read as a smaller D.
    assert after.item() < 0.5 * before.item()


@pytest.mark.parametrize("name", RELATIVE)
def test_scaling_both_inputs_leaves_relative_forms_unchanged(name: str) -> None:
    clean, adv = _logits(1)
    before = pairing_distance(clean, adv, distance=name)
    assert pairing_distance(7.5 * clean, 7.5 * adv, distance=name).item() == pytest.approx(before.item(), rel=1e-4)


@pytest.mark.parametrize("name", ["log_softmax_l2", "kl"])
def test_distribution_distances_are_not_scale_invariant(name: str) -> None:
    clean, adv = _logits(2)
    assert pairing_distance(4 * clean, 4 * adv, distance=name).item() != pytest.approx(
        pairing_distance(clean, adv, distance=name).item(), rel=1e-2
    )
    assert pairing_distance(clean, clean.clone(), distance=name).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_gradients_flow_through_both_branches(name: str) -> None:
    clean, adv = _logits(3)
    clean.requires_grad_(True)
    adv.requires_grad_(True)
    pairing_distance(clean, adv, distance=name).backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0
    assert adv.grad is not None and adv.grad.abs().sum() > 0


def test_the_default_and_the_p_spelling_are_the_papers_distance() -> None:
    clean, adv = _logits(4)
    assert torch.equal(pairing_distance(clean, adv), pairing_distance(clean, adv, distance="relative_l2"))
    assert torch.equal(pairing_distance(clean, adv, 1), pairing_distance(clean, adv, distance="relative_l1"))
    assert resolve_distance(None, None) == "relative_l2"
    assert resolve_distance(None, 1) == "relative_l1"
    assert resolve_distance("relative_l1", 1) == "relative_l1"
    with pytest.raises(ValueError, match=r"pairing.p=2 contradicts pairing.distance=centred_l2"):
        resolve_distance("centred_l2", 2)
    with pytest.raises(ValueError, match=r"unknown distance 'l7'; allowed: relative_l2"):
        resolve_distance("l7", None)


def test_logits_only_distances_refuse_a_feature_map() -> None:
    fmap = torch.randn(4, 8, 3, 3)
    with pytest.raises(ValueError, match="defined on logits"):
        pairing_distance(fmap, fmap + 1, distance="log_softmax_l2")
    with pytest.raises(ValueError, match="block1"):
        check_distance_for_layers("kl", ["block1", "logits"])
    check_distance_for_layers("relative_l1", ["block1", "logits"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["pairing.distance=kl", "pairing=digits_blocks"],
            "pairing.distance: kl is defined on the logits only but pairing.layers pairs ['block1', 'block2', 'block3']",
        ),
        (["pairing.distance=centred_l2", "pairing.p=2"], "pairing.p: 2 contradicts pairing.distance=centred_l2"),
        (["pairing.p=1"], "pairing.p: 1 contradicts pairing.distance=kl"),
        (["pairing=logits_paper", "pairing.p=1"], "pairing.p: 1 contradicts pairing.distance=relative_l2"),
        (["pairing.distance=l3"], "pairing.distance: 'l3' is not allowed"),
    ],
)
def test_bad_distance_configs_fail_in_one_line(overrides: list[str], expected: str, tmp_path: Path) -> None:
    cfg = compose_config("train", overrides, tmp_path)
    with pytest.raises(ESQUserError) as info:
        validate_config(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_matching_p_and_distance_validate(tmp_path: Path) -> None:
    validate_config(compose_config("train", ["pairing.distance=relative_l1", "pairing.p=1"], tmp_path / "a"))
    validate_config(compose_config("train", ["pairing.distance=null", "pairing.p=1"], tmp_path / "b"))


def test_offset_stats_see_a_common_offset_and_the_warning_fires_only_on_drift() -> None:
    clean, _ = _logits(5)
    natural = {k: float(v) for k, v in logit_offset_stats(clean).items()}
    drifted = {k: float(v) for k, v in logit_offset_stats(clean - 21.0).items()}
    assert drifted["centred_norm"] == pytest.approx(natural["centred_norm"], rel=1e-5)
    assert drifted["offset"] == pytest.approx(natural["offset"] - 21.0, rel=1e-5)
    assert natural["offset_ratio"] < OFFSET_WARN_RATIO < drifted["offset_ratio"]
    assert logit_offset_warnings(natural) == []
    (warning,) = logit_offset_warnings(drifted)
    assert warning["name"] == LOGIT_OFFSET_WARNING and warning["offset_ratio"] == drifted["offset_ratio"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_esq_objective_trains_the_chosen_distance_and_logs_the_honest_terms() -> None:
    torch.manual_seed(0)
    model, x, y = Tiny(), torch.randn(8, 6), torch.randint(0, 4, (8,))

    def attack(x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> torch.Tensor:
        return x + 0.3

    out = Objective("esq", ["logits"], [1.0], pairing_distance="kl")(model, x, y, attack)
    z, z_adv = model(x), model(x + 0.3)
    assert out.terms["D/logits"].item() == pytest.approx(pairing_distance(z, z_adv, distance="kl").item(), rel=1e-5)
    assert out.terms["D_centred/logits"].item() == pytest.approx(
        pairing_distance(z, z_adv, distance="centred_l2").item(), rel=1e-5
    )
    assert out.terms["logit_offset"].item() == pytest.approx(z.mean().item(), rel=1e-4, abs=1e-6)
    assert {"logit_centred_norm", "logit_offset_ratio"} <= set(out.terms)


def _train(tmp_path: Path, overrides: list[str]) -> dict:
    from esq_lightning.commands.train import train

    cfg = compose_config(
        "train",
        [
            *FAST,
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=3",
            "eval.n_samples=64",
            "callbacks.pgd.val_n_samples=32",
            "callbacks.pgd.steps=2",
            "eval.attacks=[fgsm]",
            # The full SQ ratio from the start: two epochs would otherwise end below ratio 1,
            # with its own named warning (sq_schedule_short) beside the one tested here.
            "callbacks.quant_ratio.start=1",
            *overrides,
        ],
        tmp_path,
    )
    results, objects = train(cfg)
    return results


def test_training_logs_offset_and_centred_distance_every_epoch_and_records_them(tmp_path: Path) -> None:
    results = _train(tmp_path, ["pairing.distance=centred_l2"])
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("train/D/logits", "train/D_centred/logits", "train/logit_offset", "train/logit_centred_norm"):
        assert len([r for r in rows if r.get(key)]) == 2, key
    # Training a centred distance: the trained D and the honest one are the same number.
    row = next(r for r in rows if r.get("train/D/logits"))
    assert float(row["train/D/logits"]) == pytest.approx(float(row["train/D_centred/logits"]), rel=1e-5)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["pairing"]["distance"] == "centred_l2"
    assert set(on_disk["logit_offset"]) == {"offset", "centred_norm", "offset_ratio"}
    assert on_disk["warnings"] == [] and results["warnings"] == []


def test_a_drifting_run_gets_the_named_warning_in_results_json(tmp_path: Path) -> None:
    # A constructed drift: the fc bias starts 30 above zero on every class (no prediction changes), and lr 0
    # keeps it there; the same run without the offset gets no warning.
    init = tmp_path / "drift.ckpt"
    from esq_lightning.artifacts.loading import build_network
    from tests.hydra_utils import compose_config as _compose

    cfg = _compose("train", [], tmp_path / "compose")
    model = build_network(cfg.model, cfg.quant)
    with torch.no_grad():
        model.fc.bias += 30.0
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, init)
    drift = _train(tmp_path / "drift", [f"init_from={init}", "optimizer.lr=1e-9"])
    assert [w["name"] for w in drift["warnings"]] == [LOGIT_OFFSET_WARNING]
    assert drift["logit_offset"]["offset_ratio"] > OFFSET_WARN_RATIO
    saved = json.loads((tmp_path / "drift" / "results.json").read_text())
    assert saved["warnings"][0]["name"] == LOGIT_OFFSET_WARNING
    natural = _train(tmp_path / "natural", ["optimizer.lr=1e-9"])
    assert natural["warnings"] == []


def test_amplification_reports_the_logit_layer_raw_and_centred() -> None:
    from esq_lightning.evaluation import amplification_curve
    from esq_lightning.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(width=4)
    x, y = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 10
    base = amplification_curve(model, x, y, eps=0.2, steps=3, seed=0)["logits"]
    assert set(base) == {"relative_l2", "centred_l2"} and base["centred_l2"] > 0
    with torch.no_grad():
        model.fc.bias += 50.0  # a common offset: same predictions, same attack, same centred logits
    shifted = amplification_curve(model, x, y, eps=0.2, steps=3, seed=0)["logits"]
    assert shifted["centred_l2"] == pytest.approx(base["centred_l2"], rel=1e-3)
    assert shifted["relative_l2"] < 0.5 * base["relative_l2"]


def test_objective_refuses_a_logits_only_distance_on_an_inner_module() -> None:
    with pytest.raises(ValueError, match="pairing.distance=log_softmax_l2 is defined on the logits only"):
        Objective("esq", ["fc", "logits"], [1.0, 1.0], pairing_distance="log_softmax_l2")


def test_pairing_warmup_ramps_every_lambda_linearly_over_its_epochs() -> None:
    torch.manual_seed(0)
    model, x, y = Tiny(), torch.randn(8, 6), torch.randint(0, 4, (8,))

    def attack(x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> torch.Tensor:
        return x + 0.3

    warm = Objective("esq", ["logits"], [10.0], pairing_warmup_epochs=4)
    assert [warm.lambda_scale(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warm.lambda_scale(None) == 1.0 and Objective("esq").lambda_scale(0) == 1.0
    full = Objective("esq", ["logits"], [10.0])(model, x, y, attack).terms["pairing"]
    at = {e: warm(model, x, y, attack, epoch=e).terms for e in (0, 1, 3)}
    for epoch, scale in ((0, 0.25), (1, 0.5), (3, 1.0)):
        assert at[epoch]["pairing"].item() == pytest.approx(scale * full.item(), rel=1e-6)
        assert at[epoch]["lambda_scale"].item() == scale
    # D itself is not scaled: the curve of the distance stays comparable across a warm-up.
    assert at[0]["D/logits"].item() == pytest.approx(at[3]["D/logits"].item(), rel=1e-6)


def test_training_with_a_warmup_logs_the_ramp(tmp_path: Path) -> None:
    _train(tmp_path, ["pairing.warmup_epochs=2"])
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/lambda_scale")]
    assert [float(r["train/lambda_scale"]) for r in rows] == [0.5, 1.0]


@pytest.mark.parametrize("experiment", [None, "digits/AEB", "cifar10/AEB", "cifar100/NET"])
def test_the_default_pairing_is_kl_at_lambda_1_and_the_papers_form_is_one_switch(
    experiment: str | None, tmp_path: Path
) -> None:
    base = [f"experiment={experiment}"] if experiment else []
    cfg = compose_config("train", base, tmp_path)
    assert (list(cfg.pairing.layers), cfg.pairing.distance, list(cfg.pairing.lambdas)) == (["logits"], "kl", [1.0])
    paper = compose_config("train", [*base, "pairing=logits_paper"], tmp_path)
    assert (paper.pairing.distance, list(paper.pairing.lambdas)) == ("relative_l2", [10.0])
    # The distance alone switches too, keeping the lambda.
    assert compose_config("train", [*base, "pairing.distance=relative_l2"], tmp_path).pairing.distance == "relative_l2"
