"""Setting labels are derived from what a run does (esq_lightning/config/labels.py), never copied from a preset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra_utils import compose_config

from esq_lightning.artifacts.runs import resolve_init_from
from esq_lightning.artifacts.setting import start_of
from esq_lightning.config.labels import derive_setting, start_from_setting
from esq_lightning.errors import ESQUserError


@pytest.mark.parametrize(
    ("method", "quant", "bits", "start", "label"),
    [
        ("natural", "full", 32, None, "NF"),
        ("adversarial", "full", 32, None, "AF"),
        ("adversarial", "full", 32, "N", "NAF"),  # a fine-tune keeps its start: it is not the AF start itself
        ("esq", "full", 32, "A", "AEF"),
        ("esq", "full", 32, None, "EF"),
        ("natural", "bwn", 1, "N", "NVB"),
        ("esq", "bwn", 1, "N", "NEB"),
        ("adversarial", "bwn", 1, "N", "NAB"),
        ("natural", "twn", 2, "A", "AVT"),
        ("esq", "twn", 2, "A", "AET"),
        ("adversarial", "twn", 2, "A", "AAT"),
        ("esq", "bwn", 1, None, "EB"),
        ("natural", "twn", 2, None, "VT"),
        ("esq", "uniform", 4, "N", "NEU4"),
        ("adversarial", "uniform", 2, "A", "AAU2"),
        ("trades", "bwn", 1, "A", "A-TRADES-B"),
        ("alp", "full", 32, None, "ALP-F"),
    ],
)
def test_labels_follow_the_papers_scheme(method: str, quant: str, bits: int, start: str | None, label: str) -> None:
    assert derive_setting(method, quant, bits, start) == label


def test_start_letters() -> None:
    assert [start_from_setting(s) for s in ("NF", "AF", "ALP-F", "NEB", "AEF")] == ["N", "A", "ALP", "NEB", "AEF"]
    assert start_of(None) is None and start_of("setting:AF") == "A"


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ([], "EB"),
        (["method=natural", "quant=bwn"], "VB"),
        (["method=natural", "quant=twn"], "VT"),
        (["experiment=digits/NEB", "method=natural"], "NVB"),
        (["experiment=digits/AEB", "quant=twn"], "AET"),
        (["experiment=digits/NF"], "NF"),
        (["experiment=digits/NF", "method=adversarial"], "AF"),
    ],
)
def test_composed_configs_carry_the_derived_label(overrides: list[str], label: str, tmp_path: Path) -> None:
    """The sweep `-m quant=bwn,twn method=natural` of the default experiment is VB / VT, not the preset's EB."""
    cfg = compose_config("train", overrides, tmp_path)
    assert cfg.setting == label
    # The run directory (conf/hydra/default.yaml: runs/${experiment_name}/...) and the W&B group follow it.
    assert cfg.experiment_name == f"digits-small_cnn-{label}"


def _fake_run(
    root: Path, name: str, setting: str, seed: int, eps: float | None, mtime: float, config: dict | None = None
) -> str:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "final.ckpt"
    torch.save({"esq_config": config or {}, "state_dict": {}}, ckpt)
    os.utime(ckpt, (mtime, mtime))
    record = {
        "setting": setting,
        "seed": seed,
        "dataset": "digits",
        "task": "train",
        "model": "small_cnn",
        "checkpoint": str(ckpt),
        "train_threat_model": None if eps is None else {"norm": "linf", "eps": eps},
    }
    (run / "results.json").write_text(json.dumps(record))
    return str(ckpt)


def test_init_from_a_checkpoint_takes_the_start_from_that_run(tmp_path: Path) -> None:
    """An error-silenced run started from an NF checkpoint is NEB (it used to be labelled EB)."""
    nf = _fake_run(tmp_path / "runs", "nf", "NF", 0, 0.2, 1000)
    cfg = compose_config("train", ["quant=bwn", "method=esq", f"init_from={nf}"], tmp_path / "out")
    assert cfg.setting == "NEB"
    # Without a results.json beside it, the config inside the checkpoint says how it was trained.
    bare = tmp_path / "bare.ckpt"
    torch.save(
        {"esq_config": {"method": {"name": "adversarial"}, "quant": {"kind": "full", "bits": 32}}, "state_dict": {}},
        bare,
    )
    cfg = compose_config("train", ["quant=twn", "method=natural", f"init_from={bare}"], tmp_path / "out2")
    assert cfg.setting == "AVT"


def test_init_from_setting_matches_threat_model_and_refuses_other_seeds(tmp_path: Path) -> None:
    at_02 = _fake_run(tmp_path, "a", "NF", 0, 0.2, 1000)
    at_01 = _fake_run(tmp_path, "b", "NF", 0, 0.1, 2000)  # newer, but another training eps
    seed1 = _fake_run(tmp_path, "c", "NF", 1, 0.2, 3000)
    no_attack = _fake_run(tmp_path, "d", "NF", 2, None, 4000)
    tm = {"norm": "linf", "eps": 0.2}
    assert resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 0, threat_model=tm) == at_02
    assert (
        resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 0, threat_model={"norm": "linf", "eps": 0.1})
        == at_01
    )
    # A start trained without any attack fits every threat model.
    assert resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 2, threat_model=tm) == no_attack
    with pytest.raises(ESQUserError, match=r"no finished run of setting NF with seed 3 .*found seed 0 .*init_seed="):
        resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 3, threat_model=tm)
    assert resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 3, threat_model=tm, init_seed=1) == seed1
    with pytest.raises(ESQUserError, match="trained at linf eps=0.3"):
        resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 0, threat_model={"norm": "linf", "eps": 0.3})


def test_eval_records_never_count_as_starts(tmp_path: Path) -> None:
    ckpt = _fake_run(tmp_path, "a", "NF", 0, 0.2, 1000)
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text(
        json.dumps(
            {"setting": "NF", "seed": 5, "dataset": "digits", "task": "eval", "model": "small_cnn", "checkpoint": ckpt}
        )
    )
    with pytest.raises(ESQUserError, match="with seed 5"):
        resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 5)


def test_optimized_metric_is_what_esq_train_returns() -> None:
    from esq_lightning.cli.train import metric_value

    results = {"clean_acc": 0.9, "robust_acc": {"fgsm": 0.5, "pgd20": 0.3}}
    assert metric_value(results, "robust_acc.fgsm") == 0.5 and metric_value(results, "clean_acc") == 0.9
    with pytest.raises(ESQUserError, match="robust_acc has fgsm, pgd20"):
        metric_value(results, "robust_acc.pgd100")
