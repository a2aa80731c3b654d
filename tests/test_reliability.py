"""Crash safety: atomic checkpoints, exact resume after SIGKILL, non-finite loss, unreadable data and checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from esq_lightning.artifacts.checkpoint import check_resume_checkpoint, resolve_resume_path
from esq_lightning.cli._common import user_errors_as_one_line
from esq_lightning.commands.train import train
from esq_lightning.errors import ESQUserError
from esq_lightning.training.callbacks.finite_loss import FiniteLossCallback, NonFiniteLossError
from esq_lightning.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from tests.fakes import write_corrupt_cifar
from tests.hydra_utils import FAST, compose_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# 4 epochs of 8 batches (about a second each here), ratio 0.2, 0.4, 0.6, 0.8: every epoch draws SQ masks.
RESUME = [
    *FAST,
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=8",
    "callbacks.pgd.steps=3",
    "callbacks.pgd.val_n_samples=32",
    "callbacks.quant_ratio.every_n_epochs=1",
    "eval.n_samples=64",
    "eval.attacks=[fgsm,pgd20]",
    "++eval.params.pgd20.steps=3",
]


def cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "esq_lightning.cli.train", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


# ---- atomic checkpoint writes ----------------------------------------------------------------------
def test_atomic_save_failure_leaves_the_old_checkpoint_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_save_replaces_in_place_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.ckpt"
    atomic_torch_save({"a": 1}, target)
    atomic_torch_save({"a": 2}, target)
    assert torch.load(target, weights_only=False) == {"a": 2}
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["x.ckpt"]


# ---- resume: path forms and checks -------------------------------------------------------------------
def test_resume_path_forms(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resolve_resume_path("last", run) == last
    assert resolve_resume_path(str(run), None) == last  # a run directory means its last.ckpt
    assert resolve_resume_path(str(last), None) == last
    with pytest.raises(ESQUserError, match=r"ckpt_path=last: no checkpoint at .*hydra.run.dir"):
        resolve_resume_path("last", tmp_path / "other")
    with pytest.raises(ESQUserError, match="ckpt_path: checkpoint not found"):
        resolve_resume_path(str(tmp_path / "nope.ckpt"), run)


def test_resume_checkpoint_must_be_readable_same_model_same_run(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    config = {
        "data": {"name": "digits"},
        "model": {"name": "m"},
        "quant": {"kind": "bwn"},
        "method": {"name": "esq"},
        "seed": 0,
    }
    good = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [],
        "loops": {},
        "epoch": 1,
        "global_step": 8,
        "esq_config": config,
    }
    path = tmp_path / "last.ckpt"
    torch.save(good, path)
    check_resume_checkpoint(path, model, config)

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ESQUserError, match=f"cannot read checkpoint {corrupt}"):
        check_resume_checkpoint(corrupt, model, config)
    with pytest.raises(ESQUserError, match=f"{path} holds weights of another model"):
        check_resume_checkpoint(path, nn.Sequential(nn.Linear(4, 5)), config)
    with pytest.raises(
        ESQUserError, match="another run than this config \\(quant.kind='bwn' there, 'twn' here\\).*init_from"
    ):
        check_resume_checkpoint(path, model, {**config, "quant": {"kind": "twn"}})
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"state_dict": good["state_dict"]}, weights_only)
    with pytest.raises(ESQUserError, match="not a Lightning training checkpoint.*init_from"):
        check_resume_checkpoint(weights_only, model, config)


def test_train_rejects_a_checkpoint_of_another_model_in_one_line(tmp_path: Path) -> None:
    other = tmp_path / "other.ckpt"
    torch.save(
        {
            "state_dict": {"model.fc.weight": torch.zeros(2, 2)},
            "optimizer_states": [],
            "loops": {},
            "epoch": 0,
            "global_step": 0,
        },
        other,
    )
    for key in ("init_from", "ckpt_path"):
        cfg = compose_config("train", [*FAST, f"{key}={other}"], tmp_path / key)
        with pytest.raises(ESQUserError, match=f"{other} .*another model") as info:
            train(cfg)
        assert "\n" not in str(info.value)
        assert not (tmp_path / key / "checkpoints").exists()


# ---- exact resume after kill -9 ------------------------------------------------------------------------
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    cfg = compose_config("train", RESUME, ref)
    expected, _ = train(cfg)

    run = tmp_path / "run"
    proc = cli([*RESUME, f"hydra.run.dir={run}"], cwd=tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    # Each epoch-end save replaces last.ckpt: time the epochs by its mtime, then kill half an epoch
    # after the epoch-1 checkpoint, in the middle of epoch 2.
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + 240
    while len(seen) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
        try:
            st = last.stat()
        except FileNotFoundError:
            continue
        if not seen or st.st_mtime_ns != seen[-1][0]:
            seen.append((st.st_mtime_ns, st.st_mtime))
    assert len(seen) == 2 and proc.poll() is None, f"no second checkpoint before the run ended: {proc.communicate()}"
    epoch_seconds = seen[1][1] - seen[0][1]
    time.sleep(max(0.0, seen[1][1] + epoch_seconds / 2 - time.time()))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists() and not (run / "checkpoints" / "final.ckpt").exists()
    killed_at = torch.load(last, map_location="cpu", weights_only=False)
    assert 1 <= killed_at["epoch"] < 3

    resumed = cli([*RESUME, f"hydra.run.dir={run}", "ckpt_path=last"], cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    got = json.loads((run / "results.json").read_text())
    assert got["epochs"] == expected["epochs"] == 4
    assert (got["clean_acc"], got["robust_acc"]) == (expected["clean_acc"], expected["robust_acc"])
    a, b = state_dict(Path(expected["checkpoint"])), state_dict(run / "checkpoints" / "final.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The interrupted run's metrics are kept: metrics.csv holds every epoch once (CSVLogger alone would start it anew
    # at the resume epoch), and the part moved aside during the resume is merged back.
    assert not list((run / "csv").glob("metrics.before-resume-*"))
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as fh:
        epochs = [float(r["epoch"]) for r in csv.DictReader(fh) if r.get("train/acc")]
    assert sorted(set(epochs)) == [0.0, 1.0, 2.0, 3.0]
    assert len(epochs) == len(set(epochs))


# ---- non-finite loss ---------------------------------------------------------------------------------
class _Toy(pl.LightningModule):
    """A linear regression whose loss turns NaN (or whose gradient does) at a chosen epoch and batch."""

    def __init__(self, bad_epoch: int, bad_batch: int, where: str) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.bad, self.where = (bad_epoch, bad_batch), where

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        if (self.current_epoch, batch_idx) == self.bad:
            if self.where == "loss":
                loss = loss * float("nan")
            else:  # d sqrt(0 * w) / dw = 0 * inf = nan, with a finite loss
                loss = loss + torch.sqrt(self.net.weight.sum() * 0.0)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class _Snapshot(pl.Callback):
    def __init__(self) -> None:
        self.at_epoch_end: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.at_epoch_end[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize(("where", "check_grads"), [("loss", True), ("grad", True), ("loss", False)])
def test_non_finite_stops_before_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, where: str, check_grads: bool
) -> None:
    snap = _Snapshot()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=1, every_n_epochs=1)
    finite = FiniteLossCallback(check_grads=check_grads)
    trainer = pl.Trainer(
        max_epochs=5,
        callbacks=[snap, ckpt, finite],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    model = _Toy(bad_epoch=2, bad_batch=1, where=where)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(model)
    message = str(info.value)
    assert "\n" not in message and "epoch 2, batch 1" in message and str(tmp_path / "last.ckpt") in message
    assert ("train/loss is nan" if where == "loss" else "gradient of net.weight is not finite") in message
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1
    assert all(torch.equal(last["state_dict"][k], v) for k, v in snap.at_epoch_end[1].items())
    # The bad step never reached the weights.
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- one line through the CLI for errors found while running ---------------------------------------
def test_cli_turns_data_errors_into_one_line(tmp_path: Path, capsys) -> None:
    from esq_lightning.data.cifar import load_cifar

    @user_errors_as_one_line
    def missing() -> None:
        load_cifar(tmp_path / "empty", "cifar10")

    with pytest.raises(SystemExit) as info:
        missing()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data: CIFAR-10 not found in") and err.count("\n") == 1

    @user_errors_as_one_line
    def unrelated() -> None:
        open(tmp_path / "not-data.txt")  # noqa: SIM115 - the call must fail; nothing is ever opened

    with pytest.raises(FileNotFoundError):  # not the data layer's: a bug keeps its traceback
        unrelated()


def test_corrupt_cifar_archive_is_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    corrupt = write_corrupt_cifar(tmp_path / "cifar")
    cfg = compose_config(
        "train",
        [
            *FAST,
            "data=cifar10",
            "model=resnet20",
            "model.depth=8",
            f"data.data_dir={corrupt.parent}",
            "trainer.max_epochs=1",
        ],
        tmp_path / "run",
    )
    with pytest.raises(SystemExit) as info:
        user_errors_as_one_line(train)(cfg)  # what esq-train's main wraps around train()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [line for line in err.splitlines() if line.strip()][-1:]
    assert f"corrupt CIFAR archive {corrupt}" in error_lines(err)[0]
    assert not (tmp_path / "run" / "results.json").exists()


def test_nan_loss_through_the_cli_wrapper_is_one_line_exit_2_without_results(tmp_path: Path, capsys) -> None:
    cfg = compose_config(
        "train",
        [*FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=3", "callbacks.pgd.steps=1", "optimizer.lr=1e30"],
        tmp_path,
    )
    with pytest.raises(SystemExit) as info:
        user_errors_as_one_line(train)(cfg)  # what esq-train's main wraps around train()
    assert info.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.search(
        r"train/loss is (nan|inf|-inf) at epoch 0, batch \d+ \(global step \d+\): "
        "training stopped before the optimizer step",
        lines[0],
    ), lines
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints" / "final.ckpt").exists()
