"""One progress and verbosity story: the key `progress` (bars, or one line per epoch), quiet set-up lines, the
verdict said once, a bar that fits 80 columns, and a Python API that prints only when asked."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from esq_lightning.cli.export import check_export_config
from esq_lightning.commands.train import train
from esq_lightning.config.schema import validate_train_config
from esq_lightning.errors import ESQUserError
from esq_lightning.notices import quiet_library_notices
from esq_lightning.training.callbacks.progress import progress_enabled
from tests.hydra_utils import compose_config

# tests/test_train.py's TINY run without its progress override (each test sets `progress` itself), two attacks.
TINY = [
    "threads=1",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "eval.n_samples=64",
    "callbacks.pgd.val_n_samples=32",
    "callbacks.pgd.steps=2",
    "eval.attacks=[fgsm,pgd20]",
    "logger=none",
]
BAR = re.compile(r"it/s|%\||█")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def test_progress_false_prints_one_line_per_epoch_the_verdict_once_and_no_flops(tmp_path: Path, capsys) -> None:
    cfg = compose_config("train", [*TINY, "progress=false"], tmp_path)
    assert cfg.trainer.enable_progress_bar is False  # follows `progress`
    results, objects = train(cfg)
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2, out
    assert re.fullmatch(
        r"epoch 1/2  train loss \d+\.\d{4}  val clean \d+\.\d%  val pgd \d+\.\d%  SQ ratio 0\.2  "
        r"\d+\.\d s",
        epochs[0],
    ), epochs[0]
    assert epochs[1].startswith("epoch 2/2  ")
    assert not BAR.search(out), out
    # The end-of-training evaluation is announced (no attack bars follow `progress=false`).
    assert "evaluating the final model: 2 attacks (fgsm, pgd20) on the first 64 test inputs" in out
    # The verdict: the table's row, once; the checks below it do not repeat it.
    assert len(re.findall(r"verdict[ :]+(?:pass|warn|fail)", out, re.I)) == 1, out
    assert re.search(rf"^verdict\s+{results['audit']['verdict']}\b", out, re.M)
    # The model summary: one line with the parameters, no FLOPs row (0 without an example input).
    assert "FLOPs" not in out and "Flops" not in out
    assert re.search(r"^model: SmallCNN, [\d.]+ K parameters \([\d.]+ K trainable\), [\d.]+ MB at float32$", out, re.M)
    assert not objects["trainer"].progress_bar_callback


def test_the_bar_fits_80_columns(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    cfg = compose_config("train", [*TINY, "trainer.max_epochs=1", "eval.attacks=[fgsm]"], tmp_path)
    train(cfg)
    captured = capsys.readouterr()
    segments = [ANSI.sub("", s) for s in re.split(r"[\r\n]", captured.out + captured.err) if BAR.search(s)]
    assert any(s.startswith("Epoch 0: 100%") for s in segments), segments[:5]
    assert max(len(s) for s in segments) <= 80, max(segments, key=len)
    # The compact bar's metrics: short names only.
    assert any("loss=" in s for s in segments) and not any("train/loss" in s or "v_num" in s for s in segments)
    assert not [line for line in captured.out.splitlines() if line.startswith("epoch ")]


def test_one_key_trainer_enable_progress_bar_false_still_switches_it_off(tmp_path: Path) -> None:
    assert progress_enabled(compose_config("train", [], tmp_path)) is True
    off = compose_config("train", ["progress=false"], tmp_path)
    assert progress_enabled(off) is False and off.trainer.enable_progress_bar is False
    # The older spelling, used by existing commands and docs, is an alias that switches every bar off.
    assert progress_enabled(compose_config("train", ["trainer.enable_progress_bar=false"], tmp_path)) is False


@pytest.mark.parametrize("config", ["train", "export"])
def test_progress_must_be_a_bool(config: str, tmp_path: Path) -> None:
    cfg = compose_config(config, ["progress=maybe", *(["ckpt_path=x.ckpt"] if config == "export" else [])], tmp_path)
    with pytest.raises(ESQUserError) as info:
        if config == "train":
            validate_train_config(cfg)
        else:  # what esq-export's main sees: the job's keys, without Hydra's own
            check_export_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert str(info.value).startswith("progress: 'maybe'") and "\n" not in str(info.value)


def test_the_api_prints_nothing_unless_asked(tmp_path: Path, capsys) -> None:
    from esq_lightning import evaluate, export
    from esq_lightning import train as api_train

    results = api_train(overrides=TINY, run_dir=tmp_path / "run")
    captured = capsys.readouterr()
    assert results["clean_acc"] >= 0 and (tmp_path / "run" / "results.json").is_file()
    assert captured.out == "", captured.out[:2000]
    assert not BAR.search(captured.err) and "GPU available" not in captured.err, captured.err[:2000]
    ckpt = results["checkpoint"]
    report = export(ckpt, tmp_path / "model.esq")
    record = evaluate(ckpt, run_dir=tmp_path / "eval", threads=1, eval__attacks=["fgsm"], eval__n_samples=32)
    captured = capsys.readouterr()
    assert report["path"] and record["robust_acc"]["fgsm"] >= 0
    assert captured.out == "" and not BAR.search(captured.err), captured
    # Asked: what esq-eval prints (the table), and no bars with progress=False.
    evaluate(
        ckpt,
        run_dir=tmp_path / "eval2",
        threads=1,
        eval__attacks=["fgsm"],
        eval__n_samples=32,
        verbose=True,
        progress=False,
    )
    captured = capsys.readouterr()
    assert re.search(r"^clean_acc\s+\d\.\d{4}$", captured.out, re.M) and not BAR.search(captured.out + captured.err)


def test_set_up_lines_said_once_and_the_sweepers_only_when_verbose(caplog) -> None:
    import pytorch_lightning as pl

    quiet_library_notices()
    caplog.set_level(logging.INFO)
    for _ in range(2):
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert sum(r.getMessage().startswith("GPU available:") for r in caplog.records) <= 1
    sweeper = logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl")
    caplog.clear()
    sweeper.info("Study name: esq_lambda")
    sweeper.info("Best value: 0.5")
    assert [r.getMessage() for r in caplog.records] == ["Best value: 0.5"]
    caplog.clear()
    sweeper.setLevel(logging.DEBUG)  # hydra.verbose=true (or =hydra_plugins...)
    try:
        sweeper.info("Study name: esq_lambda")
    finally:
        sweeper.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in caplog.records] == ["Study name: esq_lambda"]
