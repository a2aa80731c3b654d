"""esq-eval robustbench.write=true: RobustBench's model-info JSON from a white-box evaluation with AutoAttack."""

from __future__ import annotations

import json

import pytest

from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.robustbench import FIELDS, eps_string, model_info
from tests.test_evaluation import ckpts, run_eval  # noqa: F401  (ckpts: the session fixture)

# The keys of RobustBench's model_info/cifar10/Linf/*.json files (e.g. Wang2023Better_WRN-28-10.json).
ROBUSTBENCH_KEYS = {
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "footnote",
}


@pytest.mark.parametrize(
    ("eps", "norm", "text"),
    [(8 / 255, "linf", "8/255"), (4 / 255, "linf", "4/255"), (0.3, "linf", "3/10"), (0.5, "l2", "0.5")],
)
def test_eps_as_robustbench_writes_it(eps, norm, text):
    assert eps_string(eps, norm) == text


def test_model_info_from_a_whitebox_run_with_autoattack(ckpts, tmp_path):
    results = run_eval(
        tmp_path,
        [
            f"ckpt_path={ckpts['bwn']}",
            "eval.attacks=[autoattack]",
            "eval.n_samples=16",
            "++eval.params.autoattack.eps=0.3",
            "robustbench.write=true",
            "robustbench.model_name=Esq2026Binary",
            "robustbench.venue=test",
        ],
    )
    (path,) = (tmp_path / "robustbench" / "digits" / "Linf").glob("*.json")
    assert path.name == "Esq2026Binary.json"
    info = json.loads(path.read_text())
    assert set(info) == ROBUSTBENCH_KEYS == set(FIELDS)
    assert info["clean_acc"] == f"{100 * results['clean_acc']:.2f}"
    assert info["autoattack_acc"] == f"{100 * results['robust_acc']['autoattack']:.2f}"
    assert info["eps"] == "3/10" and info["architecture"] == "SmallCNN" and info["venue"] == "test"
    assert "1-bit weights" in info["footnote"] and "binary" in info["footnote"] and "16 test points" in info["footnote"]
    assert info["number_forward_passes"] == 1 and info["additional_data"] is False and info["reported"] is None


def test_robustbench_without_autoattack_fails_before_evaluating(ckpts, tmp_path):
    with pytest.raises(ESQUserError, match="needs AutoAttack accuracy; add autoattack to eval.attacks"):
        run_eval(tmp_path, [f"ckpt_path={ckpts['bwn']}", "eval.attacks=[fgsm]", "robustbench.write=true"])
    assert not (tmp_path / "results.json").exists()


def test_model_info_of_a_ternary_cifar_record():
    results = {
        "dataset": "cifar10",
        "clean_acc": 0.81234,
        "robust_acc": {"autoattack": 0.4},
        "n_samples": 10000,
        "attacks": {"autoattack": {"eps": 8 / 255, "norm": "linf", "version": "standard"}},
    }
    config = {
        "model": {"name": "wrn28_10"},
        "quant": {"kind": "twn", "bits": 2},
        "method": {"name": "esq"},
        "setting": "AET",
    }
    info = model_info(results, config)
    assert (info["eps"], info["clean_acc"], info["autoattack_acc"]) == ("8/255", "81.23", "40.00")
    assert info["architecture"] == "WideResNet-28-10" and info["dataset"] == "cifar10"
    assert (
        "ternary" in info["footnote"]
        and "2-bit weights" in info["footnote"]
        and "RobustBench uses" not in info["footnote"]
    )
