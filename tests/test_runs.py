"""Finding finished runs: init_from=setting:NAME and esq-eval's ckpt_path=setting:NAME."""

import json
import os
from pathlib import Path

import pytest

from esq_lightning.artifacts.runs import resolve_checkpoint, resolve_init_from
from esq_lightning.errors import ESQUserError


def _run(
    root: Path,
    name: str,
    setting: str,
    seed: int,
    mtime: float,
    dataset: str = "digits",
    task: str = "train",
    config: dict | None = None,
) -> str:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "final.ckpt"
    ckpt.write_bytes(b"x")
    os.utime(ckpt, (mtime, mtime))
    (run / "results.json").write_text(
        json.dumps(
            {
                "setting": setting,
                "seed": seed,
                "dataset": dataset,
                "task": task,
                "model": "small_cnn",
                "checkpoint": str(ckpt),
                **({"train_config": config} if config is not None else {}),
            }
        )
    )
    return str(ckpt)


def test_setting_specs_pick_the_newest_run_of_that_setting_and_seed(tmp_path: Path) -> None:
    old = _run(tmp_path, "a", "NF", 0, 1000)
    new = _run(tmp_path, "b", "NF", 0, 2000)
    seed1 = _run(tmp_path, "c", "NF", 1, 3000)
    _run(tmp_path, "d", "AF", 0, 4000)
    _run(tmp_path, "e", "NF", 0, 5000, task="eval")  # an evaluation record points at a training checkpoint
    assert old != new
    assert resolve_checkpoint("setting:NF", tmp_path, 0) == new
    assert resolve_checkpoint("setting:NF", tmp_path, 1) == seed1
    assert resolve_init_from("setting:NF", tmp_path, "digits", "small_cnn", 1) == seed1
    assert resolve_checkpoint("some/path.ckpt", tmp_path, 0) == "some/path.ckpt"


def test_setting_specs_fail_in_one_line_when_nothing_or_several_datasets_match(tmp_path: Path) -> None:
    with pytest.raises(ESQUserError, match="no finished training run of setting NF with seed 0"):
        resolve_checkpoint("setting:NF", tmp_path, 0)
    _run(tmp_path, "a", "NF", 0, 1000)
    _run(tmp_path, "b", "NF", 0, 2000, dataset="cifar10")
    with pytest.raises(ESQUserError, match="several data/models"):
        resolve_checkpoint("setting:NF", tmp_path, 0)
    with pytest.raises(ESQUserError, match="no finished run of setting AF"):
        resolve_init_from("setting:AF", tmp_path, "digits", "small_cnn", 0)


def test_setting_specs_refuse_to_choose_among_runs_of_different_training_configs(tmp_path: Path) -> None:
    short = _run(tmp_path, "a", "EB", 0, 1000, config={"trainer.max_epochs": 2, "quant.kind": "bwn", "seed": 0})
    full = _run(tmp_path, "b", "EB", 0, 900, config={"trainer.max_epochs": 30, "quant.kind": "bwn", "seed": 0})
    # the newest is the 2-epoch run: taking it silently is what the refusal prevents
    with pytest.raises(
        ESQUserError,
        match=r"2 finished runs .* differ in their training config "
        r"\(trainer.max_epochs: 2 \| 30\); pick one: a run directory",
    ) as err:
        resolve_checkpoint("setting:EB", tmp_path, 0)
    assert "setting:EB/trainer.max_epochs:2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ESQUserError, match="differ in their training config"):
        resolve_init_from("setting:EB", tmp_path, "digits", "small_cnn", 0)
    # a key filter, or the run directory itself, picks one
    assert resolve_checkpoint("setting:EB/trainer.max_epochs:30", tmp_path, 0) == full
    assert resolve_init_from("setting:EB/trainer.max_epochs:2", tmp_path, "digits", "small_cnn", 0) == short
    assert resolve_checkpoint(str(tmp_path / "b"), tmp_path, 0) == full
    assert resolve_init_from(str(tmp_path / "a"), tmp_path, "digits", "small_cnn", 0) == short
    with pytest.raises(ESQUserError, match="none of the 2 finished run"):
        resolve_checkpoint("setting:EB/trainer.max_epochs:7", tmp_path, 0)
    with pytest.raises(ESQUserError, match="is not key:value"):
        resolve_checkpoint("setting:EB/trainer.max_epochs", tmp_path, 0)


def test_runs_of_one_config_are_one_candidate_and_the_newest_is_taken(tmp_path: Path) -> None:
    cfg = {"trainer.max_epochs": 30, "seed": 0}
    _run(tmp_path, "a", "EB", 0, 1000, config=cfg)
    newest = _run(tmp_path, "b", "EB", 0, 2000, config=cfg)
    _run(tmp_path, "c", "EB", 1, 3000, config={**cfg, "seed": 1})  # another seed is not a candidate
    assert resolve_checkpoint("setting:EB", tmp_path, 0) == newest


def test_training_config_keeps_what_is_trained_and_leaves_out_how_it_is_watched() -> None:
    from omegaconf import OmegaConf

    from esq_lightning.artifacts.results import training_config

    cfg = OmegaConf.create(
        {
            "seed": 3,
            "threads": 2,
            "paths": {"runs_root": "x"},
            "eval": {"n_samples": 5},
            "trainer": {"max_epochs": 30, "enable_progress_bar": False},
            "quant": {"kind": "bwn", "bits": 1},
            "callbacks": {"pgd": {"eps": "${quant.bits}"}},
        }
    )
    assert training_config(cfg) == {
        "callbacks.pgd.eps": 1,
        "quant.bits": 1,
        "quant.kind": "bwn",
        "seed": 3,
        "trainer.max_epochs": 30,
    }
