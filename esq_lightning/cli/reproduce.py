"""esq-reproduce: the paper's pipeline in stages (pre-train, quantize, evaluate, report) as esq-train/esq-eval/esq-report calls."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from esq_lightning.artifacts.runs import find_runs
from esq_lightning.cli._common import CONFIG_PATH, run_hydra_command, user_errors_as_one_line
from esq_lightning.config.commands import SCALES, check_command_line, hydra_value, quote_pass_through, validate_options
from esq_lightning.errors import ESQUserError

PRETRAIN = ["NF", "AF"]
QUANTIZE = ["NVB", "NEB", "AVB", "AEB", "NVT", "NET", "AVT", "AET"]
# The models of the transfer matrix (Tables 2b/3b) and of the amplification figure (Figures 1/2).
TRANSFER = ["NF", "NVB", "NEB", "AF", "AVB", "AEB", "AET"]
AMPLIFICATION = ["NF", "NVB", "NEB", "AF", "AVB", "AEB"]
# Table 4's settings that the quantize stage does not train (adversarial training in vanilla quantization).
TABLE4_ADVERSARIAL = ["NAB", "NAT", "AAB", "AAT"]
# Seconds of one digits run with 1 thread on a quiet core (measured: docs/sweeps.md); V = natural, E/A = with PGD.
DIGITS_SECONDS = {"NF": 20, "AF": 90, "V": 25, "E": 120, "A": 100}
DIGITS_EVAL_SECONDS = 90

MODULES = {
    "esq-train": "esq_lightning.cli.train",
    "esq-eval": "esq_lightning.cli.evaluate",
    "esq-report": "esq_lightning.cli.report",
}


@dataclass
class Step:
    """One command of the pipeline; `build` makes its argv when it runs (eval needs the trained checkpoints)."""

    stage: str
    tool: str
    build: Callable[[bool], list[str]]
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)


def resolve_options(cfg: Any) -> tuple[dict[str, Any], list[str], list[str]]:
    """The pipeline's options from a composed conf/reproduce.yaml (checked by ReproduceOptions), with the scale's
    defaults in place of null; and the overrides passed on to every esq-train and every esq-eval call."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    checked = validate_options("esq-reproduce", values)
    opts = checked.model_dump()
    scale = checked.scale
    if opts["seeds"] is None:
        opts["seeds"] = [0, 1, 2] if scale == "digits" else [0]
    if opts["n_jobs"] is None:
        opts["n_jobs"] = 2 if scale == "digits" else 1
    opts["datasets"] = opts["datasets"] or [d for d, _ in SCALES[scale]]
    stages = list(opts["stages"])
    if opts["ablations"] and "ablations" not in stages:
        stages.insert(stages.index("eval") if "eval" in stages else len(stages), "ablations")
    opts["stages"] = stages
    opts["runs_root"] = str(opts["runs_root"] or f"outputs/reproduce-{scale}")
    if opts["threads"] is None and scale == "digits":
        opts["threads"] = 1
    launcher = opts["launcher"] or ("local" if opts["n_jobs"] > 1 else None)
    opts["launcher"] = None if launcher == "basic" else launcher
    return opts, list(opts.pop("train")), list(opts.pop("evaluate"))


def compose_options(overrides: Sequence[str] = ()) -> tuple[dict[str, Any], list[str], list[str]]:
    """resolve_options of conf/reproduce.yaml with these command-line overrides (as esq-reproduce takes them)."""
    check_command_line("esq-reproduce", overrides)
    with initialize_config_module("esq_lightning.conf", version_base="1.3"):
        cfg = compose("reproduce", overrides=quote_pass_through(overrides, PASS_THROUGH))
    return resolve_options(cfg)


def _launcher_args(opts: dict[str, Any]) -> list[str]:
    if opts["launcher"] == "local":
        return ["hydra/launcher=local", f"hydra.launcher.n_jobs={opts['n_jobs']}"]
    if opts["launcher"] == "slurm":
        return ["hydra/launcher=slurm"]
    return []


def find_checkpoint(runs_root: str | Path, setting: str, dataset: str, model: str, seed: int) -> str | None:
    """The final checkpoint of the newest finished training run of a setting (the rule of init_from=setting:X)."""
    found = find_runs(runs_root, setting, seed=seed, dataset=dataset, model=model)
    return found[0]["checkpoint"] if found else None


def plan(opts: dict[str, Any], train_extra: Sequence[str], eval_extra: Sequence[str]) -> list[Step]:
    """The pipeline's commands in order."""
    root = opts["runs_root"]
    seeds = ",".join(str(s) for s in opts["seeds"])
    threads = [f"threads={opts['threads']}"] if opts["threads"] is not None else []
    common = [f"seed={seeds}", f"paths.runs_root={root}", *threads, "progress=false", *_launcher_args(opts)]
    steps: list[Step] = []
    models = dict(SCALES[opts["scale"]])

    def train_step(stage: str, sweep: str, dataset: str, note: str, narrow: Sequence[str] = ()) -> Step:
        argv = ["-m", f"sweep={sweep}", *narrow, *common, f"hydra.sweep.dir={root}/multirun/{sweep}", *train_extra]
        return Step(stage, "esq-train", lambda dry, a=argv: list(a), note)

    for dataset in opts["datasets"]:
        if "pretrain" in opts["stages"]:
            steps.append(train_step("pretrain", f"pretrain_{dataset}", dataset, f"{dataset}: NF and AF"))
        if "quantize" in opts["stages"]:
            steps.append(
                train_step(
                    "quantize",
                    f"quantize_{dataset}",
                    dataset,
                    f"{dataset}: V/E x B/T from N/A (init_from=setting:NF|AF, same seed)",
                )
            )
        if "ablations" in opts["stages"]:
            table4 = "table4_digits" if dataset == "digits" else ("table4_cifar10" if dataset == "cifar10" else None)
            table5 = "table5_digits" if dataset == "digits" else ("table5_cifar100" if dataset == "cifar100" else None)
            # Only what the quantize stage did not train: a second copy of a run would count as another seed.
            if table4:
                steps.append(
                    train_step(
                        "ablations",
                        table4,
                        dataset,
                        f"{dataset}: Table 4 (NVB, NVT, AVB, AVT come from the quantize stage)",
                        ["experiment=" + ",".join(f"{dataset}/{s}" for s in TABLE4_ADVERSARIAL)],
                    )
                )
            if table5:
                modules = "digits_blocks" if dataset == "digits" else "resnet152_modules_4_12_48"
                steps.append(
                    train_step(
                        "ablations",
                        table5,
                        dataset,
                        f"{dataset}: Table 5 (AEB pairing the logits comes from the quantize stage)",
                        [f"pairing={modules}"],
                    )
                )
        if "eval" in opts["stages"]:
            seed = opts["seeds"][0]
            model = models[dataset]
            evals = [("transfer", TRANSFER), ("amplification", AMPLIFICATION)]
            if opts["blackbox"]:
                evals.append(("blackbox", ["NF", "NVB", "NEB", "AF", "AEB"]))
            for mode, settings in evals:

                def build(
                    dry: bool,
                    mode: str = mode,
                    settings: list[str] = settings,
                    dataset: str = dataset,
                    model: str = model,
                    seed: int = seed,
                ) -> list[str]:
                    ckpts = []
                    for s in settings:
                        ckpt = None if dry else find_checkpoint(root, s, dataset, model, seed)
                        if ckpt is None and not dry:
                            raise ESQUserError(
                                f"esq-reproduce: no finished {s} run of {dataset} seed {seed} under {root}"
                                " (did the training stages fail? see their output above)"
                            )
                        ckpts.append(ckpt or f"<{root}: {s} seed {seed} final.ckpt>")
                    return [
                        f"mode={mode}",
                        "ckpts=[" + ",".join(ckpts) + "]",
                        *threads,
                        "progress=false",
                        f"hydra.run.dir={root}/eval/{dataset}_{mode}",
                        *eval_extra,
                    ]

                steps.append(Step("eval", "esq-eval", build, f"{dataset}: {mode} ({', '.join(settings)}, seed {seed})"))
    if "report" in opts["stages"]:
        steps.append(
            Step(
                "report",
                "esq-report",
                lambda dry: [f"runs={hydra_value(root)}", f"out={hydra_value(root + '/report')}"],
                "the tables (markdown + LaTeX) and figures",
            )
        )
    return steps


def estimate_digits_seconds(opts: dict[str, Any]) -> float:
    """Wall time of the digits pipeline from single-run times, with n_jobs runs at once (1 thread each)."""
    n = len(opts["seeds"])
    total = 0.0
    if "pretrain" in opts["stages"]:
        total += n * (DIGITS_SECONDS["NF"] + DIGITS_SECONDS["AF"])
    if "quantize" in opts["stages"]:
        total += n * sum(DIGITS_SECONDS["V" if s[1] == "V" else "E"] for s in QUANTIZE)
    if "ablations" in opts["stages"]:
        total += n * len(TABLE4_ADVERSARIAL) * DIGITS_SECONDS["A"]
        total += n * DIGITS_SECONDS["E"]
    total /= max(1, min(int(opts["n_jobs"]), 2 * n))
    if "eval" in opts["stages"]:
        total += DIGITS_EVAL_SECONDS
    return total


def check_stages(steps: Sequence[Step], eval_extra: Sequence[str]) -> None:
    """Every training job of every stage, and the evaluation overrides, validated before the first stage runs
    (also with dry_run=true): a bad override fails in one line, not after hours of earlier stages."""
    from esq_lightning.config.jobs import check_jobs

    for step in steps:
        if step.tool == "esq-train":
            check_jobs("train", [a for a in step.build(True) if a not in ("-m", "--multirun")])
    if eval_extra:
        check_jobs("eval", list(eval_extra))


def command_text(step: Step, argv: Sequence[str]) -> str:
    return shlex.join([step.tool, *argv])


def run_pipeline(
    opts: dict[str, Any], train_extra: Sequence[str], eval_extra: Sequence[str], echo: Callable[[str], None] = print
) -> int:
    steps = plan(opts, train_extra, eval_extra)
    dry = bool(opts["dry_run"])
    if opts["scale"] == "digits":
        minutes = estimate_digits_seconds(opts) / 60
        echo(
            f"# esq-reproduce scale=digits: {len(opts['seeds'])} seeds, {opts['n_jobs']} jobs at a time; estimated "
            f"~{minutes:.0f} min on {opts['n_jobs']} quiet CPU cores (single-run times in docs/sweeps.md)"
        )
    else:
        echo(
            f"# esq-reproduce scale=cifar: the paper's settings ({', '.join(opts['datasets'])}); days of GPU time, "
            "see docs/sweeps.md. Datasets are read from data.data_dir (default ./data)."
        )
    env = {**os.environ}
    if str(opts["threads"]) == "1":
        # One torch/OpenMP thread per job: the jobs, not the threads, use the cores.
        env["OMP_NUM_THREADS"] = "1"
    check_stages(steps, eval_extra)
    for i, step in enumerate(steps, start=1):
        argv = step.build(dry)
        echo(f"# [{i}/{len(steps)}] {step.stage}: {step.note}")
        echo(command_text(step, argv))
        if dry:
            continue
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", MODULES[step.tool], *argv], env=env)
        echo(f"# [{i}/{len(steps)}] done in {time.perf_counter() - start:.0f} s (exit code {proc.returncode})")
        if proc.returncode != 0:
            rest = opts["stages"][opts["stages"].index(step.stage) :]
            echo(
                f"esq-reproduce: stage {step.stage} failed (exit code {proc.returncode}); rerun from it with "
                f"stages=[{','.join(rest)}]"
            )
            return proc.returncode
    if not dry and "report" in opts["stages"]:
        echo(f"# report: {opts['runs_root']}/report/report.md")
    return 0


# The list keys whose items are overrides of another command (quoted for Hydra's grammar: esq_lightning/cli/_common.py).
PASS_THROUGH = ("train", "evaluate")


@hydra.main(config_path=CONFIG_PATH, config_name="reproduce", version_base="1.3")
@user_errors_as_one_line
def _reproduce(cfg: DictConfig) -> None:
    code = run_pipeline(*resolve_options(cfg))
    if code:
        raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    run_hydra_command("esq-reproduce", _reproduce, argv, pass_through=PASS_THROUGH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
