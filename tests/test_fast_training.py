"""Training attacks by name (training/attacks.py), GradAlign, and the catastrophic-overfitting watch
(training/callbacks/overfitting.py): budgets, reproducibility from (seed, step), config errors, the flag."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from esq_lightning.commands.checks import validate_config
from esq_lightning.errors import ESQUserError
from esq_lightning.models import MODELS
from esq_lightning.quant import draw_selection, quantize_model, sq_generator
from esq_lightning.quant.modules import set_sq_ratio
from esq_lightning.rng import Stream, step_generator
from esq_lightning.training.attacks import TrainAttack, gradalign_term
from esq_lightning.training.callbacks.overfitting import OverfittingDetector
from tests.hydra_utils import FAST, compose_config

EPS = 0.2
ATTACKS = {
    "pgd": TrainAttack(EPS, 0.05, 10, name="pgd"),
    "fgsm": TrainAttack(EPS, EPS, 1, random_start=False, name="fgsm"),
    "fgsm_rs": TrainAttack(EPS, 1.25 * EPS, 1, name="fgsm_rs"),
    "nfgsm": TrainAttack(EPS, EPS, 1, name="nfgsm", noise=2 * EPS, project=False),
}


def _sq_model() -> torch.nn.Module:
    """The digits SmallCNN as BWN under SQ at ratio 0.6, with one selection drawn (as in a training step)."""
    torch.manual_seed(0)
    model = quantize_model(MODELS["small_cnn"](num_classes=10, in_channels=1), "bwn")
    set_sq_ratio(model, 0.6)
    draw_selection(model, sq_generator(0, 7))
    return model.train()


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Pixels at 0 and 1 too: the clamp to the data range must hold where the ball leaves it.
    x = torch.randint(0, 3, (n, 1, 8, 8), generator=g).float() / 2
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", ["pgd", "fgsm", "fgsm_rs"])
def test_projected_training_attacks_stay_inside_the_eps_ball_and_the_data_range(name: str) -> None:
    model, (x, y) = _sq_model(), _batch()
    x_adv = ATTACKS[name](model, x, y, generator=step_generator(0, 3, Stream.ATTACK))
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.9 * EPS  # it moved: a no-op attack would pass the bound trivially


def test_nfgsm_leaves_the_eps_ball_by_design_but_not_the_data_range() -> None:
    # N-FGSM does not project (de Jorge et al. 2022): up to noise + step = 3 eps in L_inf, clamped to [0, 1].
    # Only the training input: the evaluation's threat model stays eval.eps (test below).
    model, (x, y) = _sq_model(), _batch()
    x_adv = ATTACKS["nfgsm"](model, x, y, generator=step_generator(0, 3, Stream.ATTACK))
    dist = (x_adv - x).abs().max()
    assert EPS < dist <= 3 * EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", list(ATTACKS))
def test_training_attacks_reproduce_from_seed_and_step_inside_sq(name: str) -> None:
    model, (x, y) = _sq_model(), _batch()
    attack = ATTACKS[name]
    a = attack(model, x, y, generator=step_generator(5, 11, Stream.ATTACK))
    draw_selection(model, sq_generator(5, 12))  # another step's selection in between
    draw_selection(model, sq_generator(0, 7))  # ... and this step's again
    b = attack(model, x, y, generator=step_generator(5, 11, Stream.ATTACK))
    assert torch.equal(a, b)
    c = attack(model, x, y, generator=step_generator(5, 12, Stream.ATTACK))
    assert torch.equal(a, c) == (not attack.random_start)  # another step, another start (none for fgsm)


def test_the_validation_attack_of_a_single_step_run_is_multi_step() -> None:
    from esq_lightning.training.callbacks import PGDCallback

    cb = PGDCallback(eps=0.2, step_size=0.25, steps=1, name="fgsm_rs")
    assert (cb.attack.steps, cb.val_attack.steps, cb.val_attack.step_size) == (1, 10, pytest.approx(0.05))
    assert PGDCallback(eps=0.2, step_size=0.05, steps=10).val_attack.steps == 10


def test_gradalign_is_reproducible_bounded_and_trains_the_weights() -> None:
    model, (x, y) = _sq_model(), _batch()
    a = gradalign_term(model, x, y, EPS, step_generator(0, 4, Stream.GRADALIGN))
    b = gradalign_term(model, x, y, EPS, step_generator(0, 4, Stream.GRADALIGN))
    assert torch.equal(a, b) and 0 <= float(a.detach()) <= 2
    model.zero_grad(set_to_none=True)
    a.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert model.training  # the term runs BatchNorm in eval mode and gives the mode back


def test_nfgsm_run_keeps_the_threat_model_and_records_its_attack(tmp_path: Path) -> None:
    cfg = compose_config("train", [*FAST, "attack=nfgsm"], tmp_path)
    assert cfg.callbacks.pgd.noise == pytest.approx(2 * cfg.data.attack.eps)
    assert cfg.callbacks.pgd.step_size == pytest.approx(cfg.data.attack.eps)
    assert cfg.eval.eps == pytest.approx(cfg.data.attack.eps)  # evaluation stays at eps
    from esq_lightning.artifacts.results import train_attack_record

    record = train_attack_record(cfg)
    assert record == {
        "name": "nfgsm",
        "eps": pytest.approx(0.2),
        "steps": 1,
        "step_size": pytest.approx(0.2),
        "random_start": True,
        "noise": pytest.approx(0.4),
        "project": False,
        "gradalign": 0.0,
    }


def test_fgsm_rs_step_follows_an_eps_override(tmp_path: Path) -> None:
    cfg = compose_config("train", [*FAST, "attack=fgsm_rs", "callbacks.pgd.eps=0.1"], tmp_path)
    assert cfg.callbacks.pgd.step_size == pytest.approx(0.125)
    assert cfg.callbacks.pgd.val_step_size == pytest.approx(0.025) and cfg.callbacks.pgd.val_steps == 10


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["callbacks.pgd.name=fgsmrs"], "callbacks.pgd.name: 'fgsmrs' is not allowed"),
        (["attack=fgsm_rs", "callbacks.pgd.steps=3"], "callbacks.pgd.steps: 3 with name=fgsm_rs, a single-step attack"),
        (["attack=nfgsm", "callbacks.pgd.project=true"], "callbacks.pgd.project: true with name=nfgsm"),
        (["attack=fgsm_rs", "callbacks.pgd.project=false"], "callbacks.pgd.project: false with name=fgsm_rs"),
        (["attack=fgsm_rs", "callbacks.pgd.random_start=false"], "callbacks.pgd.random_start: false with name=fgsm_rs"),
        (["attack=fgsm_rs", "callbacks.pgd.noise=0.5"], "callbacks.pgd.noise: 0.5 is larger than eps=0.2"),
        (["attack=gradalign", "callbacks.pgd.gradalign=-1"], "callbacks.pgd.gradalign: -1 is out of range"),
        (["callbacks.pgd.co_drop=0"], "callbacks.pgd.co_drop: 0 is out of range"),
    ],
)
def test_bad_training_attack_configs_fail_in_one_line_naming_the_key(
    overrides: list[str], expected: str, tmp_path: Path
) -> None:
    cfg = compose_config("train", overrides, tmp_path)
    with pytest.raises(ESQUserError) as info:
        validate_config(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ---- catastrophic overfitting -----------------------------------------------------------------------------
# Validation (epoch, PGD-10 accuracy, FGSM accuracy) histories recorded by real digits runs (results.json
# catastrophic_overfitting.history; 300 validation inputs, eps 0.2, threads=1):
#   esq-train experiment=digits/AF attack=fgsm     (FGSM without random start: no collapse on digits in 20 epochs)
FGSM_AF = [
    (0, 0.333, 0.457),
    (1, 0.363, 0.547),
    (2, 0.44, 0.633),
    (3, 0.44, 0.647),
    (4, 0.453, 0.673),
    (5, 0.477, 0.69),
    (6, 0.473, 0.713),
    (7, 0.457, 0.703),
    (8, 0.467, 0.727),
    (9, 0.49, 0.727),
    (10, 0.507, 0.74),
    (11, 0.49, 0.71),
    (12, 0.463, 0.747),
    (13, 0.507, 0.767),
    (14, 0.51, 0.76),
    (15, 0.517, 0.727),
    (16, 0.507, 0.793),
    (17, 0.51, 0.737),
    (18, 0.493, 0.763),
    (19, 0.49, 0.75),
]
#   esq-train experiment=digits/AF attack=fgsm_rs
FGSM_RS_AF = [
    (0, 0.367, 0.47),
    (1, 0.377, 0.523),
    (2, 0.453, 0.587),
    (3, 0.44, 0.657),
    (4, 0.48, 0.687),
    (5, 0.483, 0.687),
    (6, 0.49, 0.707),
    (7, 0.49, 0.723),
    (8, 0.53, 0.71),
    (9, 0.55, 0.713),
    (10, 0.54, 0.753),
    (11, 0.52, 0.727),
    (12, 0.523, 0.75),
    (13, 0.537, 0.757),
    (14, 0.517, 0.753),
    (15, 0.573, 0.78),
    (16, 0.57, 0.777),
    (17, 0.517, 0.777),
    (18, 0.55, 0.77),
    (19, 0.55, 0.78),
]
#   python benchmarks/time_to_robustness.py --seeds 0 --attacks pgd fgsm_rs nfgsm (AF with PGD-10, every 5 epochs)
PGD10_AF = [(4, 0.537, 0.667), (9, 0.62, 0.733), (14, 0.647, 0.787), (19, 0.707, 0.82)]
PGD10_AEB = [(4, 0.2, 0.29), (9, 0.467, 0.573), (14, 0.507, 0.657), (19, 0.547, 0.65)]  # AEB from that AF, PGD-10
# The shape of catastrophic overfitting (Wong et al. 2020, their figure 2): PGD accuracy climbs, then collapses
# to about zero within an epoch while FGSM accuracy keeps rising.
COLLAPSE = [(0, 0.30, 0.45), (1, 0.38, 0.52), (2, 0.42, 0.56), (3, 0.41, 0.60), (4, 0.05, 0.82), (5, 0.01, 0.90)]
# Robustness lost on both attacks (a bad learning rate, say): not catastrophic overfitting.
BOTH_FALL = [(0, 0.40, 0.60), (1, 0.45, 0.65), (2, 0.10, 0.20), (3, 0.05, 0.15)]


def _feed(history: list[tuple[int, float, float]]) -> OverfittingDetector:
    det = OverfittingDetector()
    for epoch, pgd_acc, fgsm_acc in history:
        det.update(epoch, pgd_acc, fgsm_acc)
    return det


def test_the_detector_fires_once_on_a_collapse_while_fgsm_holds() -> None:
    det = _feed(COLLAPSE)
    assert det.fired and det.fired_epoch == 4 and det.best_epoch == 2
    rec = det.record()
    assert rec["detected"] and rec["pgd_acc"] == pytest.approx(0.05) and rec["best_pgd_acc"] == pytest.approx(0.42)
    assert len(rec["history"]) == len(COLLAPSE)


@pytest.mark.parametrize(
    "history",
    [PGD10_AF, PGD10_AEB, FGSM_AF, FGSM_RS_AF, BOTH_FALL],
    ids=["pgd10_af", "pgd10_aeb", "fgsm_af", "fgsm_rs_af", "both_fall"],
)
def test_the_detector_stays_quiet_without_catastrophic_overfitting(history: list[tuple[int, float, float]]) -> None:
    assert not _feed(history).fired


def test_the_watch_state_survives_a_checkpoint_round_trip() -> None:
    det = _feed(COLLAPSE[:3])
    again = OverfittingDetector()
    again.load_state_dict(json.loads(json.dumps(det.state_dict())))  # as a checkpoint stores it
    for epoch, pgd_acc, fgsm_acc in COLLAPSE[3:]:
        again.update(epoch, pgd_acc, fgsm_acc)
    assert again.record() == _feed(COLLAPSE).record()


def test_a_collapsing_run_is_flagged_stopped_and_keeps_its_best_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real esq-train run whose robust validation reports COLLAPSE (constructed): the flag reaches metrics,
    results.json and the verdict; co_stop stops training and final.ckpt holds the best epoch's weights."""
    from esq_lightning.commands.train import train
    from esq_lightning.training.callbacks.pgd import PGDCallback

    seen: list[dict[str, torch.Tensor]] = []

    def scripted(self, trainer, pl_module):
        seen.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        _, pgd_acc, fgsm_acc = COLLAPSE[trainer.current_epoch]
        return torch.tensor(0.9), torch.tensor(pgd_acc), torch.tensor(fgsm_acc)

    monkeypatch.setattr(PGDCallback, "robust_validation", scripted)
    cfg = compose_config(
        "train",
        [
            *FAST,
            "attack=fgsm_rs",
            "trainer.max_epochs=6",
            "trainer.limit_train_batches=2",
            "eval.n_samples=32",
            "method=adversarial",
            "quant=full",
        ],
        tmp_path,
    )
    results, _ = train(cfg)
    assert results["epochs"] == 5  # stopped after epoch 4 (0-based) of 6
    co = results["catastrophic_overfitting"]
    assert co["detected"] and co["epoch"] == 4 and co["restored_epoch"] == 2 and co["stop"]
    assert "catastrophic_overfitting" in [f["name"] for f in results["audit"]["flags"]]
    assert results["audit"]["verdict"] in ("warn", "fail")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["catastrophic_overfitting"]["detected"]
    final = torch.load(results["checkpoint"], weights_only=False)["state_dict"]
    best = seen[2]
    assert all(torch.equal(final[f"model.{k}"], v) for k, v in best.items())
    assert not all(torch.equal(final[f"model.{k}"], v) for k, v in seen[4].items())
    with open(tmp_path / "csv" / "metrics.csv") as f:
        flags = [
            float(r["val/catastrophic_overfitting"]) for r in csv.DictReader(f) if r.get("val/catastrophic_overfitting")
        ]
    assert flags == [0, 0, 0, 0, 1]


def test_report_rows_name_the_training_attack_from_the_record(tmp_path: Path) -> None:
    from esq_lightning.artifacts.results import train_attack_label
    from esq_lightning.reporting.report import make_report
    from tests.test_report import row, write_result

    pgd10 = {
        "name": "pgd",
        "eps": 0.2,
        "steps": 10,
        "step_size": 0.05,
        "random_start": True,
        "noise": 0.2,
        "project": True,
        "gradalign": 0.0,
    }
    fgsm_rs = {**pgd10, "name": "fgsm_rs", "steps": 1, "step_size": 0.25}
    assert train_attack_label({**fgsm_rs, "gradalign": 0.2}) == "fgsm_rs+gradalign0.2"
    for i, (attack, overrides) in enumerate([(pgd10, []), (pgd10, []), (fgsm_rs, ["attack=fgsm_rs"])]):
        write_result(tmp_path / str(i), "AEB", i, 0.9, 0.4, overrides=[*overrides, f"seed={i}"])
        record = json.loads((tmp_path / str(i) / "results.json").read_text())
        (tmp_path / str(i) / "results.json").write_text(json.dumps({**record, "train_attack": attack}))
    md = make_report(tmp_path)["markdown"]
    # The setting stays AEB; the attack, read from the record, names the row (the override is not named twice).
    assert row(md, "AEB (attack=pgd10)")[1] == "2"
    assert row(md, "AEB (attack=fgsm_rs)")[1] == "1"


@pytest.mark.parametrize("experiment", ["digits/AF", "digits/AEB", "digits/NEB", "cifar10/AEB", "cifar100/AAB"])
@pytest.mark.parametrize("attack", ["fgsm_rs", "nfgsm", "gradalign"])
def test_every_fast_preset_composes_with_the_settings_at_each_scale(
    experiment: str, attack: str, tmp_path: Path
) -> None:
    overrides = [f"experiment={experiment}", f"attack={attack}"] + (
        ["data.download=true"] if "cifar" in experiment else []
    )
    cfg = compose_config("train", overrides, tmp_path)
    validate_config(cfg)
    eps = cfg.data.attack.eps
    assert cfg.callbacks.pgd.steps == 1 and cfg.callbacks.pgd.val_steps == cfg.data.attack.steps
    assert cfg.callbacks.pgd.step_size == pytest.approx(eps if attack == "nfgsm" else 1.25 * eps)
    assert cfg.setting == experiment.split("/")[1]  # the label stays the setting's
