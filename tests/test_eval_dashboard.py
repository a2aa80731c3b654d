"""esq-eval logger=wandb|tensorboard: the offline W&B run (job type, group, tables, images, summary) read back from
its files, for every mode; TensorBoard's event files."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from esq_lightning.artifacts.loading import load_trained_model
from tests.test_evaluation import EPS, PNG_MAGIC, ckpts, run_eval  # noqa: F401  (ckpts: the session fixture)

_BLOCK = 32768
_HEADER = 7  # ':W&B' + 2-byte magic + 1-byte version


def wandb_records(run_dir: Path) -> list[Any]:
    """Every protobuf Record of an offline run's .wandb file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunks = [], _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            records.append(rec)
            chunks = b""
    return records


def read_offline_run(eval_dir: Path) -> dict[str, Any]:
    (run_dir,) = (eval_dir / "wandb").glob("offline-run-*")
    # wandb's writer can still be flushing the log when finish() returns on a loaded machine: wait for its
    # exit record.
    deadline = time.monotonic() + 60
    records = wandb_records(run_dir)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = wandb_records(run_dir)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    summary: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    media = run_dir / "files" / "media"
    tables = {
        str(p.relative_to(media / "table")).rsplit("_", 2)[0]: json.loads(p.read_text())
        for p in media.rglob("*.table.json")
        if "table" in p.relative_to(media).parts[0]
    }
    images = sorted(p for p in (media / "images").rglob("*.png")) if (media / "images").is_dir() else []
    return {"run": runs[0], "summary": summary, "tables": tables, "images": images}


def test_whitebox_eval_on_wandb_is_an_eval_run_in_the_training_group(ckpts, tmp_path):
    out = tmp_path / "wb"
    results = run_eval(
        out,
        [
            f"ckpt_path={ckpts['bwn']}",
            "eval.attacks=[fgsm]",
            "eval.n_samples=32",
            f"eval.eps={EPS}",
            "logger=wandb",
            "tags=[dashboard]",
        ],
    )
    train_config = load_trained_model(ckpts["bwn"]).config
    run = read_offline_run(out)
    assert run["run"].job_type == "eval"
    assert run["run"].run_group == train_config["experiment_name"]  # the training run's group
    assert run["run"].display_name == f"{train_config['experiment_name']}-seed0-eval-whitebox"
    tags = list(run["run"].tags)
    assert {"dashboard", "eval:whitebox", "setting:VB", "quant:bwn"} <= set(tags)
    assert run["summary"]["eval/clean_acc"] == results["clean_acc"]
    assert run["summary"]["eval/fgsm_acc"] == results["robust_acc"]["fgsm"]
    table = run["tables"]["eval/results"]
    assert table["data"][0][table["columns"].index("clean_acc")] == results["clean_acc"]
    assert table["data"][0][table["columns"].index("fgsm_acc")] == results["robust_acc"]["fgsm"]
    # The bar chart's data (a native W&B plot) and the figure as an image.
    assert any(name.startswith("eval/accuracy_per_attack_plot") for name in run["tables"])
    assert run["images"] and all(p.read_bytes()[:8] == PNG_MAGIC for p in run["images"])
    assert (out / "whitebox.png").is_file()


def test_transfer_and_amplification_on_wandb(ckpts, tmp_path):
    pair = f"ckpts=[{ckpts['full']},{ckpts['bwn']}]"
    record = run_eval(
        tmp_path / "tr",
        ["mode=transfer", pair, "eval.n_samples=24", f"eval.eps={EPS}", "eval.transfer.attack=fgsm", "logger=wandb"],
    )
    run = read_offline_run(tmp_path / "tr")
    assert run["run"].job_type == "eval" and "eval:transfer" in run["run"].tags
    # Two experiments (NF, VB): a shared group of the dataset and mode.
    assert run["run"].run_group == "digits-eval-transfer"
    matrix = run["tables"]["eval/transfer_matrix"]
    assert matrix["columns"] == ["source \\ target", *record["labels"]]
    assert [row[1:] for row in matrix["data"]] == record["matrix"]
    assert run["summary"]["eval/white_box_acc/VB (bwn)"] == record["matrix"][1][1]
    assert len(run["images"]) == 1  # the heatmap

    record = run_eval(
        tmp_path / "amp",
        [
            "mode=amplification",
            pair,
            "eval.n_samples=12",
            "eval.batch_size=12",
            "eval.amplification.steps=2",
            "logger=wandb",
        ],
    )
    run = read_offline_run(tmp_path / "amp")
    assert run["run"].job_type == "eval"
    rows = run["tables"]["eval/amplification"]["data"]
    assert [r[3] for r in rows] == [d for c in record["curves"] for d in c["d"]]
    plot = next(t for name, t in run["tables"].items() if name.startswith("eval/D_l_plot"))
    assert len(plot["data"]) == sum(len(c["d"]) for c in record["curves"])  # line_series: one row per point
    assert run["summary"]["eval/adv_acc/NF (full)"] == record["curves"][0]["adv_acc"]
    assert len(run["images"]) == 1


def test_blackbox_on_wandb_and_tensorboard(ckpts, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = run_eval(
        tmp_path,
        [
            "mode=blackbox",
            f"ckpts=[{ckpts['bwn']}]",
            "eval.blackbox.attacks=[nattack]",
            "eval.blackbox.budgets=[0,2]",
            "eval.blackbox.n_samples=4",
            "++eval.blackbox.params.nattack.max_iter=5",
            "++eval.blackbox.params.nattack.population=10",
            "logger=[wandb,tensorboard]",
        ],
    )
    run = read_offline_run(tmp_path)
    assert run["run"].job_type == "eval" and run["run"].run_group.startswith("digits-small_cnn")
    rows = run["tables"]["eval/blackbox"]["data"]
    assert [r[3] for r in rows] == record["curves"][0]["accuracy"]
    assert any(name.startswith("eval/accuracy_vs_l2_budget_plot") for name in run["tables"])
    assert len(run["images"]) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = acc.Tags()
    legend = record["curves"][0]["legend"]
    series = [e.value for e in acc.Scalars(f"eval/accuracy_vs_l2_budget/{legend}")]
    assert series == pytest.approx(record["curves"][0]["accuracy"])
    assert "eval/figure/blackbox" in tags["images"]


def test_eval_without_logger_writes_no_dashboard(ckpts, tmp_path):
    run_eval(tmp_path, [f"ckpt_path={ckpts['bwn']}", "eval.attacks=[]", "eval.n_samples=16"])
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "whitebox.png").exists()


def test_online_wandb_without_login_fails_before_evaluating(ckpts, tmp_path, monkeypatch):
    import wandb

    from esq_lightning.errors import ESQUserError

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(type(wandb.api), "api_key", property(lambda self: None), raising=False)
    with pytest.raises(ESQUserError, match="logger.wandb.offline=false needs a W&B login"):
        run_eval(tmp_path, [f"ckpt_path={ckpts['bwn']}", "logger=wandb", "logger.wandb.offline=false"])
    assert not (tmp_path / "results.json").exists()
