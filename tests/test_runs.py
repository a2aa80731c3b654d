"""Finding finished runs: init_from=setting:NAME and esq-eval's ckpt_path=setting:NAME."""

import json
import os
from pathlib import Path

import pytest

from esq_lightning.errors import ESQUserError
from esq_lightning.artifacts.runs import resolve_checkpoint, resolve_init_from


def _run(root: Path, name: str, setting: str, seed: int, mtime: float, dataset: str = "digits", task: str = "train") -> str:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "final.ckpt"
    ckpt.write_bytes(b"x")
    os.utime(ckpt, (mtime, mtime))
    (run / "results.json").write_text(json.dumps({"setting": setting, "seed": seed, "dataset": dataset, "task": task,
                                                  "model": "small_cnn", "checkpoint": str(ckpt)}))
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
