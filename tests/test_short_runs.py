"""A run too short to be read as a robustness result says so in its verdict (evaluation/checks.py)."""

from __future__ import annotations

from esq_lightning.evaluation.checks import Thresholds, probe_flags, sq_schedule_flags, verdict


def _probe(n: int = 300, classes: int = 10) -> dict:
    return {
        "n": n,
        "num_classes": classes,
        "distinct_predictions": classes,
        "zero_margin_gradient_share": 0.0,
        "zero_ce_gradient_share": 0.0,
        "forward_max_abs_diff": 0.0,
    }


def names(flags: list[dict]) -> list[str]:
    return [f["name"] for f in flags]


def test_clean_accuracy_within_three_times_chance_is_named() -> None:
    th = Thresholds()
    assert names(probe_flags(_probe(), 0.147, th)) == ["low_clean_accuracy"]  # a 2-epoch run of the default
    assert verdict(probe_flags(_probe(), 0.147, th)) == "warn"
    assert names(probe_flags(_probe(), 0.31, th)) == []
    assert names(probe_flags(_probe(), 0.11, th)) == ["chance_accuracy"]  # at chance: the fail flag alone
    assert names(probe_flags(_probe(classes=100), 0.25, th)) == []  # 25x chance on 100 classes
    assert names(probe_flags(_probe(n=20), 0.147, th)) == []  # 20 inputs on 10 classes prove nothing
    assert names(probe_flags(_probe(), 0.35, Thresholds(useful_clean_factor=4))) == ["low_clean_accuracy"]


def test_an_sq_schedule_that_ended_below_ratio_one_is_named() -> None:
    (flag,) = sq_schedule_flags(0.4)
    assert flag["name"] == "sq_schedule_short" and flag["severity"] == "warn" and flag["sq_ratio_final"] == 0.4
    assert "0.4" in flag["message"] and "trainer.max_epochs" in flag["message"]
    assert sq_schedule_flags(1.0) == [] and sq_schedule_flags(None) == []
