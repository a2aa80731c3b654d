"""Time to robustness on digits: PGD-10 against the single-step training attacks, audited, side by side.

    python benchmarks/time_to_robustness.py --out /tmp/ttr [--seeds 0 1 2] [--attacks pgd fgsm_rs nfgsm gradalign]

For every seed and training attack (conf/attack/<name>.yaml) it trains AF (`experiment=digits/AF attack=<name>`)
and then AEB from that AF run (`experiment=digits/AEB attack=<name>`, init_from=setting:AF in a runs root of its
own, so a fast AEB starts from a fast AF), audits each final checkpoint (`esq-eval mode=audit eval.budget=quick`,
per-sample worst case over the quick attack set) and reports per setting and attack: training wall-clock (the
fit, results.json train_seconds), audited worst case, clean accuracy, the catastrophic-overfitting flag, and the
time ratio against PGD-10 of the same seed (wall-clock of the fit, and its CPU time, steadier on a shared CPU)
with the worst-case difference beside it. AEB also gets the pipeline
ratio (AF + AEB time). The arithmetic floor of each ratio is printed beside it, from unit costs measured in the
same run on the same model and batch: one input-gradient attack step (a), one training forward/backward (p):

    floor = (k * a + passes * p [+ GradAlign]) / (10 * a + passes * p)

with passes = 1 for AF (adversarial: x_adv only) and 2 for AEB (error-silenced: clean and x_adv). The target
(issue 23): a fast AEB within 2 points of PGD-10's worst case at <= 0.35 of its wall-clock.

Every run is a real esq-train / esq-eval subprocess at `--threads` torch threads; partial results are written
after each run to <out>/time_to_robustness.json, so an interrupted benchmark still reports what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("AF", "AEB")
PASSES = {"AF": 1, "AEB": 2}
STEPS = {"pgd": 10, "fgsm_rs": 1, "nfgsm": 1, "gradalign": 1, "fgsm": 1}
TARGET_POINTS, TARGET_RATIO = 2.0, 0.35


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return time.perf_counter() - start


def newest_results(root: Path, setting: str, seed: int) -> dict[str, Any]:
    found = sorted((root / "runs").glob(f"digits-small_cnn-{setting}/*_seed{seed}/results.json"))
    if not found:
        raise RuntimeError(f"no results.json of {setting} seed {seed} under {root}")
    return json.loads(found[-1].read_text())


def train_and_audit(out: Path, attack: str, setting: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    root = out / "runs" / attack
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = f"{setting}_{attack}_seed{seed}"
    common = [
        f"threads={a.threads}",
        f"paths.runs_root={root}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"eval.n_samples={a.n_samples}",
    ]
    train = [
        _bin("esq-train"),
        f"experiment=digits/{setting}",
        f"attack={attack}",
        f"seed={seed}",
        *common,
        *a.train_override,
    ]
    process_seconds = run(train, logs / f"train_{tag}.log")
    res = newest_results(root, setting, seed)
    audit_dir = out / "audit" / tag
    audit = [
        _bin("esq-eval"),
        "mode=audit",
        "eval.budget=quick",
        f"ckpt_path={res['checkpoint']}",
        f"eval.n_samples={a.n_samples}",
        f"threads={a.threads}",
        f"hydra.run.dir={audit_dir}",
        "logger=none",
    ]
    run(audit, logs / f"audit_{tag}.log")
    aud = json.loads((audit_dir / "results.json").read_text())
    co = res.get("catastrophic_overfitting") or {}
    return {
        "setting": setting,
        "attack": attack,
        "seed": seed,
        "train_seconds": res["train_seconds"],
        "train_cpu_seconds": res.get("train_cpu_seconds"),
        "process_seconds": process_seconds,
        "worst_case": aud["robust_acc"]["worst_case"],
        "clean_acc": aud["clean_acc"],
        "n_samples": aud["n_samples"],
        "verdict": aud.get("audit", {}).get("verdict"),
        "catastrophic_overfitting": bool(co.get("detected")),
        "restored_epoch": co.get("restored_epoch"),
        "train_attack": res.get("train_attack"),
        "run_dir": res["run_dir"],
        "audit_dir": str(audit_dir),
    }


def unit_costs(threads: int, batch: int = 64, reps: int = 40) -> dict[str, float]:
    """Median CPU seconds of one attack step, one training forward/backward and one GradAlign term + backward, on the
    digits SmallCNN quantized to BWN (SQ ratio 0.6) with a digits-shaped batch."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import Settings, build_base_model, make_data, quantized_copy
    from esq_lightning.attacks import pgd
    from esq_lightning.rng import step_generator
    from esq_lightning.training.attacks import gradalign_term

    torch.set_num_threads(threads)
    s = Settings(model="small_cnn", batch=batch, in_channels=1, image_size=8, eps=0.2, step_size=0.05)
    model = quantized_copy(build_base_model(s), s)
    x, y = make_data(s, batch)

    def timed(fn: Any) -> float:
        # CPU time of this process at one thread: it does not advance while other jobs hold the cores.
        fn()
        times = []
        for _ in range(reps):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return statistics.median(times)

    def train_pass() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def align() -> None:
        model.zero_grad(set_to_none=True)
        gradalign_term(model, x, y, s.eps, step_generator(0, 0, 3)).backward()

    t1 = timed(lambda: pgd(model, x, y, eps=s.eps, step_size=s.step_size, steps=1))
    t10 = timed(lambda: pgd(model, x, y, eps=s.eps, step_size=s.step_size, steps=10))
    return {
        "attack_step": (t10 - t1) / 9,
        "attack_1": t1,
        "attack_10": t10,
        "train_pass": timed(train_pass),
        "gradalign": timed(align),
    }


def floor(attack: str, setting: str, u: dict[str, float]) -> float:
    p = PASSES[setting] * u["train_pass"]
    fast = STEPS[attack] * u["attack_step"] + p + (u["gradalign"] if attack == "gradalign" else 0.0)
    return fast / (10 * u["attack_step"] + p)


def summarize(rows: list[dict[str, Any]], u: dict[str, float]) -> dict[str, Any]:
    by = {(r["setting"], r["attack"], r["seed"]): r for r in rows}
    table = []
    for setting in SETTINGS:
        for attack in dict.fromkeys(r["attack"] for r in rows):
            runs = [r for r in rows if r["setting"] == setting and r["attack"] == attack]
            if not runs:
                continue
            ratios, cpu_ratios, pipe, diffs = [], [], [], []
            for r in runs:
                ref = by.get((setting, "pgd", r["seed"]))
                if ref is None:
                    continue
                ratios.append(r["train_seconds"] / ref["train_seconds"])
                if r.get("train_cpu_seconds") and ref.get("train_cpu_seconds"):
                    cpu_ratios.append(r["train_cpu_seconds"] / ref["train_cpu_seconds"])
                diffs.append(100 * (r["worst_case"] - ref["worst_case"]))
                if setting == "AEB":
                    af, af_ref = by.get(("AF", attack, r["seed"])), by.get(("AF", "pgd", r["seed"]))
                    if af and af_ref:
                        # CPU time when every run of the chain recorded it (module docstring), else wall-clock.
                        key = (
                            "train_cpu_seconds"
                            if all(x.get("train_cpu_seconds") for x in (af, af_ref, r, ref))
                            else "train_seconds"
                        )
                        pipe.append((af[key] + r[key]) / (af_ref[key] + ref[key]))
            mean = lambda v: statistics.fmean(v) if v else None  # noqa: E731
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            wc = [100 * r["worst_case"] for r in runs]
            row = {
                "setting": setting,
                "attack": attack,
                "seeds": [r["seed"] for r in runs],
                "train_seconds": mean([r["train_seconds"] for r in runs]),
                "worst_case": mean(wc),
                "worst_case_sd": sd(wc),
                "clean": mean([100 * r["clean_acc"] for r in runs]),
                "co_runs": sum(r["catastrophic_overfitting"] for r in runs),
                "train_cpu_seconds": mean([r["train_cpu_seconds"] for r in runs if r.get("train_cpu_seconds")]),
                "ratio": mean(ratios),
                "cpu_ratio": mean(cpu_ratios),
                "pipeline_ratio": mean(pipe),
                "worst_case_diff": mean(diffs),
                "floor": floor(attack, setting, u) if u else None,
            }
            # The time side of the target is judged on CPU time when recorded: on a shared CPU the load changes
            # between runs, which moves wall-clock ratios of runs made one after another (never the CPU time's).
            judged = row["cpu_ratio"] if row["cpu_ratio"] is not None else row["ratio"]
            row["meets_target"] = (
                setting == "AEB"
                and attack != "pgd"
                and judged is not None
                and row["worst_case_diff"] >= -TARGET_POINTS
                and judged <= TARGET_RATIO
            )
            table.append(row)
    return {"rows": table}


def markdown(summary: dict[str, Any], n_samples: int) -> str:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        "| setting | training attack | seeds | train s | audited worst case % | clean % | CO flags | "
        "time / PGD-10 | CPU time / PGD-10 | floor | worst case - PGD-10 (points) | AF+AEB CPU time / PGD-10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['setting']} | {r['attack']} | {len(r['seeds'])} | {f(r['train_seconds'])} | "
            f"{f(r['worst_case'])} ± {f(r['worst_case_sd'])} | {f(r['clean'])} | {r['co_runs']} | "
            f"{f(r['ratio'], 2)} | {f(r['cpu_ratio'], 2)} | {f(r['floor'], 2)} | {f(r['worst_case_diff'])} | "
            f"{f(r['pipeline_ratio'], 2)} |"
        )
    lines.append("")
    lines.append(
        f"Audit: esq-eval mode=audit eval.budget=quick, per-sample worst case on {n_samples} test inputs, "
        "L_inf eps 0.2, eval mode, full quantization. Means over seeds; ratios per seed against PGD-10 of "
        "the same seed, then averaged."
    )
    hits = [r for r in summary["rows"] if r["meets_target"]]
    lines.append(
        "Target (fast AEB within 2 points of PGD-10's worst case at <= 0.35 of its time, judged on CPU "
        "time): " + ("met by " + ", ".join(r["attack"] for r in hits) if hits else "not met")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--attacks", nargs="+", default=["pgd", "fgsm_rs", "nfgsm", "gradalign"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--n-samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-override", nargs="*", default=[], help="extra esq-train overrides for every run")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="only summarize the runs of these time_to_robustness.json records (e.g. seeds run as separate "
        "invocations); the floors use the median of their unit costs",
    )
    a = p.parse_args(argv)
    if a.merge:
        records = [json.loads(path.read_text()) for path in a.merge]
        rows = [r for rec in records for r in rec["runs"]]
        u = {k: statistics.median(rec["unit_costs"][k] for rec in records) for k in records[0]["unit_costs"]}
        merged = {"merged": [str(path) for path in a.merge], "unit_costs": u, "runs": rows, **summarize(rows, u)}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "time_to_robustness.json").write_text(json.dumps(merged, indent=1))
        table = markdown(summarize(rows, u), a.n_samples)
        (a.out / "time_to_robustness.md").write_text(table + "\n")
        print(table)
        return 0
    if "pgd" not in a.attacks:
        p.error("--attacks must include pgd (the reference of every ratio)")
    a.out.mkdir(parents=True, exist_ok=True)
    record_path = a.out / "time_to_robustness.json"
    u = unit_costs(a.threads)
    print("unit costs (s, median):", json.dumps({k: round(v, 6) for k, v in u.items()}), flush=True)
    rows: list[dict[str, Any]] = []
    for seed in a.seeds:
        for attack in a.attacks:
            for setting in a.settings:
                row = train_and_audit(a.out, attack, setting, seed, a)
                rows.append(row)
                print(
                    f"{setting} {attack} seed {seed}: train {row['train_seconds']:.1f}s worst case "
                    f"{100 * row['worst_case']:.1f}% clean {100 * row['clean_acc']:.1f}% "
                    f"CO {row['catastrophic_overfitting']}",
                    flush=True,
                )
                record = {
                    "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                    "unit_costs": u,
                    "runs": rows,
                    **summarize(rows, u),
                }
                record_path.write_text(json.dumps(record, indent=1))
    table = markdown(summarize(rows, u), a.n_samples)
    (a.out / "time_to_robustness.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
