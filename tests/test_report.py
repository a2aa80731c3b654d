"""esq-report on synthetic results.json files: mean ± std over seeds, row order, variants, LaTeX, extra sections."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from esq_lightning.errors import ESQUserError
from esq_lightning.reporting.formats import format_eps, latex_escape
from esq_lightning.reporting.report import PAPER_SETTINGS, make_report


def write_result(
    run_dir: Path,
    setting: str,
    seed: int,
    clean: float,
    pgd: float,
    *,
    task: str = "train",
    quant: str = "bwn",
    method: str = "esq",
    eps: float = 8 / 255,
    overrides: list[str] | None = None,
    dataset: str = "cifar10",
    model: str = "wrn28_10",
    lambdas: tuple[float, ...] = (10.0,),
    distance: str = "relative_l2",
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task,
        "setting": setting,
        "experiment": f"{dataset}-{model}-{setting}",
        "dataset": dataset,
        "model": model,
        "method": method,
        "quant": quant,
        "seed": seed,
        "clean_acc": clean,
        "robust_acc": {"fgsm": pgd + 0.1, "pgd20": pgd},
        "threat_model": {"norm": "linf", "eps": eps},
        "n_samples": 1000,
        "pairing": {"layers": ["logits"], "lambdas": list(lambdas), "p": 2, "distance": distance},
    }
    (run_dir / "results.json").write_text(json.dumps(record))
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


def test_mean_and_sample_std_over_seeds_in_percent(tmp_path: Path) -> None:
    cleans, pgds = [0.90, 0.80, 0.85], [0.30, 0.50, 0.46]
    for seed, (c, p) in enumerate(zip(cleans, pgds)):
        write_result(
            tmp_path / "mr" / str(seed), "AEB", seed, c, p, overrides=[f"seed={seed}", "experiment=cifar10/AEB"]
        )
    write_result(tmp_path / "mr" / "3", "NF", 0, 0.95, 0.0)
    report = make_report(tmp_path / "mr")
    md = report["markdown"]
    cells = row(md, "AEB")
    assert cells[1] == "3"
    assert cells[2] == f"{100 * statistics.fmean(cleans):.2f} ± {100 * statistics.stdev(cleans):.2f}"
    assert cells[4] == f"{100 * statistics.fmean(pgds):.2f} ± {100 * statistics.stdev(pgds):.2f}"
    assert row(md, "NF")[1:] == ["1", "95.00", "10.00", "0.00"]  # one seed: no std
    # The threat model is stated with the table; 8/255 in the paper's units.
    assert "linf eps=8/255" in md and "1000 test inputs" in md
    out = tmp_path / "mr" / "report"
    assert {p.name for p in out.iterdir()} >= {
        "report.md",
        "report.tex",
        "whitebox_train.md",
        "whitebox_train.tex",
        "whitebox.csv",
    }
    tex = (out / "whitebox_train.tex").read_text()
    assert r"85.00 $\pm$ 5.00" in tex and r"\epsilon = 8/255" in tex and r"\toprule" in tex
    table = report["tables"]["train"][0]
    aeb = next(r for r in table.rows if r.label == "AEB")
    assert aeb.cells["pgd20"].mean == pytest.approx(statistics.fmean(pgds))
    assert sorted(aeb.seeds) == [0, 1, 2]


def test_paper_settings_first_in_paper_order_then_others(tmp_path: Path) -> None:
    names = ["zzz", "AAT", "NEB", "custom", "NF", "AF", "EB"]
    for i, name in enumerate(names):
        write_result(tmp_path / str(i), name, 0, 0.5, 0.1)
    labels = [r.label for r in make_report(tmp_path)["tables"]["train"][0].rows]
    assert labels == ["NF", "AF", "NEB", "AAT", "EB", "cifar10-wrn28_10-custom", "zzz"]
    assert PAPER_SETTINGS.index("AAT") == len(PAPER_SETTINGS) - 1


def test_runs_differing_in_more_than_the_seed_are_separate_rows(tmp_path: Path) -> None:
    for i, (quant, lam) in enumerate([("bwn", 1), ("twn", 1), ("bwn", 10), ("bwn", 10)]):
        write_result(
            tmp_path / str(i),
            "EB",
            i,
            0.5 + i / 100,
            0.1,
            quant=quant,
            lambdas=(lam,),
            overrides=[f"quant={quant}", f"pairing.lambdas=[{lam}]", f"seed={i}", "threads=1"],
        )
    md = make_report(tmp_path)["markdown"]
    # The row names what the record says the run trained with, each key once, numbers in order.
    assert row(md, "EB (lambdas=10, quant=bwn)")[1] == "2"
    assert row(md, "EB (lambdas=1, quant=bwn)")[1] == "1"
    assert row(md, "EB (lambdas=1, quant=twn)")[1] == "1"
    assert md.index("EB (lambdas=1, quant=bwn)") < md.index("EB (lambdas=10, quant=bwn)")


def test_rows_of_a_sweep_name_each_distance_and_order_lambdas_by_size(tmp_path: Path) -> None:
    for i, (distance, lam) in enumerate([("kl", 30), ("kl", 3), ("relative_l2", 10), ("kl", 10)]):
        write_result(
            tmp_path / str(i),
            "AEB",
            0,
            0.5,
            0.1,
            lambdas=(lam,),
            distance=distance,
            overrides=[f"pairing.distance={distance}", f"pairing.lambdas=[{lam}.0]", "seed=0"],
        )
    md = make_report(tmp_path)["markdown"]
    names = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines() if line.startswith("| AEB")]
    assert names == [
        "AEB (distance=kl, lambdas=3)",
        "AEB (distance=kl, lambdas=10)",
        "AEB (distance=kl, lambdas=30)",
        "AEB (distance=relative_l2, lambdas=10)",
    ]


def test_eval_results_go_to_a_second_table_and_datasets_to_separate_tables(tmp_path: Path) -> None:
    write_result(tmp_path / "a", "NF", 0, 0.9, 0.1)
    write_result(tmp_path / "b", "NF", 0, 0.8, 0.2, task="eval")
    write_result(tmp_path / "c", "NF", 0, 0.7, 0.3, dataset="digits", model="small_cnn", eps=0.2)
    report = make_report(tmp_path, out=tmp_path / "elsewhere", fmt="md")
    assert [(t.dataset, t.eps) for t in report["tables"]["train"]] == [("cifar10", 8 / 255), ("digits", 0.2)]
    assert len(report["tables"]["eval"]) == 1 and report["tables"]["eval"][0].rows[0].cells["clean"].mean == 0.8
    files = {p.name for p in (tmp_path / "elsewhere").iterdir()}
    assert "whitebox_eval.md" in files and not any(f.endswith(".tex") for f in files)
    md = report["markdown"]
    assert md.index("training runs") < md.index("esq-eval runs")


def test_transfer_amplification_and_blackbox_sections(tmp_path: Path) -> None:
    write_result(tmp_path / "train" / "0", "NF", 0, 0.9, 0.1)
    ev = tmp_path / "eval"
    (ev / "t").mkdir(parents=True)
    (ev / "t" / "transfer.json").write_text(
        json.dumps(
            {
                "task": "eval",
                "mode": "transfer",
                "dataset": "cifar10",
                "labels": ["NF (full)", "AEB (bwn)"],
                "matrix": [[0.1, 0.6], [0.7, 0.4]],
                "clean_acc": [0.9, 0.8],
                "attack": "pgd20",
                "n_samples": 100,
                "threat_model": {"norm": "linf", "eps": 8 / 255},
            }
        )
    )
    (ev / "a").mkdir()
    (ev / "a" / "amplification.png").write_bytes(b"\x89PNG fake")
    (ev / "a" / "amplification.json").write_text(
        json.dumps(
            {
                "task": "eval",
                "mode": "amplification",
                "dataset": "cifar10",
                "n_samples": 100,
                "attack": {"norm": "linf", "eps": 8 / 255, "steps": 10},
                "curves": [
                    {"label": "NF (full)", "modules": ["m1", "m2"], "d": [0.1, 0.5], "clean_acc": 0.9, "adv_acc": 0.0}
                ],
                "figure": str(ev / "a" / "amplification.png"),
            }
        )
    )
    (ev / "b").mkdir()
    (ev / "b" / "blackbox.json").write_text(
        json.dumps(
            {
                "task": "eval",
                "mode": "blackbox",
                "dataset": "cifar10",
                "n_samples": 20,
                "budgets": [0, 1, 2],
                "curves": [
                    {
                        "label": "NF (full)",
                        "attack": "boundary",
                        "legend": "NF (full), Boundary (7000 queries)",
                        "accuracy": [0.9, 0.5, 0.1],
                    }
                ],
            }
        )
    )
    report = make_report(tmp_path)
    md = report["markdown"]
    assert "| NF (full) | 10.00 | 60.00 |" in md and "| clean | 90.00 | 80.00 |" in md
    assert (
        "| NF (full) | 90.00 | 0.00 | 0.1000 | 0.5000 |" in md and "![error amplification](amplification_1.png)" in md
    )
    assert "| NF (full), Boundary (7000 queries) | 90.0 | 50.0 | 10.0 |" in md
    out = tmp_path / "report"
    assert (out / "amplification_1.png").read_bytes() == b"\x89PNG fake"
    assert {"transfer.md", "transfer.tex", "amplification.tex", "blackbox.md"} <= {p.name for p in out.iterdir()}
    # A second report does not pick up its own output as input.
    assert make_report(tmp_path)["markdown"] == md


def test_helpers() -> None:
    assert format_eps(8 / 255) == "8/255" and format_eps(0.2) == "0.2" and format_eps(0.3) == "0.3"
    assert latex_escape("a_b & 5%") == r"a\_b \& 5\%"


def test_nothing_to_report_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ESQUserError, match="no results.json"):
        make_report(tmp_path)


def esq_report(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "esq_lightning.cli.report", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_cli_prints_markdown_and_fails_in_one_line(tmp_path: Path) -> None:
    write_result(tmp_path / "runs" / "0", "NVB", 0, 0.9, 0.1)
    proc = esq_report(f"runs={tmp_path / 'runs'}", "format=both")
    assert proc.returncode == 0, proc.stderr
    assert "| NVB | 1 | 90.00 |" in proc.stdout
    assert (tmp_path / "runs" / "report" / "report.tex").is_file()
    proc = esq_report(f"runs={tmp_path / 'missing'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_cli_is_hydra_and_makes_no_run_directory(tmp_path: Path) -> None:
    """A report writes its tables and nothing else: no outputs/, no .hydra/, no log file in the working directory."""
    write_result(tmp_path / "runs" / "0", "NVB", 0, 0.9, 0.1)
    work = tmp_path / "work"
    work.mkdir()
    proc = esq_report("runs=../runs", "out=tables", "format=md", "digits=1", "quiet=true", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "esq-report: 1 runs" in proc.stderr  # quiet: no markdown on stdout
    assert sorted(p.name for p in work.iterdir()) == ["tables"]
    assert (
        not list((work / "tables").glob("*.tex"))
        and "| NVB | 1 | 90.0 |" in (work / "tables" / "report.md").read_text()
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["0"]
    # --cfg job shows the options with their defaults and runs nothing.
    proc = esq_report("--cfg", "job", "runs=../runs", cwd=work)
    assert proc.returncode == 0 and "runs: ../runs" in proc.stdout and "format: both" in proc.stdout
    assert sorted(p.name for p in work.iterdir()) == ["tables"]


def test_cli_reads_a_list_of_folders(tmp_path: Path) -> None:
    write_result(tmp_path / "a" / "0", "NVB", 0, 0.9, 0.1)
    write_result(tmp_path / "b" / "0", "NEB", 0, 0.8, 0.3)
    proc = esq_report(f"runs=[{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'a' / '0'}]", f"out={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    assert "| NVB | 1 | 90.00 |" in proc.stdout and "| NEB | 1 | 80.00 |" in proc.stdout  # a/0 twice counts once
    # without out=, the report goes to report/ in the folder the runs share
    proc = esq_report(f"runs=[{tmp_path / 'a'},{tmp_path / 'b'}]")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report" / "report.md").is_file() and "| NEB | 1 | 80.00 |" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["ruins=x"],
            "error: ruins: unknown key (did you mean 'runs'?); allowed keys of esq-report: runs, out, format, ",
        ),
        (["runs=x", "+quite=true"], "error: quite: unknown key (did you mean 'quiet'?); allowed keys of esq-report: "),
        (["runs=x", "format=pdf"], "error: format: 'pdf' is not allowed; allowed: 'md', 'latex', 'both'"),
        (["runs=x", "digits=two"], "error: digits: 'two' is not an integer; allowed: 0 <= digits <= 10"),
        (
            ["runs=x", "curve_x=byte"],
            "error: curve_x: 'byte' is not allowed; allowed: 'bits', 'bytes' (did you mean 'bytes'?)",
        ),
        ([], "error: runs: required"),
        (["outputs/x"], "error: outputs/x: give options as key=value, e.g. runs=outputs/x"),
        (["runs=x", "--quiet"], "error: --quiet: esq-report takes options as key=value, e.g. quiet=true"),
        (["-m", "runs=x"], "error: -m: esq-report runs once"),
    ],
)
def test_cli_bad_options_fail_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = esq_report(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_help_names_every_option(tmp_path: Path) -> None:
    proc = esq_report("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for key in ("runs", "out", "format", "digits", "quiet", "curve_x", "wandb", "wandb_mode"):
        assert f"\n{key}:" in proc.stdout  # the defaults (conf/report.yaml)
        assert f"\n{key} " in proc.stdout  # and what it means
    assert list(tmp_path.iterdir()) == []


def test_a_repeated_seed_counts_once_newest_wins(tmp_path: Path) -> None:
    import os

    write_result(tmp_path / "old", "NEB", 0, 0.10, 0.0)
    write_result(tmp_path / "new", "NEB", 0, 0.90, 0.5)
    write_result(tmp_path / "other", "NEB", 1, 0.70, 0.3)
    os.utime(tmp_path / "old" / "results.json", (1, 1))
    report = make_report(tmp_path)
    (neb,) = report["tables"]["train"][0].rows
    assert neb.n == 2 and neb.cells["clean"].values == [0.90, 0.70]
    assert neb.dropped == [str(tmp_path / "old")] and "Left out: 1 older run" in report["markdown"]


def test_unreadable_files_are_named_and_the_rest_is_reported(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_result(runs / "0", "NVB", 0, 0.9, 0.1)
    write_result(runs / "1", "NEB", 0, 0.8, 0.3)
    corrupt = runs / "1" / "results.json"
    corrupt.write_text(corrupt.read_text()[:40])  # a run killed while an old version wrote it, or a bad copy
    foreign = runs / "2" / "results.json"
    foreign.parent.mkdir()
    foreign.write_text("[1, 2]")
    bad_transfer = runs / "3" / "transfer.json"
    bad_transfer.parent.mkdir()
    bad_transfer.write_bytes(b"\xff\xfe not json")
    report = make_report(runs)
    assert report["n_runs"] == 1 and row(report["markdown"], "NVB")[1] == "1"
    named = {str(path): why for path, why in report["unreadable"]}
    assert set(named) == {str(corrupt), str(foreign), str(bad_transfer)}
    assert "JSONDecodeError" in named[str(corrupt)] and "not a JSON object" in named[str(foreign)]

    proc = esq_report(f"runs={runs}", "quiet=true")
    assert proc.returncode == 0, proc.stderr
    for path in (corrupt, foreign, bad_transfer):
        assert f"esq-report: skipped {path}: cannot read it" in proc.stderr

    (runs / "0" / "results.json").write_text("{")
    with pytest.raises(ESQUserError, match=f"no readable results; cannot read .*{runs / '0' / 'results.json'}"):
        make_report(runs)


def test_runs_of_different_training_configs_are_separate_rows_named_by_the_keys_that_differ(tmp_path: Path) -> None:
    """A 2-epoch and a 30-epoch run of one setting never share a cell; the row names the real values."""
    for seed in (0, 1):
        write_result(tmp_path / "long" / str(seed), "AEB", seed, 0.9, 0.4 + seed / 10)
        _set_config(tmp_path / "long" / str(seed), {"seed": seed, "trainer.max_epochs": 30, "quant.kind": "bwn"})
    write_result(tmp_path / "short", "AEB", 0, 0.2, 0.05)
    _set_config(tmp_path / "short", {"seed": 0, "trainer.max_epochs": 2, "quant.kind": "bwn"})
    md = make_report(tmp_path)["markdown"]
    assert row(md, "AEB (trainer.max_epochs=2)")[1:3] == ["1", "20.00"]
    assert row(md, "AEB (trainer.max_epochs=30)")[1:3] == ["2", "90.00 ± 0.00"]
    assert "None" not in md


def _set_config(run_dir: Path, config: dict) -> None:
    path = run_dir / "results.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "train_config": config}))
