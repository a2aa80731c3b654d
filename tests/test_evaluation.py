"""esq-eval end to end on tiny digits checkpoints: whitebox, transfer, amplification, blackbox, gradient masking."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from esq_lightning.artifacts.loading import load_trained_model
from esq_lightning.attacks import ATTACKS, perturbation_norms
from esq_lightning.commands.evaluate import evaluate, load_test_split, run_config_with_eval
from esq_lightning.commands.train import train
from esq_lightning.config.threat import ThreatModel
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation import (
    amplification_curve,
    attack_in_batches,
    evaluate_robustness,
    format_flags,
    gradient_masking_report,
    predict,
)
from esq_lightning.evaluation.sequence import EvalSettings
from esq_lightning.quant import full_quantization
from tests.hydra_utils import FAST, compose_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Tiny natural training; 3 epochs of 10 batches give a usable model (about 95% clean) in a few seconds.
TRAIN = [
    *FAST,
    "method=natural",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=10",
    "callbacks.pgd.val_every_n_epochs=0",
    "callbacks.quant_ratio.start=1.0",
    "eval.attacks=[fgsm]",
    "eval.n_samples=32",
]
EPS = 0.05  # below the digits default (0.2), where the tiny models keep some robust accuracy
# Fast settings for every registry attack (few steps and queries); AutoAttack at a budget that ends it early.
FAST_PARAMS = {
    "fgsm": {"eps": EPS},
    "pgd20": {"step_size": EPS / 4},
    "pgd100": {"steps": 25, "restarts": 2, "step_size": EPS / 4},
    "ddn": {"steps": 20},
    "cw": {"steps": 10, "binary_search_steps": 4},
    "boundary": {"steps": 100, "init_directions": 20, "init_steps": 50},
    "nattack": {"max_iter": 20, "population": 40},
    "square": {"n_queries": 100},
    "autoattack": {"eps": 0.3},
    "pgd_margin": {"steps": 5},
    "pgd_dlr": {"steps": 5},
    "pgd_mt": {"steps": 3, "targets": 2},
    "pgd_pp": {"steps": 5},
    "pgd_pairing": {"steps": 5},
    "pgd_schedule": {"steps": 3, "restarts": 1},
}


def overrides_for(params: dict[str, dict], prefix: str = "eval.params") -> list[str]:
    return [f"++{prefix}.{name}.{key}={value}" for name, p in params.items() for key, value in p.items()]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full-precision and a BWN checkpoint trained once per session; the FP run logs the amplification callback."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    # Labels are derived: natural full precision is NF, natural BWN from scratch is VB.
    for quant, extra in (
        ("full", ["callbacks.amplification.every_n_epochs=1", "callbacks.amplification.n_samples=32"]),
        ("bwn", []),
    ):
        run_dir = root / quant
        cfg = compose_config("train", [*TRAIN, f"quant={quant}", *extra], run_dir)
        results, _ = train(cfg)
        out[quant] = Path(results["checkpoint"])
    return out


def run_eval(tmp_path: Path, overrides: list[str]) -> dict:
    cfg = compose_config("eval", ["threads=1", "progress=false", *overrides], tmp_path)
    return evaluate(cfg)


def split_of(ckpt: Path, n: int, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test inputs of a checkpoint's dataset, as esq-eval reads them."""
    train_config = load_trained_model(ckpt).config
    cfg = compose_config("eval", [], tmp_path / "split")
    return load_test_split(run_config_with_eval(train_config, cfg), int(train_config["seed"]), n)


# --- whitebox ----------------------------------------------------------------------------------------------------


def test_whitebox_every_attack_records_params_and_never_beats_clean(ckpts, tmp_path):
    results = run_eval(
        tmp_path,
        [
            f"ckpt_path={ckpts['bwn']}",
            "eval.n_samples=12",
            f"eval.eps={EPS}",
            f"eval.attacks=[{','.join(ATTACKS)}]",
            *overrides_for(FAST_PARAMS),
        ],
    )
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["task"] == "eval" and on_disk["mode"] == "whitebox" and on_disk["n_samples"] == 12
    assert on_disk["clean_acc"] > 0.5
    # The per-sample worst case comes first, then every attack in the order asked.
    assert list(on_disk["robust_acc"]) == ["worst_case", *ATTACKS]
    attacks_acc = {k: v for k, v in on_disk["robust_acc"].items() if k != "worst_case"}
    at_eps = [k for k in on_disk["worst_case"]["attacks"]]
    assert on_disk["robust_acc"]["worst_case"] <= min(attacks_acc[k] for k in at_eps)
    assert "ddn" not in at_eps and "autoattack" not in at_eps  # L2 1.0 and L_inf 0.3: other threat models
    for name, acc in attacks_acc.items():
        record = on_disk["attacks"][name]
        assert record["attack"] == name and record["n_inputs"] == 12
        assert 0.0 <= acc <= on_disk["clean_acc"], name
        for key, value in FAST_PARAMS[name].items():
            assert record[key] == pytest.approx(value), (name, key)
    assert on_disk["attacks"]["pgd20"]["eps"] == pytest.approx(EPS)
    assert on_disk["attacks"]["ddn"]["eps"] == 1.0 and on_disk["attacks"]["nattack"]["eps"] == 1.0
    assert on_disk["attacks"]["nattack"]["max_queries"] == 1 + 20 * 41
    report = on_disk["gradient_masking"]
    assert isinstance(report["flags"], list)
    # FGSM and both PGDs share linf eps 0.05: they were compared.
    pairs = {(c["weaker"], c["stronger"]) for c in report["checks"]["single_step_beats_iterative"]}
    assert {("fgsm", "pgd20"), ("fgsm", "pgd100")} <= pairs


def test_attacks_on_a_trained_checkpoint_respect_budget_and_box(ckpts, tmp_path):
    model = load_trained_model(ckpts["bwn"]).model
    x, y = split_of(ckpts["bwn"], 10, tmp_path)
    with full_quantization(model):
        clean = predict(model, x) == y
        for name, eps in (("fgsm", EPS), ("pgd20", EPS), ("square", EPS), ("nattack", 1.0), ("ddn", None)):
            params = {k: v for k, v in FAST_PARAMS[name].items() if k != "eps"}
            correct, x_adv, record = attack_in_batches(
                name, model, x, y, eps, params, batch_size=4, progress=False, keep_adv=True
            )
            assert x_adv is not None and x_adv.shape == x.shape
            assert x_adv.min() >= 0 and x_adv.max() <= 1, name
            norms = perturbation_norms(x_adv, x, record["norm"])
            if eps is not None:
                assert norms.max() <= eps * (1 + 1e-5) + 1e-6, name
            assert not (correct & ~clean).any(), name
            assert correct.float().mean() <= clean.float().mean()


# --- transfer ----------------------------------------------------------------------------------------------------


def test_transfer_matrix_diagonal_is_whitebox_pgd(ckpts, tmp_path):
    common = ["eval.n_samples=48", f"eval.eps={EPS}", f"eval.params.pgd20.step_size={EPS / 4}", "eval.batch_size=20"]
    record = run_eval(tmp_path / "transfer", ["mode=transfer", f"ckpts=[{ckpts['full']},{ckpts['bwn']}]", *common])
    matrix = record["matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert record["labels"] == ["NF (full)", "VB (bwn)"]
    on_disk = json.loads((tmp_path / "transfer" / "transfer.json").read_text())
    assert on_disk["matrix"] == matrix and on_disk["attack"] == "pgd20" and on_disk["params"]["eps"] == EPS
    table = (tmp_path / "transfer" / "transfer.md").read_text()
    assert "NF (full)" in table and "VB (bwn)" in table and table.count("\n|") >= 4
    for i, key in enumerate(("full", "bwn")):
        wb = run_eval(tmp_path / f"wb_{key}", [f"ckpt_path={ckpts[key]}", "eval.attacks=[pgd20]", *common])
        # Same attack, batches and seed: the diagonal is the white-box number, exactly.
        assert matrix[i][i] == wb["robust_acc"]["pgd20"]
        assert record["clean_acc"][i] == wb["clean_acc"]
        assert all(matrix[i][j] <= record["clean_acc"][j] for j in range(2))


# --- amplification -----------------------------------------------------------------------------------------------


def test_amplification_curves_json_and_png(ckpts, tmp_path):
    record = run_eval(
        tmp_path,
        ["mode=amplification", f"ckpts=[{ckpts['full']},{ckpts['bwn']}]", "eval.n_samples=24", "eval.batch_size=10"],
    )
    on_disk = json.loads((tmp_path / "amplification.json").read_text())
    assert on_disk["mode"] == "amplification" and len(on_disk["curves"]) == 2
    model = load_trained_model(ckpts["bwn"]).model
    for curve in on_disk["curves"]:
        assert curve["modules"] == model.residual_module_names()
        assert len(curve["d"]) == len(model.residual_module_names())
        assert all(d >= 0 and math.isfinite(d) for d in curve["d"])
        assert max(curve["d"]) > 0.01  # eps 0.2 moves the activations
        assert curve["attack"]["steps"] == 10 and curve["n_samples"] == 24
    png = tmp_path / "amplification.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and record["figure"] == str(png)
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3


def test_amplification_is_zero_for_a_tiny_eps(ckpts):
    model = load_trained_model(ckpts["bwn"]).model
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    curve = amplification_curve(model, x, y, eps=1e-8, steps=10, batch_size=4)
    assert curve["d"] == pytest.approx([0.0] * 3, abs=1e-5)
    # A real budget does move them, and the model comes back in its own mode.
    model.train()
    assert min(amplification_curve(model, x, y, eps=0.2, steps=3)["d"]) > 1e-3
    assert model.training


def test_amplification_callback_logs_every_module(ckpts):
    metrics = ckpts["full"].parents[1] / "csv" / "metrics.csv"
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    for name in ("block1", "block2", "block3"):
        values = [float(r[f"amplification/{name}"]) for r in rows if r.get(f"amplification/{name}")]
        assert len(values) == 3 and all(v >= 0 for v in values), name  # every epoch of 3


def test_amplification_callback_sends_a_wandb_line_plot():
    from pytorch_lightning.loggers import WandbLogger

    from esq_lightning.training.callbacks import AmplificationCallback

    class Run:
        def __init__(self) -> None:
            self.logged: list[dict] = []

        def log(self, data: dict) -> None:
            self.logged.append(data)

    logger = WandbLogger.__new__(WandbLogger)  # no wandb run: the experiment is the recorder
    logger._experiment = Run()
    AmplificationCallback.log_wandb([logger], {"modules": ["a", "b"], "d": [0.1, 0.3], "epoch": 4}, step=50)
    (logged,) = logger._experiment.logged
    assert logged["trainer/global_step"] == 50
    assert logged["amplification/table"].data == [[1, "a", 0.1, 4], [2, "b", 0.3, 4]]
    assert type(logged["amplification/curve"]).__name__ == "CustomChart"
    with pytest.raises(ValueError, match="every_n_epochs"):
        AmplificationCallback(every_n_epochs=-1)


# --- blackbox ----------------------------------------------------------------------------------------------------


def test_blackbox_curves_start_at_clean_accuracy_and_never_rise(ckpts, tmp_path):
    budgets = [0, 0.5, 1, 2, 4]
    record = run_eval(
        tmp_path,
        [
            "mode=blackbox",
            f"ckpts=[{ckpts['full']},{ckpts['bwn']}]",
            "eval.blackbox.n_samples=6",
            f"eval.blackbox.budgets=[{','.join(map(str, budgets))}]",
            *overrides_for(
                {"boundary": FAST_PARAMS["boundary"], "nattack": {"max_iter": 10, "population": 20}},
                "eval.blackbox.params",
            ),
        ],
    )
    on_disk = json.loads((tmp_path / "blackbox.json").read_text())
    assert on_disk["budgets"] == budgets and len(on_disk["curves"]) == 4
    assert (tmp_path / "blackbox.png").read_bytes()[:8] == PNG_MAGIC
    for curve in on_disk["curves"]:
        path = ckpts["full"] if curve["label"].endswith("(full)") else ckpts["bwn"]
        model = load_trained_model(path).model
        x, y = split_of(path, 6, tmp_path)
        with full_quantization(model):
            clean = (predict(model, x) == y).float().mean().item()
        acc = curve["accuracy"]
        assert acc[0] == pytest.approx(clean)
        assert all(a >= b for a, b in zip(acc, acc[1:])), curve["legend"]
        assert "queries" in curve["legend"] and curve["query_budget"]["max_queries"] > 0
    assert on_disk["curves"][1]["query_budget"]["max_queries"] == 1 + 10 * 21
    assert record["curves"][0]["params"]["steps"] == 100


def test_blackbox_refuses_gradient_attacks_and_linf(ckpts, tmp_path):
    base = ["mode=blackbox", f"ckpts=[{ckpts['full']}]"]
    with pytest.raises(ESQUserError, match="eval.blackbox.attacks: 'pgd20' uses gradients"):
        run_eval(tmp_path, [*base, "eval.blackbox.attacks=[pgd20]"])
    with pytest.raises(ESQUserError, match="eval.blackbox.params.square.norm"):
        run_eval(tmp_path, [*base, "eval.blackbox.attacks=[square]"])


# --- gradient masking --------------------------------------------------------------------------------------------


def _records(**eps_by_attack: tuple[str, float | None]) -> dict[str, dict]:
    steps = {"pgd20": (20, 1), "pgd100": (100, 5)}
    out = {}
    for name, (norm, eps) in eps_by_attack.items():
        s, r = steps.get(name, (1, 1))
        out[name] = {"attack": name, "norm": norm, "eps": eps, "steps": s, "restarts": r}
    return out


THREATS = _records(
    fgsm=("linf", 0.03),
    pgd20=("linf", 0.03),
    pgd100=("linf", 0.03),
    autoattack=("linf", 0.03),
    square=("linf", 0.03),
    ddn=("l2", 1.0),
    cw=("l2", 1.0),
    nattack=("l2", 1.0),
    boundary=("l2", 1.0),
)


def test_masking_report_flags_the_clear_signs():
    # A model with masked gradients: single step beats PGD, more PGD steps help it, black-box beats white-box.
    robust = {
        "fgsm": 0.30,
        "pgd20": 0.50,
        "pgd100": 0.55,
        "autoattack": 0.45,
        "square": 0.10,
        "ddn": 0.6,
        "cw": 0.7,
        "nattack": 0.2,
        "boundary": 0.65,
    }
    report = gradient_masking_report(0.9, robust, THREATS)
    flagged = {
        (c, x["weaker"], x["stronger"])
        for c, items in report["checks"].items()
        for x in items
        if x.get("flagged") and "weaker" in x
    }
    assert ("single_step_beats_iterative", "fgsm", "pgd20") in flagged
    assert ("more_iterations_raise_accuracy", "pgd20", "pgd100") in flagged
    assert ("blackbox_beats_whitebox", "square", "autoattack") in flagged
    assert ("blackbox_beats_whitebox", "nattack", "ddn") in flagged
    # Boundary 65% is above the best white-box L2 result (DDN 60%): not flagged though C&W is weaker.
    assert not any(w == "boundary" for _, w, _ in flagged)
    assert len(report["flags"]) == len(flagged) and all(isinstance(f, str) for f in report["flags"])
    assert "POSSIBLE" in format_flags(report)
    # Clean-only failure: a gradient attack that changes nothing.
    only = gradient_masking_report(0.9, {"pgd20": 0.9}, THREATS)
    assert [c["flagged"] for c in only["checks"]["clean_only_failure"]] == [True]


def test_masking_report_passes_a_healthy_model_and_compares_only_equal_threats():
    robust = {
        "fgsm": 0.40,
        "pgd20": 0.30,
        "pgd100": 0.28,
        "autoattack": 0.25,
        "square": 0.35,
        "ddn": 0.1,
        "cw": 0.2,
        "nattack": 0.3,
        "boundary": 0.15,
    }
    report = gradient_masking_report(0.9, robust, THREATS)
    assert report["flags"] == []
    assert "no sign found" in format_flags(report)
    # FGSM at another eps than PGD (the paper's 16/255 vs 8/255) is not compared, even when far below.
    other = {**THREATS, "fgsm": {**THREATS["fgsm"], "eps": 0.06}}
    report = gradient_masking_report(0.9, {"fgsm": 0.01, "pgd20": 0.3}, other)
    assert report["checks"]["single_step_beats_iterative"] == [] and report["flags"] == []
    # One sample in a hundred is within the default tolerance (one point); a stricter tolerance flags it.
    assert gradient_masking_report(0.9, {"fgsm": 0.08, "pgd20": 0.09}, THREATS)["flags"] == []
    assert len(gradient_masking_report(0.9, {"fgsm": 0.08, "pgd20": 0.09}, THREATS, tolerance=0.0)["flags"]) == 1


def test_masking_report_end_to_end(ckpts, tmp_path):
    model = load_trained_model(ckpts["full"]).model
    x, y = split_of(ckpts["full"], 48, tmp_path)
    # Healthy: FGSM, PGD-20 and a stronger PGD at one eps rank as they should.
    ev = evaluate_robustness(
        model,
        x,
        y,
        ThreatModel("linf", EPS),
        EvalSettings(
            ["fgsm", "pgd20", "pgd100"],
            progress=False,
            params={
                "fgsm": {"eps": EPS},
                "pgd20": {"step_size": EPS / 4},
                "pgd100": {"steps": 40, "restarts": 2, "step_size": EPS / 4},
            },
        ),
    )
    assert ev["gradient_masking"]["flags"] == [], ev["robust_acc"]
    # Broken on purpose: a "PGD" that never moves (no steps, no random start) leaves clean accuracy.
    ev = evaluate_robustness(
        model,
        x,
        y,
        ThreatModel("linf", EPS),
        EvalSettings(["pgd20"], progress=False, params={"pgd20": {"steps": 0, "random_start": False}}),
    )
    assert ev["robust_acc"]["pgd20"] == ev["clean_acc"]
    assert any(f.startswith("clean_only_failure: pgd20") for f in ev["gradient_masking"]["flags"])


# --- configuration errors ----------------------------------------------------------------------------------------


def test_user_errors_are_one_line(ckpts, tmp_path):
    with pytest.raises(ESQUserError, match="ckpt_path: mode=whitebox"):
        run_eval(tmp_path, [])
    with pytest.raises(ESQUserError, match="ckpts: mode=transfer needs checkpoints"):
        run_eval(tmp_path, ["mode=transfer"])
    with pytest.raises(ESQUserError, match="eval.params.pgd20.*unknown parameter"):
        run_eval(tmp_path, [f"ckpt_path={ckpts['full']}", "eval.attacks=[pgd20]", "++eval.params.pgd20.stepz=3"])
    # Another test split: the same weights with another split seed.
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(ckpts["bwn"], weights_only=False)
    ckpt["esq_config"]["data"]["split_seed"] = 1
    torch.save(ckpt, other)
    with pytest.raises(ESQUserError, match=f"ckpts: {other} was trained on .* must share the dataset") as info:
        run_eval(tmp_path, ["mode=amplification", f"ckpts=[{ckpts['full']},{other}]"])
    assert "\n" not in str(info.value)


def test_unknown_mode_is_one_line_on_stderr(tmp_path, capsys):
    from esq_lightning.cli._common import user_errors_as_one_line

    cfg = compose_config("eval", ["mode=attackall"], tmp_path)
    with pytest.raises(SystemExit) as info:
        user_errors_as_one_line(evaluate)(cfg)  # what esq-eval wraps its main in
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "error: mode=attackall: unknown evaluation mode; allowed: whitebox, transfer, amplification, blackbox, audit\n"
    )
