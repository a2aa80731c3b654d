"""Loading never runs code: a checkpoint whose pickle calls os.system is refused by every entry point (one line,
exit code 2, no side effect) and loads only with trust_checkpoint=true; real checkpoints load without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esq_lightning.artifacts.checkpoint import read_checkpoint, trusting_checkpoints
from esq_lightning.cli._common import user_errors_as_one_line
from esq_lightning.commands.evaluate import evaluate
from esq_lightning.commands.train import train
from esq_lightning.errors import ESQUserError
from esq_lightning.training.checkpoint_io import AtomicCheckpointIO
from tests.hydra_utils import FAST, compose_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = [
    *FAST,
    "method=natural",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "callbacks.pgd.val_every_n_epochs=0",
    "eval.attacks=[fgsm]",
    "eval.n_samples=16",
]
EVAL = ["threads=1", "progress=false", "eval.n_samples=16", "eval.attacks=[fgsm]"]


class Payload:
    """Unpickling this object runs `touch <marker>` (what a tampered checkpoint would do with any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real tiny checkpoint, the same checkpoint with the payload inside, and a runs root that names it."""
    root = tmp_path_factory.mktemp("safe")
    results, _ = train(compose_config("train", [*TINY], root / "run"))
    good = Path(results["checkpoint"])
    ckpt = read_checkpoint(good)
    evil = root / "evil" / "checkpoints" / "final.ckpt"
    evil.parent.mkdir(parents=True)
    torch.save({**ckpt, "extra": Payload(root / "marker")}, evil)
    # setting:EVIL finds it as the newest finished run of that setting.
    record = {**json.loads((root / "run" / "results.json").read_text()), "setting": "EVIL", "checkpoint": str(evil)}
    (root / "evil" / "results.json").write_text(json.dumps(record))
    return {"good": good, "last": good.parent / "last.ckpt", "evil": evil, "marker": root / "marker", "runs": root}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def assert_refused(line: str, evil: Path) -> None:
    assert f"refusing to load {evil}" in line and "posix.system" in line and "trust_checkpoint=true" in line, line


ENTRY_POINTS = {
    "esq-train init_from=": ("train", lambda f: [f"init_from={f['evil']}"]),
    "esq-train init_from=setting:NAME": ("train", lambda f: ["init_from=setting:EVIL", f"paths.runs_root={f['runs']}"]),
    "esq-train ckpt_path=": ("train", lambda f: [f"ckpt_path={f['evil']}"]),
    "esq-eval ckpt_path=": ("eval", lambda f: [f"ckpt_path={f['evil']}"]),
    "esq-eval ckpt_path=setting:NAME": ("eval", lambda f: ["ckpt_path=setting:EVIL", f"paths.runs_root={f['runs']}"]),
    "esq-eval mode=transfer ckpts=": ("eval", lambda f: ["mode=transfer", f"ckpts=[{f['good']},{f['evil']}]"]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_malicious_checkpoint_is_refused_in_one_line_without_running_it(
    entry: str, files, tmp_path: Path, capsys
) -> None:
    kind, overrides = ENTRY_POINTS[entry]
    base = TINY if kind == "train" else EVAL
    cfg = compose_config(kind, [*base, *overrides(files)], tmp_path / "out")
    with pytest.raises(SystemExit) as info:
        user_errors_as_one_line(train if kind == "train" else evaluate)(cfg)  # what the Hydra mains wrap
    assert info.value.code == 2
    assert_refused(one_error_line(capsys), files["evil"])
    assert not files["marker"].exists()
    assert not (tmp_path / "out" / "results.json").exists()


def test_lightning_resume_read_is_safe(files) -> None:
    io = AtomicCheckpointIO()
    with pytest.raises(ESQUserError, match="refusing to load .*posix.system"):
        io.load_checkpoint(files["evil"])
    assert not files["marker"].exists()
    last = io.load_checkpoint(files["last"])
    assert {"state_dict", "optimizer_states", "loops", "callbacks", "esq_config"} <= set(last)


@pytest.mark.parametrize("tool", ["esq_lightning.cli.evaluate", "esq_lightning.cli.export"])
def test_cli_refuses_with_exit_code_2_and_loads_only_with_the_opt_in(tool: str, files, tmp_path: Path) -> None:
    args = (
        [sys.executable, "-m", tool, f"ckpt_path={files['evil']}", "threads=1"]
        if tool.endswith("evaluate")
        else [sys.executable, "-m", tool, f"ckpt_path={files['evil']}", f"out={tmp_path / 'm.esq'}"]
    )
    if tool.endswith("evaluate"):
        args += ["progress=false", "eval.n_samples=16", "eval.attacks=[fgsm]", f"hydra.run.dir={tmp_path / 'e'}"]
    proc = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert_refused(lines[0], files["evil"])
    assert not files["marker"].exists()

    trusted = subprocess.run(
        [*args, "trust_checkpoint=true"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    try:
        assert files["marker"].exists(), trusted.stderr[-2000:]  # the opt-in really unpickles the file
        assert f"warning: trust_checkpoint=true: unpickling {files['evil']}" in trusted.stderr
    finally:
        files["marker"].unlink(missing_ok=True)
    # The payload aside, the file is a real (BWN) checkpoint: the evaluation runs, the export packs it.
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    if tool.endswith("evaluate"):
        assert json.loads((tmp_path / "e" / "results.json").read_text())["n_samples"] == 16
    else:
        assert json.loads(trusted.stdout)["identical_logits"] is True and (tmp_path / "m.esq").is_file()


def test_real_checkpoints_hold_only_allowed_types(files) -> None:
    for path in (files["good"], files["last"], *files["good"].parent.glob("epoch*.ckpt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        ckpt = read_checkpoint(path, trusted=False)
        assert "esq_config" in ckpt and ckpt["state_dict"]


def test_trust_is_scoped_and_a_corrupt_file_is_still_one_line(files, tmp_path: Path) -> None:
    with trusting_checkpoints(True):
        pass
    with pytest.raises(ESQUserError, match="refusing to load"):
        read_checkpoint(files["evil"])  # the opt-in ends with its block
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(files["good"].read_bytes()[:200])
    with pytest.raises(ESQUserError, match=f"cannot read checkpoint {corrupt}"):
        read_checkpoint(corrupt)
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip torch format goes through the same unpickler
    torch.save({"x": Payload(files["marker"])}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ESQUserError, match=f"refusing to load {legacy}.*posix.system"):
        read_checkpoint(legacy)
    assert not files["marker"].exists()


def test_trust_checkpoint_must_be_a_boolean(tmp_path: Path) -> None:
    cfg = compose_config("eval", [*EVAL, "ckpt_path=x.ckpt", "trust_checkpoint=maybe"], tmp_path)
    with pytest.raises(ESQUserError, match="trust_checkpoint"):
        evaluate(cfg)
