"""esq-eval on the packed file esq-export writes: the model as shipped gives the checkpoint's numbers in every mode;
the file's metadata names its source checkpoint and sizes."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from esq_lightning.artifacts.export import export_checkpoint
from esq_lightning.artifacts.loading import is_packed_file, load_exported
from esq_lightning.errors import ESQUserError
from esq_lightning.quant import quant_layers
from tests.test_evaluation import EPS, ckpts, run_eval  # noqa: F401  (ckpts: the session fixture)


@pytest.fixture(scope="module")
def packed(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "model.esq"
    report = export_checkpoint(ckpts["bwn"], out)
    return out, report


def test_export_records_source_and_sizes(ckpts, packed):
    path, report = packed
    model, meta = load_exported(path)
    assert not quant_layers(model) and is_packed_file(path) and not is_packed_file(ckpts["bwn"])
    source = meta["source"]
    assert source["sha256"] == hashlib.sha256(ckpts["bwn"].read_bytes()).hexdigest()
    assert source["bytes"] == ckpts["bwn"].stat().st_size and meta["source_checkpoint"] == str(ckpts["bwn"])
    for key in ("float32_model_bytes", "packed_quantized_bytes", "quantized_layers", "ratio"):
        assert meta["sizes"][key] == report[key], key
    assert meta["config"]["setting"] == "VB" and meta["config"]["data"]["name"] == "digits"
    assert report["identical_logits"] and report["file_bytes"] == path.stat().st_size


def test_whitebox_on_the_packed_file_equals_the_checkpoint(ckpts, packed, tmp_path):
    common = [
        "eval.attacks=[fgsm,pgd20]",
        "eval.n_samples=48",
        f"eval.eps={EPS}",
        f"eval.params.pgd20.step_size={EPS / 4}",
        "eval.batch_size=20",
    ]
    from_ckpt = run_eval(tmp_path / "ckpt", [f"ckpt_path={ckpts['bwn']}", *common])
    from_file = run_eval(tmp_path / "file", [f"ckpt_path={packed[0]}", *common])
    assert from_file["clean_acc"] == from_ckpt["clean_acc"]
    assert from_file["robust_acc"] == from_ckpt["robust_acc"]
    assert from_file["setting"] == "VB" and from_file["quant"] == "bwn" and from_file["checkpoint"] == str(packed[0])


def test_multi_model_modes_on_the_packed_file_equal_the_checkpoint(ckpts, packed, tmp_path):
    amp = ["mode=amplification", "eval.n_samples=12", "eval.batch_size=12", "eval.amplification.steps=2"]
    a = run_eval(tmp_path / "amp", [*amp, f"ckpts=[{ckpts['full']},{packed[0]}]"])
    b = run_eval(tmp_path / "amp2", [*amp, f"ckpts=[{ckpts['full']},{ckpts['bwn']}]"])
    assert [c["d"] for c in a["curves"]] == [c["d"] for c in b["curves"]]
    assert [c["adv_acc"] for c in a["curves"]] == [c["adv_acc"] for c in b["curves"]]
    tr = ["mode=transfer", "eval.n_samples=24", f"eval.eps={EPS}", "eval.transfer.attack=fgsm"]
    a = run_eval(tmp_path / "tr", [*tr, f"ckpts=[{ckpts['full']},{packed[0]}]"])
    b = run_eval(tmp_path / "tr2", [*tr, f"ckpts=[{ckpts['full']},{ckpts['bwn']}]"])
    assert a["matrix"] == b["matrix"] and a["labels"] == b["labels"]
    bb = [
        "mode=blackbox",
        "eval.blackbox.attacks=[nattack]",
        "eval.blackbox.budgets=[0,2]",
        "eval.blackbox.n_samples=4",
        "++eval.blackbox.params.nattack.max_iter=5",
        "++eval.blackbox.params.nattack.population=10",
    ]
    a = run_eval(tmp_path / "bb", [*bb, f"ckpts=[{packed[0]}]"])
    b = run_eval(tmp_path / "bb2", [*bb, f"ckpts=[{ckpts['bwn']}]"])
    assert [c["accuracy"] for c in a["curves"]] == [c["accuracy"] for c in b["curves"]]


def test_a_packed_file_without_config_is_one_line(ckpts, tmp_path):
    from esq_lightning.artifacts.loading import load_trained_model
    from esq_lightning.quant import export_packed

    model, config, _, _ = load_trained_model(ckpts["bwn"])
    old = tmp_path / "old.esq"
    export_packed(model, old, {"model": config["model"], "quant": config["quant"], "source_checkpoint": "x.ckpt"})
    with pytest.raises(ESQUserError, match=r"carries no training config .* esq-export ckpt_path=x.ckpt"):
        load_trained_model(old)


def test_esq_eval_cli_on_an_exported_file(packed, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "esq_lightning.cli.evaluate",
            f"ckpt_path={packed[0]}",
            "threads=1",
            "progress=false",
            "eval.attacks=[fgsm]",
            "eval.n_samples=16",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "results.json").is_file() and "fgsm acc" in proc.stdout
