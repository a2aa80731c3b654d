"""Records that cannot be lost or mixed (docs/reliability.md, "Records"): one run per run directory, a resume
continues the same run or refuses, every artifact is verified when read, labels say what the run did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from esq_lightning.artifacts.checkpoint import (
    check_resume_checkpoint,
    merge_resumed_metrics,
    read_checkpoint,
)
from esq_lightning.artifacts.export import export_checkpoint
from esq_lightning.artifacts.loading import build_network, load_packed_for_eval
from esq_lightning.artifacts.rundir import LOCK_NAME
from esq_lightning.commands.train import train
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.checks import SQ_SCHEDULE_SHORT
from tests.hydra_utils import FAST, compose_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# One epoch of two batches, 32 test inputs, FGSM only: a finished run in about ten seconds.
TINY = [
    *FAST,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "eval.n_samples=32",
    "eval.attacks=[fgsm]",
    "callbacks.pgd.steps=1",
    "callbacks.pgd.val_n_samples=16",
]


def run_cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"esq_lightning.cli.{module}", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A finished training run (BWN, error-silenced, one epoch): its directory and results."""
    run = tmp_path_factory.mktemp("records") / "run"
    results, _ = train(compose_config("train", TINY, run))
    return run, results


# ---- a run directory belongs to one run -----------------------------------------------------------------------
def test_a_second_run_into_a_finished_run_directory_is_refused_and_changes_nothing(finished, tmp_path: Path) -> None:
    run, results = finished
    before = snapshot(run)
    proc = run_cli("train", [*TINY, "seed=1", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = error_lines(proc.stderr)
    assert f"{run} holds a finished run" in line
    assert snapshot(run) == before  # results.json, checkpoints and .hydra/ of the finished run: byte-identical
    # Resuming it with nothing left to train says so instead of re-recording.
    with pytest.raises(ESQUserError, match="finished run that trained 1 epoch; trainer.max_epochs=1 leaves nothing"):
        train(compose_config("train", [*TINY, "ckpt_path=last"], run))
    assert snapshot(run) == before


def test_two_processes_racing_for_one_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from esq_lightning.artifacts.rundir import claim_run_dir
            claim_run_dir({str(run)!r}, "train")
            print("claimed", flush=True)
            sys.stdin.read()
        """),
        ],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        proc = run_cli("train", [*TINY, f"hydra.run.dir={run}"], tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        [line] = error_lines(proc.stderr)
        assert f"{run} is in use by another run that is still working" in line
        # The refused run wrote nothing there: not even Hydra's .hydra/.
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
    finally:
        holder.communicate("", timeout=30)
    # Once the holder ended (its lock goes with it), the directory can be claimed.
    from esq_lightning.artifacts.rundir import claim_run_dir, release_run_dir

    assert claim_run_dir(run, "train") is True
    release_run_dir(run)


def test_a_refused_run_leaves_no_directory(tmp_path: Path) -> None:
    run = tmp_path / "new"
    proc = run_cli("train", ["threads=1", "quant.bits=nine", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: quant.bits: 'nine' is not allowed; allowed: 1, 2, 3, 4, 5, 6, 7, 8, 32"]
    assert not run.exists()


def test_esq_eval_never_writes_over_a_training_record(finished, tmp_path: Path) -> None:
    from esq_lightning import api

    run, results = finished
    before = snapshot(run)
    proc = run_cli(
        "evaluate",
        [
            f"ckpt_path={results['checkpoint']}",
            "eval.attacks=[fgsm]",
            "eval.n_samples=16",
            "threads=1",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = error_lines(proc.stderr)
    assert f"{run} holds a training run" in line and f"hydra.run.dir={run / 'eval'}" in line
    # A named sub-directory of the run is the evaluation's own.
    record = api.evaluate(
        results["checkpoint"],
        run_dir=run / "eval",
        eval__attacks=["fgsm"],
        eval__n_samples=16,
        threads=1,
        progress=False,
    )
    assert record["task"] == "eval" and (run / "eval" / "results.json").is_file()
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before


def test_export_never_writes_over_its_source_or_an_existing_file(finished, tmp_path: Path) -> None:
    run, results = finished
    ckpt = Path(results["checkpoint"])
    before = ckpt.read_bytes()
    proc = run_cli("export", [f"ckpt_path={ckpt}", f"out={ckpt}"], tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"error: out: {ckpt} is the checkpoint being exported; esq-export never "
        f"writes over its source (default out: {ckpt.with_suffix('.esq')})"
    ]
    assert ckpt.read_bytes() == before
    out = tmp_path / "model.esq"
    out.write_bytes(b"keep me")
    with pytest.raises(ESQUserError, match="exists; esq-export does not replace a file unless overwrite=true"):
        export_checkpoint(ckpt, out)
    assert out.read_bytes() == b"keep me"
    from esq_lightning import api

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"keep me too")
    with pytest.raises(ESQUserError, match="model.onnx exists; esq-export does not replace a file unless overwrite"):
        api.export(ckpt, onnx, format="onnx")
    assert onnx.read_bytes() == b"keep me too"
    report = export_checkpoint(ckpt, out, overwrite=True)
    assert report["identical_logits"] and out.read_bytes() != b"keep me"
    proc = run_cli("export", [f"ckpt_path={ckpt}", "out=/proc/nope/model.esq"], tmp_path)
    assert proc.returncode == 2 and error_lines(proc.stderr)[0].startswith("error: out: cannot write /proc/nope")
    proc = run_cli("export", [], tmp_path)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        "error: ckpt_path: missing; esq-export needs ckpt_path=path/to/final.ckpt"
    ]


# ---- a resume continues the same run or refuses ----------------------------------------------------------------
def test_resume_with_a_changed_training_key_is_refused_naming_every_key(finished) -> None:
    run, _ = finished
    last = run / "checkpoints" / "last.ckpt"
    stored = torch.load(last, map_location="cpu", weights_only=True)["esq_config"]
    model = build_network(stored["model"], stored["quant"])
    changed = json.loads(json.dumps(stored))
    changed["callbacks"]["pgd"]["eps"] = 0.1
    changed["pairing"]["lambdas"] = [3.0]
    with pytest.raises(ESQUserError) as info:
        check_resume_checkpoint(last, model, changed)
    line = str(info.value)
    assert "callbacks.pgd.eps=0.2 there, 0.1 here" in line and "pairing.lambdas=[" in line and "[3.0] here" in line
    assert "\n" not in line
    # What may change: loggers, threads, evaluation settings, a longer run (and the cosine T_max that follows it).
    allowed = json.loads(json.dumps(stored))
    allowed.update(threads=2, logger=None, tags=["again"])
    allowed["eval"]["attacks"] = ["fgsm", "pgd20"]
    allowed["trainer"]["max_epochs"] = 3
    allowed["scheduler"]["T_max"] = 3
    assert check_resume_checkpoint(last, model, allowed) == stored
    shorter = json.loads(json.dumps(stored))
    shorter["trainer"]["max_epochs"] = 0
    with pytest.raises(ESQUserError, match="trainer.max_epochs=1 there, 0 here"):
        check_resume_checkpoint(last, model, shorter)


def test_resumed_metrics_keep_the_whole_history(tmp_path: Path) -> None:
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "metrics.before-resume-1.csv").write_text("epoch,step,train/loss\n0,7,1.0\n1,15,0.9\n2,20,0.8\n")
    # Resumed from the epoch-1 checkpoint: epoch 2 was cut short and is trained again.
    (csv / "metrics.csv").write_text("epoch,step,train/loss,val/acc\n2,23,0.7,0.5\n3,31,0.6,0.6\n")
    merge_resumed_metrics(tmp_path)
    rows = (csv / "metrics.csv").read_text().splitlines()
    assert rows == ["epoch,step,train/loss,val/acc", "0,7,1.0,", "1,15,0.9,", "2,23,0.7,0.5", "3,31,0.6,0.6"]
    assert not list(csv.glob("metrics.before-resume-*"))


# ---- every artifact is verified when read ----------------------------------------------------------------------
def test_a_packed_file_with_a_flipped_payload_byte_is_refused(finished, tmp_path: Path) -> None:
    _, results = finished
    out = tmp_path / "model.esq"
    export_checkpoint(results["checkpoint"], out)
    model, _ = load_packed_for_eval(out)
    data = bytearray(out.read_bytes())
    data[len(data) - 40] ^= 0x01  # a byte of the last tensor's payload
    out.write_bytes(bytes(data))
    with pytest.raises(ESQUserError, match=f"{out}: checksum mismatch"):
        load_packed_for_eval(out)


def test_files_that_are_not_checkpoints_are_named_as_such(finished, tmp_path: Path) -> None:
    run, results = finished
    with pytest.raises(ESQUserError, match="results.json is a JSON file \\(a results record\\), not a checkpoint"):
        read_checkpoint(run / "results.json")
    packed = tmp_path / "m.esq"
    export_checkpoint(results["checkpoint"], packed)
    with pytest.raises(ESQUserError, match="m.esq is a packed model written by esq-export"):
        read_checkpoint(packed)
    plain = tmp_path / "plain.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(ESQUserError, match="is not a Lightning training checkpoint \\(a plain state dict\\)"):
        check_resume_checkpoint(plain, torch.nn.Linear(2, 2), {})


def test_writes_under_a_file_size_limit_leave_earlier_files_intact(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text('{"clean_acc": 0.5}\n')
    script = textwrap.dedent(f"""
        import resource, sys
        from esq_lightning.atomic import WriteFailed, atomic_write_json
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write_json({str(target)!r}, {{"clean_acc": 0.9, "padding": "x" * 100000}})
        except WriteFailed as exc:
            print(exc.strerror)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip().startswith(f"could not write {target}: ")
    assert proc.stdout.strip().endswith("the previous file is unchanged")
    assert target.read_text() == '{"clean_acc": 0.5}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_esq_report_skips_a_malformed_results_json_naming_file_and_field(finished, tmp_path: Path) -> None:
    _, results = finished
    good, bad = tmp_path / "runs" / "good", tmp_path / "runs" / "bad"
    for d in (good, bad):
        d.mkdir(parents=True)
    (good / "results.json").write_text(json.dumps(results))
    (bad / "results.json").write_text(json.dumps({**results, "clean_acc": "high"}))
    proc = run_cli("report", [f"runs={tmp_path / 'runs'}", "quiet=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        f"esq-report: skipped {bad / 'results.json'}: field clean_acc: a string where a number belongs" in proc.stderr
    )
    assert "1 runs" in proc.stderr + proc.stdout


# ---- labels say what the run did -------------------------------------------------------------------------------
def test_a_short_sq_schedule_is_recorded_and_shown(finished) -> None:
    from esq_lightning.artifacts.results import format_table

    _, results = finished
    assert results["sq_ratio_final"] == pytest.approx(0.2)
    # one named flag, in the verdict (printed once), not a second warning beside it
    assert SQ_SCHEDULE_SHORT in [f["name"] for f in results["audit"]["flags"]] and results["audit"]["verdict"] != "pass"
    assert SQ_SCHEDULE_SHORT not in [w["name"] for w in results["warnings"]]
    assert "sq_ratio_final" in format_table(results) and SQ_SCHEDULE_SHORT in format_table(results)


def test_lambdas_of_zero_at_every_layer_are_refused(tmp_path: Path) -> None:
    from esq_lightning.config.schema import validate_train_config

    cfg = compose_config("train", [*TINY, "pairing.lambdas=[0]"], tmp_path)
    with pytest.raises(ESQUserError, match="pairing.lambdas: .* zero at every layer, so method=esq"):
        validate_train_config(cfg)


def test_no_attack_gives_no_verdict_and_a_lost_attack_no_pass(monkeypatch) -> None:
    from esq_lightning.evaluation import audit
    from esq_lightning.evaluation.checks import WARN, flag, verdict

    assert verdict([], attacked=False) == "none" and verdict([], attacked=True) == "pass"
    import esq_lightning.attacks as attacks

    monkeypatch.setattr(attacks, "library_available", lambda spec: spec.library == "esq_lightning")
    missing = audit.missing_attacks("thorough")
    assert missing and all(lib != "esq_lightning" for lib in missing.values())
    assert flag("attack_set_incomplete", "x")["severity"] == WARN
    # The per-sample survival table gives back the masks, so worst cases over any subset can be recomputed.
    masks = {"fgsm": torch.tensor([True, False, True] * 5), "pgd20": torch.tensor([False, True, True] * 5)}
    table = audit.survival_table(torch.ones(15, dtype=torch.bool), masks)
    assert all(torch.equal(audit.unpack_mask(table["attacks"][k], table["n"]), m) for k, m in masks.items())


def test_the_api_raises_one_line_user_errors_for_composition_errors(tmp_path: Path) -> None:
    from esq_lightning import api

    with pytest.raises(ESQUserError, match="^quant=bwm: unknown option of group quant \\(did you mean 'bwn'\\?\\)"):
        api.train(quant="bwm", run_dir=tmp_path / "a")
    with pytest.raises(ESQUserError, match="^trainer.max_epoch: unknown key \\(did you mean 'max_epochs'\\?\\)"):
        api.train(trainer__max_epoch=1, run_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- every job validated before the first one runs -------------------------------------------------------------
def test_a_multirun_checks_every_job_before_the_first(tmp_path: Path) -> None:
    proc = run_cli(
        "train", ["-m", "threads=1", "seed=0,1", "quant.bits=1,nine", f"hydra.sweep.dir={tmp_path / 'm'}"], tmp_path
    )
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        "error: job 1 of 4 (seed=0 quant.bits=nine): quant.bits: 'nine' is not "
        "allowed; allowed: 1, 2, 3, 4, 5, 6, 7, 8, 32; no job was started"
    ]
    assert not list((tmp_path / "m").rglob("results.json")) and not list((tmp_path / "m").rglob(".hydra"))


def test_reproduce_checks_every_stage_before_the_first(capsys) -> None:
    from esq_lightning.cli.reproduce import main

    with pytest.raises(SystemExit) as info:
        main(["dry_run=true", "stages=[pretrain,quantize]", "seeds=[0]", "train=[quant.bits=nine]"])
    assert info.value.code == 2
    assert "error: job 0 of 2 (experiment=digits/NF): quant.bits: 'nine' is not allowed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("train", ["quant=bwm"], "error: quant=bwm: unknown option of group quant (did you mean 'bwn'?); allowed: "),
        ("train", ["trainer.max_epoch=3"], "error: trainer.max_epoch: unknown key (did you mean 'max_epochs'?)"),
        ("evaluate", ["ckpt_path=x.ckpt", "eval=defualt"], "error: eval=defualt: unknown option of group eval"),
        ("export", ["ckpt_path=x.ckpt", "+fromat=onnx"], None),
    ],
)
def test_cli_composition_errors_are_one_line_exit_2(
    tmp_path: Path, command: str, args: list[str], message: str | None
) -> None:
    """Hydra's own composition errors (unknown group option, misspelt key) on the command line: one line, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", f"esq_lightning.cli.{command}", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if message is None:  # a key added with + composes; the schema refuses it afterwards, in one line too
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
        return
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1
    assert not (tmp_path / "outputs").exists()  # refused before anything was written
