"""Sweeps: presets and launchers compose, a W&B-logged multirun through esq-train, two-stage init_from, esq-reproduce."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esq_lightning.cli.reproduce import compose_options, estimate_digits_seconds, plan
from esq_lightning.training.loggers import restore_wandb_env, snapshot_wandb_env, wandb_tags
from tests.hydra_utils import TINY_RUN as TINY
from tests.hydra_utils import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def esq(module: str, args: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **env}
    return subprocess.run(
        [sys.executable, "-m", f"esq_lightning.cli.{module}", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_choices(value: str) -> list[str]:
    """The options of a sweep value as Hydra's override parser splits them (`a,b` or `[1],[2]`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"key={value}")
    return [str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override() else [str(value)]


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_presets_compose_and_name_existing_configs(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"sweep={name}"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert params and f"sweep:{name}" in cfg.tags
    for key, value in params.items():
        options = sweep_choices(str(value))
        if key in ("experiment", "pairing", "quant", "method"):
            missing = [o for o in options if not (CONF / key / f"{o}.yaml").is_file()]
            assert not missing, f"{name}: {key} options without a config file: {missing}"
    if name == "table4_digits":
        assert sweep_choices(params.experiment) == [
            f"digits/{s}" for s in ["NVB", "NVT", "NAB", "NAT", "AVB", "AVT", "AAB", "AAT"]
        ]
        assert len(sweep_choices(params.seed)) == 3
    if name == "lambda_digits":
        assert sweep_choices(params["pairing.lambdas"]) == ["[0.3]", "[1.0]", "[3.0]", "[10.0]"]
    if name == "distance_digits":
        assert sweep_choices(params["pairing.distance"]) == ["relative_l2", "centred_l2", "log_softmax_l2", "kl"]


def test_table5_cifar100_pairs_resnet152_modules_4_12_48(tmp_path: Path) -> None:
    from esq_lightning.models import BottleneckResNet, residual_module_by_index

    cfg = compose_config("train", ["experiment=cifar100/AEB", "pairing=resnet152_modules_4_12_48"], tmp_path)
    model = BottleneckResNet(
        num_classes=100, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, num_blocks=[3, 8, 36, 3], width=64
    )
    assert list(cfg.pairing.layers) == [residual_module_by_index(model, i) for i in (4, 12, 48)]
    assert len(cfg.pairing.lambdas) == 3
    assert sweep_choices(compose_config("train", ["sweep=table5_cifar100"], tmp_path).hydra.sweeper.params.pairing) == [
        "logits",
        "logits_paper",
        "resnet152_modules_4_12_48",
    ]


def test_launcher_presets_compose(tmp_path: Path) -> None:
    slurm = compose_config("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.tasks_per_node) == ("gpu", 1, 1)
    assert slurm.cpus_per_task >= 1 and slurm.timeout_min >= 60 and slurm.mem_gb >= 1
    local = compose_config("train", ["hydra/launcher=local"], tmp_path).hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2


def test_optuna_preset_composes_and_the_sweeper_imports(tmp_path: Path) -> None:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper  # noqa: F401

    cfg = compose_config("train", ["hparams_search=optuna_lambda"], tmp_path)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert str(sweeper.params["pairing.lambdas.0"]).startswith("tag(log, interval(")
    assert cfg.hydra.mode.name == "MULTIRUN"
    # The key the search sets exists: pairing the logits has one lambda.
    assert len(compose_config("train", ["pairing.lambdas.0=3.5"], tmp_path).pairing.lambdas) == 1


# ------------------------------------------------------------------------------------------------ W&B


def test_wandb_tags_add_setting_quant_method() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "tags": ["paper", "x" * 80],
            "setting": "NEB",
            "quant": {"kind": "bwn"},
            "method": {"name": "esq"},
            "data": {"name": "digits"},
            "model": {"name": "small_cnn"},
        }
    )
    tags = wandb_tags(cfg, ["paper", "mine"])
    assert tags[:3] == ["paper", "x" * 64, "mine"]
    assert {"setting:NEB", "quant:bwn", "method:esq", "data:digits", "model:small_cnn"} <= set(tags)


def test_restore_wandb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    snap = snapshot_wandb_env()
    os.environ["WANDB_MODE"] = "dryrun"  # what WandbLogger(offline=True) leaves behind
    os.environ["WANDB_PROJECT"] = "other"
    restore_wandb_env(snap)
    assert "WANDB_MODE" not in os.environ and os.environ["WANDB_PROJECT"] == "p"


def test_offline_wandb_run_leaves_no_wandb_env_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    from esq_lightning.commands.train import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    before = snapshot_wandb_env()
    cfg = compose_config("train", [*TINY, "logger=wandb", "method=natural", "eval.attacks=[fgsm]"], tmp_path)
    results, _ = train(cfg)
    # A joblib worker runs the next job in this process: it must start from the same W&B environment.
    assert snapshot_wandb_env() == before and wandb.run is None
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].rglob("*.table.json"))
    row = json.loads(next(t for t in tables if "results" in str(t)).read_text())
    assert row["data"][0][row["columns"].index("clean_acc")] == results["clean_acc"]


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _run_record_bytes(offline_run: Path) -> bytes:
    return next(offline_run.glob("*.wandb")).read_bytes()


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param([], id="basic"),
        pytest.param(["hydra/launcher=local"], id="joblib", marks=pytest.mark.slow),
    ],
)
def test_multirun_with_offline_wandb_then_report(launcher: list[str], tmp_path: Path) -> None:
    """The issue's acceptance test: 2 jobs, W&B offline, through the real entry point; then esq-report."""
    sweep_dir = tmp_path / "multirun"
    proc = esq(
        "train",
        [
            "-m",
            "quant=bwn,twn",
            "logger=wandb",
            "tags=[smoke]",
            *TINY,
            *launcher,
            f"paths.runs_root={tmp_path}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = sorted(p.parent for p in sweep_dir.rglob("results.json"))
    assert [p.name for p in run_dirs] == ["0", "1"]
    quants = {json.loads((d / "results.json").read_text())["quant"]: d for d in run_dirs}
    assert set(quants) == {"bwn", "twn"}
    offline = {q: _offline_runs(d) for q, d in quants.items()}
    assert all(len(v) == 1 for v in offline.values()), offline  # one W&B run per job, in its own run dir
    assert offline["bwn"][0].name != offline["twn"][0].name
    # The setting label is derived from the run: the default experiment swept to TWN is ET, not EB.
    settings = {"bwn": "EB", "twn": "ET"}
    for quant, d in quants.items():
        results = json.loads((d / "results.json").read_text())
        assert results["setting"] == settings[quant] and results["experiment"] == f"digits-small_cnn-{settings[quant]}"
    for quant, (run,) in offline.items():
        record = _run_record_bytes(run)
        # Grouped by experiment, job type train, tags from the config plus the automatic ones.
        for token in (
            f"digits-small_cnn-{settings[quant]}".encode(),
            b"smoke",
            f"quant:{quant}".encode(),
            f"setting:{settings[quant]}".encode(),
            b"method:esq",
        ):
            assert token in record, (quant, token)
        other = b"quant:twn" if quant == "bwn" else b"quant:bwn"
        assert other not in record and f"setting:{settings['twn' if quant == 'bwn' else 'bwn']}".encode() not in record
    proc = esq("report", [f"runs={sweep_dir}"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\| EB \| 1 \|", proc.stdout) and re.search(r"\| ET \| 1 \|", proc.stdout)
    assert (sweep_dir / "report" / "report.md").is_file() and (sweep_dir / "report" / "whitebox_train.tex").is_file()


# ------------------------------------------------------------------------------------------------ two stages


def test_two_stage_sweep_finds_the_same_seeds_start(tmp_path: Path) -> None:
    """Stage 2 (init_from=setting:NF) picks stage 1's NF run of its own seed, not the newest NF."""
    stage1 = esq(
        "train",
        [
            "-m",
            "experiment=digits/NF",
            "seed=1,0",
            *TINY,
            "eval.attacks=[fgsm]",
            f"paths.runs_root={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/stage1",
        ],
        cwd=tmp_path,
    )
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    nf = {
        json.loads(p.read_text())["seed"]: json.loads(p.read_text())["checkpoint"]
        for p in (tmp_path / "stage1").rglob("results.json")
    }
    assert set(nf) == {0, 1}
    stage2 = esq(
        "train",
        [
            "-m",
            "experiment=digits/NVB",
            "seed=1",
            *TINY,
            "eval.attacks=[fgsm]",
            f"paths.runs_root={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/stage2",
        ],
        cwd=tmp_path,
    )
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    (res_path,) = (tmp_path / "stage2").rglob("results.json")
    res = json.loads(res_path.read_text())
    assert res["setting"] == "NVB" and res["init_from"] == "setting:NF"
    config = torch.load(res["checkpoint"], map_location="cpu", weights_only=False)["esq_config"]
    assert config["init_from"] == nf[1] != nf[0]


# ------------------------------------------------------------------------------------------------ esq-reproduce


def test_reproduce_digits_plan_and_estimate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from esq_lightning.cli.reproduce import main

    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "scale=digits",
                "dry_run=true",
                "train=[trainer.max_epochs=1,quant=bwn,twn]",
                "evaluate=[eval.n_samples=32]",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # esq-reproduce itself makes no run directory
    commands = [line for line in out.splitlines() if line.startswith("esq-")]
    assert [c.split()[0] for c in commands] == ["esq-train", "esq-train", "esq-eval", "esq-eval", "esq-report"]
    assert "sweep=pretrain_digits" in commands[0] and "sweep=quantize_digits" in commands[1]
    assert "seed=0,1,2" in commands[0] and "hydra/launcher=local" in commands[0] and "threads=1" in commands[0]
    # The pass-through overrides reach their command only, as written (a sweep value stays one override).
    for train in commands[:2]:
        assert train.endswith(" trainer.max_epochs=1 quant=bwn,twn") and "eval.n_samples" not in train
    for evaluate in commands[2:4]:
        assert evaluate.endswith(" eval.n_samples=32") and "max_epochs" not in evaluate
    assert "mode=transfer" in commands[2] and "mode=amplification" in commands[3]
    assert commands[4] == "esq-report runs=outputs/reproduce-digits out=outputs/reproduce-digits/report"
    for sweep in re.findall(r"sweep=(\w+)", out):
        assert (CONF / "sweep" / f"{sweep}.yaml").is_file()
    opts, _, _ = compose_options(["scale=digits"])
    assert estimate_digits_seconds(opts) < 30 * 60  # the default digits pipeline fits 30 minutes on 2 cores


def test_reproduce_prints_the_pass_through_override(tmp_path: Path) -> None:
    """The entry point as a user types it: the override inside train=[...] is in every esq-train command."""
    proc = esq("reproduce", ["scale=digits", "dry_run=true", "train=[trainer.max_epochs=1]"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    trains = [line for line in proc.stdout.splitlines() if line.startswith("esq-train ")]
    assert len(trains) == 2 and all(line.endswith(" trainer.max_epochs=1") for line in trains)
    assert list(tmp_path.iterdir()) == []


def test_reproduce_options_defaults_and_lists() -> None:
    opts, train, evaluate = compose_options([])
    assert (opts["scale"], opts["seeds"], opts["n_jobs"], opts["threads"], opts["launcher"]) == (
        "digits",
        [0, 1, 2],
        2,
        1,
        "local",
    )
    assert opts["stages"] == ["pretrain", "quantize", "eval", "report"] and train == evaluate == []
    opts, _, _ = compose_options(
        ["scale=cifar", "seeds=[3]", "datasets=cifar100", "stages=[eval,report]", "ablations=true", "n_jobs=1"]
    )
    assert (opts["seeds"], opts["datasets"], opts["threads"], opts["launcher"]) == ([3], ["cifar100"], None, None)
    assert opts["stages"] == ["ablations", "eval", "report"]


def test_reproduce_cifar_plan_uses_the_paper_presets() -> None:
    opts, train_extra, _ = compose_options(
        ["scale=cifar", "ablations=true", "launcher=slurm", "train=[data.data_dir=/data]"]
    )
    steps = plan(opts, train_extra, [])
    commands = [" ".join([s.tool, *s.build(True)]) for s in steps]
    sweeps = [m for c in commands for m in re.findall(r"sweep=(\w+)", c)]
    assert sweeps == [
        "pretrain_cifar10",
        "quantize_cifar10",
        "table4_cifar10",
        "pretrain_cifar100",
        "quantize_cifar100",
        "table5_cifar100",
    ]
    assert all("hydra/launcher=slurm" in c and "data.data_dir=/data" in c for c in commands if "esq-train" in c)
    assert not any("threads=1" in c for c in commands)
    # The ablations train only what the main stages lack: a repeated run would count as another seed in the report.
    table4 = next(c for c in commands if "sweep=table4_cifar10" in c)
    assert "experiment=cifar10/NAB,cifar10/NAT,cifar10/AAB,cifar10/AAT" in table4
    assert "pairing=resnet152_modules_4_12_48" in next(c for c in commands if "sweep=table5_cifar100" in c)
    for sweep in sweeps:
        assert (CONF / "sweep" / f"{sweep}.yaml").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scale=imagenet"], "error: scale: 'imagenet' is not allowed; allowed: 'digits', 'cifar'"),
        (
            ["scael=cifar"],
            "error: scael: unknown key (did you mean 'scale'?); allowed keys of esq-reproduce: scale, seeds, ",
        ),
        (
            ["eval=[eval.n_samples=32]"],
            "error: eval: unknown key (did you mean 'evaluate'?); allowed keys of esq-reproduce",
        ),
        (["trainer.max_epochs=2"], "error: trainer.max_epochs: unknown key; allowed keys of esq-reproduce"),
        (
            ["seeds=0,1"],
            "error: seeds=0,1: esq-reproduce runs once (a comma would make a sweep); give a list as seeds=[0,1]",
        ),
        (
            ["stages=[pretrain,evl]"],
            "error: stages: ['pretrain', 'evl'] (item 'evl') is not allowed; allowed: 'pretrain', "
            "'quantize', 'ablations', 'eval', 'report' (did you mean 'eval'?)",
        ),
        (["datasets=cifar10"], "error: datasets: cifar10 is not a dataset of scale=digits; allowed: digits"),
        (["n_jobs=0"], "error: n_jobs: 0 is out of range; allowed: 1 <= n_jobs (null: the scale's default)"),
        (["dry_run=maybe"], "error: dry_run: 'maybe' is not true or false; allowed: true or false"),
    ],
)
def test_reproduce_bad_option_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = esq("reproduce", args, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_reproduce_help_names_every_option(tmp_path: Path) -> None:
    from esq_lightning.config.commands import ReproduceOptions

    proc = esq("reproduce", ["--help"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for key in ReproduceOptions.model_fields:
        assert f"\n{key}:" in proc.stdout and f"\n{key} " in proc.stdout  # its default and what it means
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_reproduce_digits_tiny_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "out"
    proc = esq(
        "reproduce",
        [
            "seeds=[0,1]",
            "n_jobs=1",
            f"runs_root={root}",
            "train=[trainer.max_epochs=1,trainer.limit_train_batches=2,eval.n_samples=32,"
            "callbacks.pgd.steps=1,callbacks.pgd.val_n_samples=32]",
            "evaluate=[eval.n_samples=32]",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (root / "report" / "report.md").read_text()
    for setting in ["NF", "AF", "NVB", "NEB", "AVB", "AEB", "NVT", "NET", "AVT", "AET"]:
        assert f"| {setting} | 2 |" in report
    assert "## Transfer matrices" in report and "## Error amplification" in report
    assert (root / "report" / "amplification_1.png").is_file()


@pytest.mark.slow
def test_optuna_search_runs_two_trials(tmp_path: Path) -> None:
    proc = esq(
        "train",
        [
            "hparams_search=optuna_lambda",
            "hydra.sweeper.n_trials=2",
            *TINY,
            f"paths.runs_root={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/optuna",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = (tmp_path / "optuna" / "optimization_results.yaml").read_text()
    assert "pairing.lambdas.0" in best and "best_value" in best
    assert len(list((tmp_path / "optuna").rglob("results.json"))) == 2
