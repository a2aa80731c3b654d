"""Resumable and distributed esq-eval: a SIGKILLed evaluation resumed equals an uninterrupted one, another config
refuses to resume, and 2 gloo processes over an odd number of inputs give the 1-process results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esq_lightning.commands.evaluate import evaluate
from esq_lightning.commands.train import train
from esq_lightning.config.threat import ThreatModel
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation import evaluate_robustness
from esq_lightning.evaluation.distributed import Shard
from esq_lightning.evaluation.sequence import EvalSettings
from esq_lightning.evaluation.store import STATE_DIR, EvalStore, batch_bounds, batch_seed, run_in_batches
from tests.hydra_utils import FAST, compose_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = [
    *FAST,
    "method=natural",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "callbacks.pgd.val_every_n_epochs=0",
    "callbacks.quant_ratio.start=1.0",
    "eval.attacks=[fgsm]",
    "eval.n_samples=16",
]
# 45 inputs (odd) in batches of 10: 5 batches, the last one of 5. eps below the digits default keeps some
# inputs robust, so the masks are not all zeros.
EVAL = [
    "threads=1",
    "progress=false",
    "eval.n_samples=45",
    "eval.batch_size=10",
    "eval.eps=0.05",
    "eval.attacks=[fgsm,pgd20]",
    "++eval.params.pgd20.steps=5",
    "++eval.params.pgd20.step_size=0.0125",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    results, _ = train(compose_config("train", TINY, root / "run"))
    return Path(results["checkpoint"])


def esq_eval(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "esq_lightning.cli.evaluate", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def comparable(results: dict) -> dict:
    """results.json without what differs between runs of the same evaluation (time, directory, process count)."""
    attacks = {name: {k: v for k, v in rec.items() if k != "runtime_s"} for name, rec in results["attacks"].items()}
    drop = {"run_dir", "attacks", "processes"}
    out = {**{k: v for k, v in results.items() if k not in drop}, "attacks": attacks}
    if "audit" in results:  # the checks' probe attacks record their time too
        probes = {
            n: {k: v for k, v in rec.items() if k != "runtime_s"}
            for n, rec in (results["audit"].get("probes") or {}).items()
        }
        out["audit"] = {**results["audit"], "probes": probes}
    return out


def masks(run_dir: Path) -> dict[str, str]:
    """The per-sample masks of every attack (and clean), concatenated over batches in input order."""
    out = {}
    for folder in sorted((run_dir / STATE_DIR).iterdir()):
        if folder.is_dir():
            recs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
            size = recs[0]["stop"] - recs[0]["start"]
            assert [(r["start"], r["stop"]) for r in recs] == batch_bounds(recs[-1]["stop"], size)
            out[folder.name] = "".join(r["correct"] for r in recs)
    return out


def test_sigkill_mid_evaluation_then_resume_equals_uninterrupted(ckpt: Path, tmp_path: Path) -> None:
    slow = [*EVAL, "eval.n_samples=80", "eval.batch_size=4", "++eval.params.pgd20.steps=40"]
    ref = evaluate(compose_config("eval", [*slow, f"ckpt_path={ckpt}"], tmp_path / "ref"))

    run = tmp_path / "run"
    args = [*slow, f"ckpt_path={ckpt}", f"hydra.run.dir={run}"]
    proc = esq_eval(args, tmp_path)
    pgd = run / STATE_DIR / "pgd20"
    deadline = time.monotonic() + 240
    # Kill once a few pgd20 batches (of 20) are on disk: mid-attack, after clean and fgsm are complete.
    while time.monotonic() < deadline and proc.poll() is None:
        if pgd.is_dir() and len(list(pgd.glob("*.json"))) >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the evaluation ended before it could be killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = len(list(pgd.glob("*.json")))
    assert 3 <= done < 20 and not (run / "results.json").exists()

    resumed = esq_eval(args, tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming the evaluation in" in out
    got = json.loads((run / "results.json").read_text())
    assert comparable(got) == comparable(json.loads((tmp_path / "ref" / "results.json").read_text()))
    assert (got["clean_acc"], got["robust_acc"]) == (ref["clean_acc"], ref["robust_acc"])
    assert masks(run) == masks(tmp_path / "ref")
    assert 0 < got["robust_acc"]["pgd20"] < got["clean_acc"]  # the masks carry information


def test_another_config_refuses_to_resume_in_one_line(ckpt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = evaluate(compose_config("eval", [*EVAL, f"ckpt_path={ckpt}"], run))
    again = evaluate(compose_config("eval", [*EVAL, f"ckpt_path={ckpt}"], run))  # every batch read back
    assert (again["clean_acc"], again["robust_acc"]) == (first["clean_acc"], first["robust_acc"])
    other_ckpt = tmp_path / "other.ckpt"
    other_ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # same weights, another file
    for change, what in [
        ("eval.eps=0.1", "eval.eps=0.05 there, 0.1 here"),
        ("eval.attacks=[fgsm]", "eval.attacks="),
        ("eval.n_samples=44", "other test inputs"),
        ("++eval.params.pgd20.steps=6", "eval.params="),
        (f"ckpt_path={other_ckpt}", "another checkpoint"),
    ]:
        overrides = [*EVAL, f"ckpt_path={ckpt}", change]
        with pytest.raises(ESQUserError, match="holds a partial evaluation of another config") as info:
            evaluate(compose_config("eval", overrides, run))
        assert what in str(info.value) and "\n" not in str(info.value) and "resume=false" in str(info.value)
    # resume=false discards the old state and starts over; resume=true needs something to continue.
    fresh = evaluate(compose_config("eval", [*EVAL, f"ckpt_path={ckpt}", "eval.eps=0.1", "resume=false"], run))
    assert fresh["threat_model"]["eps"] == 0.1
    with pytest.raises(ESQUserError, match="resume=true: no partial evaluation"):
        evaluate(compose_config("eval", [*EVAL, f"ckpt_path={ckpt}", "resume=true"], tmp_path / "empty"))


def test_two_gloo_processes_on_an_odd_number_of_inputs_equal_one(ckpt: Path, tmp_path: Path) -> None:
    one = evaluate(compose_config("eval", [*EVAL, f"ckpt_path={ckpt}"], tmp_path / "one"))
    proc = esq_eval([*EVAL, f"ckpt_path={ckpt}", "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and two["n_samples"] == one["n_samples"] == 45
    assert comparable(two) == comparable(json.loads((tmp_path / "one" / "results.json").read_text()))
    # Each input once: the batch files of both ranks cover [0, 45) exactly, in order, no padding.
    assert masks(tmp_path / "two") == masks(tmp_path / "one")
    assert all(len(m) == 45 for m in masks(tmp_path / "two").values())
    assert 0 < two["robust_acc"]["pgd20"] < two["clean_acc"]
    # The batches of both ranks resume in one process: every one is read back, none recomputed.
    again = evaluate(compose_config("eval", [*EVAL, f"ckpt_path={ckpt}"], tmp_path / "two"))
    assert (again["clean_acc"], again["robust_acc"]) == (one["clean_acc"], one["robust_acc"])
    assert all(rec["runtime_s"] == two["attacks"][name]["runtime_s"] for name, rec in again["attacks"].items())


@pytest.mark.parametrize("n_batches", [0, 1, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_take_every_batch_exactly_once(n_batches: int, world: int) -> None:
    taken = [i for rank in range(world) for i in Shard(rank, world).batches(n_batches)]
    assert taken == list(range(n_batches))
    sizes = [len(Shard(rank, world).batches(n_batches)) for rank in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_batch_seeds_depend_on_seed_attack_and_batch_only() -> None:
    seeds = {batch_seed(s, k, i) for s in (0, 1) for k in ("clean", "fgsm", "pgd20") for i in range(50)}
    assert len(seeds) == 300 and batch_seed(0, "pgd20", 7) == batch_seed(0, "pgd20", 7)


def test_run_in_batches_seeds_each_batch_and_reads_finished_batches_back(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def noisy(start: int, stop: int):  # draws from the global RNG, as a library attack might
        calls.append((start, stop))
        return torch.rand(stop - start) > 0.5, {"runtime_s": 0.1, "draw": float(torch.rand(()))}

    whole, recs = run_in_batches("noisy", 23, 5, noisy, seed=3)
    store = EvalStore.open(tmp_path, {"id": 1})
    # The first two batches only (an interrupted run), then the rest after a "resume".
    part = run_in_batches("noisy", 10, 5, noisy, store=store, seed=3)
    calls.clear()
    resumed, recs2 = run_in_batches("noisy", 23, 5, noisy, store=EvalStore.open(tmp_path, {"id": 1}), seed=3)
    assert calls == [(10, 15), (15, 20), (20, 23)]  # the finished batches were read, not recomputed
    assert torch.equal(resumed, whole) and recs2 == recs and torch.equal(part[0], whole[:10])


def test_evaluate_robustness_with_store_equals_without_and_keeps_per_sample_masks(ckpt: Path, tmp_path: Path) -> None:
    from esq_lightning.artifacts.loading import load_trained_model

    model = load_trained_model(ckpt).model
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(13, 1, 8, 8, generator=g), torch.randint(0, 10, (13,), generator=g)
    threat = ThreatModel("linf", 0.05)
    settings = EvalSettings(["fgsm", "pgd20"], params={"pgd20": {"steps": 3}}, batch_size=4, progress=False)
    plain = evaluate_robustness(model, x, y, threat, settings)
    kept = evaluate_robustness(model, x, y, threat, settings, store=EvalStore.open(tmp_path, {"id": 0}))
    again = evaluate_robustness(model, x, y, threat, settings, store=EvalStore.open(tmp_path, {"id": 0}))
    for ev in (kept, again):
        assert (ev["clean_acc"], ev["robust_acc"]) == (plain["clean_acc"], plain["robust_acc"])
        assert all(torch.equal(ev["correct"][k], plain["correct"][k]) for k in ("fgsm", "pgd20"))
    assert plain["correct"]["pgd20"].shape == (13,) and torch.equal(plain["clean_correct"], plain["clean_correct"])
    assert plain["robust_acc"]["pgd20"] == plain["correct"]["pgd20"].float().mean().item()
