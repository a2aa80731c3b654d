"""Every experiment preset composes and runs a fast_dev_run, pre-training stages first (init_from=setting:NF|AF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esq_lightning.commands.train import train
from tests.hydra_utils import FAST, compose_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"


def presets(dataset: str) -> list[str]:
    names = sorted(p.stem for p in (EXPERIMENTS / dataset).glob("*.yaml") if not p.stem.startswith("base_"))
    # Stage 1 (full-precision starts) before the settings that start from them.
    return sorted(names, key=lambda n: (n not in ("NF", "AF"), n))


@pytest.mark.parametrize("dataset", ["digits", "cifar10", "cifar100"])
def test_every_preset_runs_fast_dev_run(dataset: str, tmp_path: Path) -> None:
    names = presets(dataset)
    assert {"NF", "AF", "NVB", "NEB", "AVB", "AEB", "AET", "NAB", "NAT", "AAB", "AAT"} <= set(names)
    common = [
        *FAST,
        "trainer.fast_dev_run=1",
        "callbacks.pgd.steps=1",
        "eval.n_samples=4",
        "eval.attacks=[fgsm]",
        "logger=none",
        f"paths.runs_root={tmp_path / 'runs'}",
    ]
    if dataset != "digits":
        from tests.fakes import make_fake_cifar

        make_fake_cifar(tmp_path / "data", name=dataset, n_train=8, n_test=8)
        # The paper's networks run one real step in test_train.py; here a small model keeps 14 presets fast.
        common += ["model=resnet20", "trainer=cpu", f"data.data_dir={tmp_path / 'data'}", "data.batch_size=2"]
    for name in names:
        run_dir = tmp_path / "runs" / name
        results, _ = train(compose_config("train", [f"experiment={dataset}/{name}", *common], run_dir))
        saved = json.loads((run_dir / "results.json").read_text())
        # The label is derived from the run and equals the preset's name: the presets are what they say.
        # (the compression front's experiment defaults to uniform 1-bit ESQ from AF: AEB)
        expected = {"default": "EB", "bits": "AEB", "compress": "AEB"}.get(name, name)
        assert saved["setting"] == results["setting"] == expected
        assert results["dataset"] == dataset
        # Every preset's checkpoint (its optimizer and scheduler states included) loads without trust_checkpoint;
        # the later stages' init_from=setting:NF|AF read theirs the same way.
        assert torch.serialization.get_unsafe_globals_in_checkpoint(results["checkpoint"]) == [], name
        if name not in ("NF", "AF", "default"):
            start = "NF" if name.startswith("N") else "AF"
            assert results["init_from"] == f"setting:{start}"


CONF = EXPERIMENTS.parent


def test_presets_are_compositions_of_one_scale_stage_and_one_setting() -> None:
    """A setting is one file (conf/settings/), a dataset scale another (conf/scales/<scale>/{pretrain,quantize});
    an experiment file only pairs them, so a new setting or scale is one file, not a column of near copies."""
    from omegaconf import OmegaConf

    settings = {p.stem for p in (CONF / "settings").glob("*.yaml")}
    assert {"NF", "AF", "NVB", "NEB", "AVB", "AEB", "AET", "NVT", "NET", "AVT", "NAB", "NAT", "AAB", "AAT"} <= settings
    for scale in ("digits", "cifar10", "cifar100"):
        assert {p.stem for p in (CONF / "scales" / scale).glob("*.yaml")} == {"pretrain", "quantize"}
        for name in settings:
            exp = OmegaConf.load(EXPERIMENTS / scale / f"{name}.yaml")
            stage = "pretrain" if name.endswith("F") else "quantize"
            assert list(exp.keys()) == ["defaults"], (scale, name)
            assert list(exp.defaults) == [f"/scales/{scale}/{stage}", f"/settings/{name}"], (scale, name)
    for name in settings:
        setting = OmegaConf.load(CONF / "settings" / f"{name}.yaml")
        assert set(setting.keys()) <= {"defaults", "init_from"}, name
        assert ("init_from" in setting) == (not name.endswith("F")), name
