"""The robustness-compression curve of esq-report on synthetic results.json files."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest

from esq_lightning.artifacts.runs import iter_results
from esq_lightning.reporting.curves import build_curves, robust_metric
from esq_lightning.reporting.report import make_report


def write(
    run_dir: Path,
    method: str,
    bits: int,
    seed: int,
    clean: float,
    robust: dict[str, float],
    *,
    width: int = 32,
    init_from: str | None = "setting:AF",
    model_bytes: int | None = None,
    distance: str = "relative_l2",
    lambdas: tuple[float, ...] = (1.0,),
    config: dict | None = None,
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = {
        "task": "train",
        "setting": f"A{method[0].upper()}{bits}",
        "dataset": "digits",
        "model": "small_cnn",
        "method": method,
        "quant": "uniform",
        "bits": bits,
        "act_bits": 32,
        "model_width": {"width": width},
        "seed": seed,
        "clean_acc": clean,
        "robust_acc": robust,
        "threat_model": {"norm": "linf", "eps": 0.2},
        "n_samples": 300,
        "init_from": init_from,
        "pairing": {"layers": ["logits"], "lambdas": list(lambdas), "p": 2, "distance": distance},
    }
    if model_bytes is not None:
        rec["model_bytes"] = model_bytes
    if config is not None:
        rec["train_config"] = {**config, "quant.bits": bits, "seed": seed, "init_from": init_from}
    (run_dir / "results.json").write_text(json.dumps(rec))


def test_points_are_mean_and_std_over_seeds_one_line_per_method(tmp_path: Path) -> None:
    values = {}
    i = 0
    for method in ("natural", "esq"):
        for bits in (1, 4, 32):
            for seed in (0, 1):
                clean, pgd = 0.9 - 0.01 * seed, 0.1 * bits**0.5 + 0.02 * seed + (0.1 if method == "esq" else 0)
                values.setdefault((method, bits), []).append(pgd)
                write(tmp_path / str(i), method, bits, seed, clean, {"fgsm": pgd + 0.1, "pgd20": pgd})
                i += 1
    # The full-precision start itself: one width only, so a point and not a line.
    write(tmp_path / "af", "adversarial", 32, 0, 0.95, {"fgsm": 0.7, "pgd20": 0.6}, init_from=None)
    (curve,) = build_curves(iter_results(tmp_path))
    assert curve.robust_metric == "pgd20"  # the strongest attack every run has
    # an error-silenced line names the pairing it trained with, even when every ESQ run shares it
    assert set(curve.lines) == {"vanilla (natural)", "error-silenced (ESQ) (relative_l2, lambda 1)"}
    esq = curve.lines["error-silenced (ESQ) (relative_l2, lambda 1)"]
    assert [p.bits for p in esq] == [1, 4, 32]
    assert [statistics.fmean(p.robust) for p in esq] == pytest.approx(
        [statistics.fmean(values[("esq", b)]) for b in (1, 4, 32)]
    )
    assert all(sorted(p.seeds) == [0, 1] for p in esq)

    report = make_report(tmp_path, out=tmp_path / "report")
    png = tmp_path / "report" / "bits_curve_digits_small_cnn.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report["markdown"]
    assert "## Robustness vs compression" in md and "robust = PGD-20 under linf eps=0.2" in md
    m, s = statistics.fmean(values[("esq", 4)]), statistics.stdev(values[("esq", 4)])
    assert f"{100 * 0.895:.1f} / {100 * m:.1f} (±{100 * 0.00707:.1f} / ±{100 * s:.1f}) n=2" in md


def test_worst_case_is_preferred_and_bytes_axis(tmp_path: Path) -> None:
    for i, bits in enumerate((1, 2, 8)):
        write(
            tmp_path / str(i), "adversarial", bits, 0, 0.9, {"pgd20": 0.5, "worst_case": 0.4}, model_bytes=1000 * bits
        )
    write(tmp_path / "old", "adversarial", 4, 0, 0.9, {"pgd20": 0.5, "worst_case": 0.4})  # no model_bytes
    records = list(iter_results(tmp_path))
    assert robust_metric([r for _, r in records]) == "worst_case"
    (curve,) = build_curves(records, x_axis="bytes")
    (line,) = curve.lines.values()
    assert [p.x for p in line] == [1000.0, 2000.0, 8000.0]  # the run without a size is left out of this axis
    assert [p.robust for p in line] == [[0.4]] * 3
    # Without worst_case on every run, the strongest attack that all runs have.
    write(tmp_path / "x", "adversarial", 3, 0, 0.9, {"pgd20": 0.5, "pgd100": 0.45})
    assert build_curves(iter_results(tmp_path))[0].robust_metric == "pgd20"


def test_widths_are_separate_lines(tmp_path: Path) -> None:
    for i, (width, bits) in enumerate([(32, 1), (32, 32), (64, 1), (64, 32)]):
        write(tmp_path / str(i), "esq", bits, 0, 0.9, {"pgd20": 0.3}, width=width)
    (curve,) = build_curves(iter_results(tmp_path))
    assert set(curve.lines) == {
        "error-silenced (ESQ) (relative_l2, lambda 1; width 32)",
        "error-silenced (ESQ) (relative_l2, lambda 1; width 64)",
    }


def test_one_width_only_gives_no_curve(tmp_path: Path) -> None:
    write(tmp_path / "a", "esq", 1, 0, 0.9, {"pgd20": 0.3})
    write(tmp_path / "b", "esq", 1, 1, 0.9, {"pgd20": 0.3})
    report = make_report(tmp_path, out=tmp_path / "report")
    assert "Robustness vs compression" not in report["markdown"]
    assert not list((tmp_path / "report").glob("bits_curve*.png"))


def test_curve_is_logged_to_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    for i, bits in enumerate((1, 32)):
        write(tmp_path / "runs" / str(i), "esq", bits, 0, 0.9, {"pgd20": 0.3 + 0.1 * i})
    make_report(tmp_path / "runs", out=tmp_path / "report", wandb_project="esq-test", wandb_mode="offline")
    (run,) = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    keys = (b"bits_curve/digits_small_cnn/robust", b"bits_curve/digits_small_cnn/table")
    # W&B's service process may still be writing the record after finish(): wait for it (at most 30 s).
    deadline = time.monotonic() + 30
    while True:
        record = b"".join(p.read_bytes() for p in run.glob("*.wandb"))
        if all(k in record for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(k in record for k in keys)


def test_error_silenced_runs_of_different_pairings_are_separate_lines(tmp_path: Path) -> None:
    # Two distances of one method at the same bit widths: two lines named by what each run trained with.
    for i, (distance, lam, gain) in enumerate([("kl", 1.0, 0.2), ("relative_l2", 10.0, 0.0)]):
        for bits in (1, 2):
            write(
                tmp_path / f"{i}-{bits}",
                "esq",
                bits,
                0,
                0.9,
                {"pgd20": 0.1 * bits + gain},
                distance=distance,
                lambdas=(lam,),
            )
    (curve,) = build_curves(iter_results(tmp_path))
    assert set(curve.lines) == {"error-silenced (ESQ) (kl, lambda 1)", "error-silenced (ESQ) (relative_l2, lambda 10)"}
    assert [p.robust for p in curve.lines["error-silenced (ESQ) (kl, lambda 1)"]] == [
        [pytest.approx(0.3)],
        [pytest.approx(0.4)],
    ]


def test_runs_of_different_schedules_are_separate_lines_named_by_the_key(tmp_path: Path) -> None:
    """A 30-epoch and a 2-epoch sweep never join into one curve."""
    for epochs in (2, 30):
        for bits in (1, 4):
            write(
                tmp_path / f"{epochs}_{bits}",
                "esq",
                bits,
                0,
                0.9,
                {"pgd20": 0.01 * epochs + 0.01 * bits},
                config={"trainer.max_epochs": epochs, "method.name": "esq"},
            )
    (curve,) = build_curves(iter_results(tmp_path))
    assert set(curve.lines) == {
        "error-silenced (ESQ) (relative_l2, lambda 1; trainer.max_epochs=2)",
        "error-silenced (ESQ) (relative_l2, lambda 1; trainer.max_epochs=30)",
    }
    short = curve.lines["error-silenced (ESQ) (relative_l2, lambda 1; trainer.max_epochs=2)"]
    assert [statistics.fmean(p.robust) for p in short] == pytest.approx([0.03, 0.06])


def test_figure_joins_only_neighbouring_widths_and_clips_error_bars(tmp_path: Path) -> None:
    """No line crosses a width where the line has no run; error bars stay inside 0-100%; the worst case's attacks and
    the pairing are named."""
    from esq_lightning.reporting.curves import plot_curve

    for bits, accs in ((1, (0.98, 0.40)), (4, (0.99, 0.995)), (32, (0.99, 0.99))):
        for seed, acc in enumerate(accs):
            write(tmp_path / f"e{bits}_{seed}", "esq", bits, seed, 0.99, {"worst_case": acc})
            rec = json.loads((tmp_path / f"e{bits}_{seed}" / "results.json").read_text())
            rec["worst_case"] = {"acc": acc, "attacks": ["fgsm", "pgd20"]}
            (tmp_path / f"e{bits}_{seed}" / "results.json").write_text(json.dumps(rec))
    for bits in (1, 2):
        write(tmp_path / f"n{bits}", "natural", bits, 0, 0.9, {"worst_case": 0.1})
    (curve,) = build_curves(iter_results(tmp_path))
    assert curve.attacks == "the runs' attack sets differ"  # the natural runs recorded none
    fig_path = plot_curve(curve, tmp_path / "c.png")
    assert fig_path.is_file()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from esq_lightning.reporting import curves as curves_module

    drawn: list = []
    original = Figure.subplots

    def spy(self, *a, **k):
        axes = original(self, *a, **k)
        drawn.append(axes)
        return axes

    curves_module.Figure = type("SpyFigure", (Figure,), {"subplots": spy}) if hasattr(curves_module, "Figure") else None
    try:
        import matplotlib.figure as mf

        mf_original = mf.Figure
        mf.Figure = type("SpyFigure", (Figure,), {"subplots": spy})
        plot_curve(curve, tmp_path / "d.png")
    finally:
        mf.Figure = mf_original
    robust = drawn[-1][1]
    esq_label = "error-silenced (ESQ) (relative_l2, lambda 1)"
    assert esq_label in [t.get_text() for t in robust.get_legend().get_texts()]
    segments = [
        tuple(line.get_xdata())
        for line in robust.get_lines()
        if len(line.get_xdata()) == 2 and line.get_linestyle() == "-"
    ]
    # ESQ ran at 1, 4 and 32 bits and the figure's widths are 1, 2, 4, 32: 1-4 crosses 2, so only 4-32 is joined
    assert (4.0, 32.0) in segments and (1.0, 4.0) not in segments
    # the 4-bit point: mean 99.75 with std 0.35 is clipped at 100
    for container in robust.containers:
        for bar in getattr(container, "lines", (None, None, ()))[2]:
            for seg in bar.get_segments():
                assert all(0 <= y <= 100 for _, y in seg)


# ---------------------------------------------------------------- the robustness-vs-bytes front (reporting/front.py)
def write_front(
    run_dir: Path,
    preset: str,
    method: str,
    budget: int,
    seed: int,
    model_bytes: int,
    clean: float,
    worst: float,
    budget_bytes: int | None = None,
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    comp: dict = {"layer_bits": {}, "preset": preset, "budget": budget}
    if budget_bytes is not None:
        comp["prune"] = {"method": "hydra", "budget_bytes": budget_bytes}
    rec = {
        "task": "train",
        "setting": "AAF-PH",
        "dataset": "digits",
        "model": "small_cnn",
        "method": method,
        "quant": "full",
        "bits": 32,
        "seed": seed,
        "clean_acc": clean,
        "robust_acc": {"fgsm": worst + 0.1, "pgd20": worst, "worst_case": worst},
        "threat_model": {"norm": "linf", "eps": 0.2},
        "model_bytes": model_bytes,
        "compression": comp,
    }
    (run_dir / "results.json").write_text(json.dumps(rec))


def test_front_lines_pareto_and_best_method_per_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esq_lightning.reporting.front import build_fronts, pareto

    i = 0
    # uniform: 17k -> 0.20, 30k -> 0.30; hydra: 20k -> 0.35 (dominates uniform 30k), 30k -> 0.33 (dominated)
    for seed in (0, 1):
        for preset, method, budget, size, worst, bb in [
            ("uniform", "esq", 0, 17000, 0.20, None),
            ("uniform", "esq", 1, 30000, 0.30, None),
            ("hydra", "adversarial", 0, 19990, 0.35, 20000),
            ("hydra", "adversarial", 1, 29990, 0.33, 30000),
        ]:
            write_front(tmp_path / str(i), preset, method, budget, seed, size + seed, 0.9, worst + 0.01 * seed, bb)
            i += 1
    # a one-width run of the bits curve stays out of the front, and the front's runs out of the bits curve
    write(tmp_path / "bits", "esq", 1, 0, 0.9, {"fgsm": 0.3, "pgd20": 0.2}, model_bytes=17000)
    (front,) = build_fronts(iter_results(tmp_path))
    assert front.robust_metric == "worst_case"
    assert set(front.lines) == {"uniform k-bit, ESQ", "HYDRA pruning, adversarial"}
    hydra = front.lines["HYDRA pruning, adversarial"]
    assert [p.x for p in hydra] == [19990.5, 29990.5] and all(sorted(p.seeds) == [0, 1] for p in hydra)
    best = pareto(front.points)
    assert [(p.label, p.budget) for p in best] == [("uniform k-bit, ESQ", 0), ("HYDRA pruning, adversarial", 0)]
    assert front.budgets == [17000.5, 20000.0, 30000.0, 30000.5]  # given budgets and the uniform points' sizes
    assert build_curves(iter_results(tmp_path)) == []

    logged: dict = {}

    class FakeRun:
        dir = str(tmp_path)

        def log(self, data: dict) -> None:
            logged.update(data)

        def finish(self) -> None:
            pass

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    report = make_report(tmp_path, out=tmp_path / "report", wandb_project="p", wandb_mode="disabled")
    md = report["markdown"]
    png = tmp_path / "report" / "front_digits_small_cnn.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 20,000 | HYDRA pruning, adversarial | 19,990 | 90.0 / 35.5 |" in md
    assert "| 17,000 | uniform k-bit, ESQ | 17,000 | 90.0 / 20.5 |" in md
    assert "| 30,000 | HYDRA pruning, adversarial |" in md  # 30k: HYDRA at 20k is still the most robust that fits
    assert "**19,990 B: 90.0 / 35.5" in md and "**17,000 B" in md and "**30,000 B" not in md
    assert "front/digits_small_cnn/robust" in logged and "front/digits_small_cnn/table" in logged
