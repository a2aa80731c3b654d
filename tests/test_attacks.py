"""Tests of esq_lightning.attacks on a tiny CNN trained once on sklearn digits (1x8x8 in [0, 1])."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.attacks import (
    ATTACKS,
    GradientCheckError,
    accuracy_at_budgets,
    accuracy_curve,
    check_gradients,
    fgsm,
    frozen_eval,
    perturbation_norms,
    pgd,
    run_attack,
)


class Normalize(nn.Module):
    """Normalisation inside the model, so attacks work in [0, 1]."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class RoundInput(nn.Module):
    """Rounding with no straight-through estimator: zero input gradient everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


class RoundInputSTE(nn.Module):
    """The same rounding with a straight-through estimator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (torch.round(x * 4) / 4 - x).detach()


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        Normalize(0.3, 0.4),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )


@pytest.fixture(scope="session")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(eval-mode model, 500 held-out inputs, labels); trained once per session (~2 s)."""
    from tests.fakes import train_tiny_digits_model

    torch.manual_seed(0)
    return train_tiny_digits_model(make_cnn())


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_tiny_model_is_trained(tiny):
    model, x, y = tiny
    assert accuracy(model, x, y) > 0.9


# --- in-house PGD ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("steps", [0, 5])
def test_pgd_stays_in_ball_and_box(tiny, norm, eps, steps):
    model, x, y = tiny
    g = torch.Generator().manual_seed(0)
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=steps, norm=norm, generator=g)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    norms = perturbation_norms(x_adv, x, norm)
    assert (norms <= eps + 1e-6).all()
    assert (norms > 0).float().mean() > 0.9  # it moved (random start or steps)


def test_pgd_zero_steps_without_random_start_is_identity(tiny):
    model, x, y = tiny
    assert torch.equal(pgd(model, x, y, eps=0.1, step_size=0.1, steps=0, random_start=False), x)


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.5)])
def test_pgd_lowers_accuracy(tiny, norm, eps):
    model, x, y = tiny
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.3


def test_fgsm_is_one_full_step(tiny):
    model, x, y = tiny
    x_adv = fgsm(model, x, y, eps=0.1)
    same = pgd(model, x, y, eps=0.1, step_size=0.1, steps=1, random_start=False)
    assert torch.equal(x_adv, same)
    assert (perturbation_norms(x_adv, x, "linf") <= 0.1 + 1e-6).all()
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)
    x_l2 = fgsm(model, x, y, eps=1.0, norm="l2")
    assert (perturbation_norms(x_l2, x, "l2") <= 1.0 + 1e-5).all()


def test_pgd_keeps_batchnorm_and_modes(tiny):
    model = copy.deepcopy(tiny[0])
    _, x, y = tiny
    model.train()
    model[2].eval()  # a caller's deliberately frozen BatchNorm must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    pgd(model, x[:64], y[:64], eps=0.1, step_size=0.025, steps=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats, counters too
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_pgd_leaves_parameter_grads(tiny):
    model = copy.deepcopy(tiny[0])
    _, x, y = tiny
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    params[1].requires_grad_(False)  # frozen by the caller: must stay frozen
    pgd(model, x[:64], y[:64], eps=0.1, step_size=0.025, steps=3)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5))
    assert all(p.grad is None for p in params[1:])
    assert [p.requires_grad for p in params] == [i != 1 for i in range(len(params))]


def test_pgd_generator_makes_it_reproducible(tiny):
    model, x, y = tiny

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return pgd(model, x[:64], y[:64], eps=0.1, step_size=0.025, steps=3, generator=g)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    g = torch.Generator().manual_seed(3)
    l2 = pgd(model, x[:64], y[:64], eps=1.0, step_size=0.25, steps=2, norm="l2", generator=g)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(l2, pgd(model, x[:64], y[:64], 1.0, 0.25, 2, norm="l2", generator=g))


def test_pgd_under_no_grad_and_inference_mode(tiny):
    model, x, y = tiny
    x, y = x[:64], y[:64]

    def run() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return pgd(model, x_in, y_in, eps=0.1, step_size=0.025, steps=3, generator=g)

    x_in, y_in = x, y
    reference = run()
    with torch.no_grad():
        assert torch.equal(run(), reference)
    with torch.inference_mode():
        x_in, y_in = x.clone(), y.clone()  # inference tensors, as Lightning's validation gives
        inside = run()
    assert x_in.is_inference()
    assert torch.equal(inside, reference)
    assert torch.equal(run(), reference)  # inference-tensor inputs outside the context


def test_pgd_honours_loss_fn_for_trades(tiny):
    model, x, y = tiny
    x = x[:128]
    with torch.no_grad():
        clean_probs = model(x).softmax(dim=1)

    def kl(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return F.kl_div(logits.log_softmax(dim=1), clean_probs, reduction="sum")

    def kl_at(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return kl(model(x_adv), y).item()

    start = pgd(
        model,
        x,
        y[:128],
        eps=0.1,
        step_size=0.025,
        steps=0,
        generator=torch.Generator().manual_seed(0),
    )
    attacked = pgd(
        model,
        x,
        y[:128],
        eps=0.1,
        step_size=0.025,
        steps=10,
        loss_fn=kl,
        generator=torch.Generator().manual_seed(0),
    )
    assert kl_at(attacked) > 5 * kl_at(start)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_agrees_with_foolbox(tiny, norm, eps):
    fb = pytest.importorskip("foolbox")
    model, x, y = tiny
    steps, step_size = 10, eps / 4
    ours = pgd(model, x, y, eps, step_size, steps, norm=norm, random_start=False)
    cls = fb.attacks.LinfPGD if norm == "linf" else fb.attacks.L2PGD
    attack = cls(abs_stepsize=step_size, steps=steps, random_start=False)
    with frozen_eval(model):  # foolbox would fill the shared model's parameter .grad
        _, theirs, _ = attack(fb.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=eps)
    acc_ours, acc_theirs = accuracy(model, ours, y), accuracy(model, theirs, y)
    assert acc_ours < accuracy(model, x, y) - 0.3  # a comparison at a budget that matters
    assert abs(acc_ours - acc_theirs) <= 0.01, (acc_ours, acc_theirs)
    assert (ours - theirs).abs().max() < 1e-4  # same algorithm, same start: same iterates


# --- gradient check -------------------------------------------------------------------------------


def test_check_gradients_catches_rounding_without_ste(tiny):
    model, x, y = tiny
    check_gradients(model, x, y)  # healthy model: no error
    rounded = nn.Sequential(RoundInput(), model)
    with pytest.raises(GradientCheckError, match="fail silently"):
        check_gradients(rounded, x, y)
    with pytest.raises(GradientCheckError):
        run_attack("pgd20", rounded, x[:16], y[:16])
    check_gradients(nn.Sequential(RoundInputSTE(), model), x, y)


def test_check_gradients_catches_detached_output(tiny):
    model, x, y = tiny

    class Detached(nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return model(inp).detach()

    with pytest.raises(GradientCheckError):
        check_gradients(Detached(), x, y)


# --- evaluation registry --------------------------------------------------------------------------

# Fast settings for every registered attack: tiny steps / queries, large enough budgets.
FAST = {
    "fgsm": (0.15, {}),
    "pgd20": (0.1, {}),
    "pgd100": (0.1, {"steps": 5, "restarts": 2}),
    "ddn": (1.0, {"steps": 20}),
    "cw": (1.0, {"steps": 10, "binary_search_steps": 4}),
    "boundary": (None, {"steps": 100, "init_directions": 20, "init_steps": 50}),
    "nattack": (1.5, {"max_iter": 20, "population": 40}),
    "square": (0.15, {"n_queries": 100}),
    "autoattack": (0.3, {}),
    "pgd_margin": (0.1, {"steps": 5}),
    "pgd_dlr": (0.1, {"steps": 5}),
    "pgd_mt": (0.1, {"steps": 3, "targets": 2}),
    "pgd_pp": (0.1, {"steps": 5}),
    "pgd_pairing": (0.1, {"steps": 5}),
    "pgd_schedule": (0.1, {"steps": 3, "restarts": 1, "step_fractions": [0.25]}),
}


def test_fast_settings_cover_every_attack():
    assert set(FAST) == set(ATTACKS)


@pytest.mark.parametrize("name", sorted(FAST))
def test_registry_attack_contract(tiny, name):
    base, x, y = tiny
    model = copy.deepcopy(base)
    model.train()  # the wrapper, not the caller, must switch to eval
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = x[:12], y[:12]
    eps, params = FAST[name]
    if ATTACKS[name].library != "esq_lightning":
        pytest.importorskip(ATTACKS[name].library)
    rng = torch.get_rng_state()
    out = run_attack(name, model, x, y, eps, **params)
    spec = ATTACKS[name]

    assert torch.equal(torch.get_rng_state(), rng)  # libraries reseed the global RNG: forked
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())

    assert out.x_adv.shape == x.shape and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    assert out.correct.dtype == torch.bool and out.correct.shape == y.shape
    assert out.norms.shape == y.shape
    model.eval()
    clean = model(x).argmax(1) == y
    assert torch.equal(out.clean_correct, clean)
    assert out.correct.float().mean() <= clean.float().mean()
    assert not (out.correct & ~clean).any()
    assert out.correct.float().mean() < clean.float().mean() or name in ("square", "cw")
    if spec.kind == "budgeted":
        assert (out.norms <= eps * (1 + 1e-5) + 1e-6).all()
        with torch.no_grad():
            adv_correct = model(out.x_adv).argmax(1) == y
        assert torch.equal(out.correct, clean & adv_correct)
    else:
        found = torch.isfinite(out.norms)
        assert torch.allclose(out.norms[found], perturbation_norms(out.x_adv, x, "l2")[found])
        assert torch.equal(out.x_adv[~found], x[~found])
        budget = math.inf if eps is None else eps
        assert torch.equal(out.correct, clean & (out.norms > budget) | clean & out.norms.isinf())

    p = out.params
    json.dumps(p)
    assert p["attack"] == name and p["kind"] == spec.kind and p["norm"] == spec.norm
    assert p["eps"] == eps and p["n_inputs"] == 12
    assert p["library"] == spec.library and p["library_version"]
    # step_size null means step_fraction x eps: the record holds the step that ran.
    resolved = {**spec.defaults, **params}
    if "step_size" in resolved and resolved["step_size"] is None and name != "pgd_schedule":
        resolved["step_size"] = resolved["step_fraction"] * eps
        assert p["step_size"] == pytest.approx(resolved["step_size"])
    assert all(p[k] == v for k, v in resolved.items() if k not in ("norm", "step_size")), p


def test_registry_defaults_follow_the_paper():
    assert ATTACKS["fgsm"].default_eps == pytest.approx(16 / 255)
    pgd20 = ATTACKS["pgd20"]
    assert pgd20.default_eps == pytest.approx(8 / 255)
    # The step is a fraction of eps: 2/255 at 8/255, exactly (a power-of-two fraction).
    assert pgd20.defaults["steps"] == 20 and pgd20.defaults["step_size"] is None
    assert pgd20.defaults["step_fraction"] * (8 / 255) == 2 / 255
    assert pgd20.defaults["random_start"]
    assert ATTACKS["pgd100"].defaults["steps"] == 100
    assert ATTACKS["pgd100"].defaults["restarts"] == 5
    assert ATTACKS["ddn"].defaults["steps"] == 100 and ATTACKS["ddn"].default_eps == 1.0
    assert ATTACKS["cw"].defaults["steps"] == 20
    assert ATTACKS["cw"].defaults["binary_search_steps"] > 1
    assert ATTACKS["square"].defaults["n_queries"] == 5000


def test_cw_failures_are_failures_not_black_images(tiny):
    # foolbox's C&W returns an all-zero image where it fails; that must not count as found.
    pytest.importorskip("foolbox")
    model, x, y = tiny
    out = run_attack("cw", model, x[:16], y[:16], steps=1, binary_search_steps=1, stepsize=1e-4)
    failed = out.norms.isinf()
    assert failed.sum() >= 8
    assert torch.equal(out.x_adv[failed], x[:16][failed])
    assert torch.equal(out.correct, out.clean_correct & failed)


def test_pgd100_restarts_count_a_sample_robust_only_if_all_fail(tiny):
    model, x, y = tiny
    x, y = x[:64], y[:64]
    one = run_attack("pgd100", model, x, y, 0.08, steps=3, restarts=1)
    many = run_attack("pgd100", model, x, y, 0.08, steps=3, restarts=4)
    assert not (many.correct & ~one.correct).any()  # restart 1 is shared: more restarts only help
    assert many.correct.sum() <= one.correct.sum()


def test_nattack_lowers_accuracy(tiny):
    model, x, y = tiny
    out = run_attack("nattack", model, x[:32], y[:32], 1.5, max_iter=30, population=50)
    assert out.correct.float().mean() < out.clean_correct.float().mean() - 0.5
    assert 0 < out.params["queries_mean"] <= out.params["max_queries"]


def test_minimum_norm_budgets_and_curves(tiny):
    pytest.importorskip("foolbox")
    model, x, y = tiny
    x, y = x[:16], y[:16]
    out = run_attack("ddn", model, x, y, steps=20)
    budgets = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    acc = accuracy_at_budgets(out, out.clean_correct, budgets)
    assert acc[0] == pytest.approx(out.clean_correct.float().mean().item())
    assert all(a >= b for a, b in zip(acc, acc[1:]))
    assert acc[budgets.index(1.0)] == pytest.approx(out.correct.float().mean().item())
    curve, record = accuracy_curve("ddn", model, x, y, budgets, steps=20)
    assert curve == acc and record["budgets"] == budgets


def test_budgeted_curve_is_monotone_and_refuses_other_budgets(tiny):
    model, x, y = tiny
    x, y = x[:16], y[:16]
    budgets = [0.0, 2.0, 0.5, 1.0]
    curve, record = accuracy_curve("nattack", model, x, y, budgets, max_iter=10, population=20)
    assert curve[0] == pytest.approx(accuracy(model, x, y))
    ordered = [curve[i] for i in (0, 2, 3, 1)]
    assert all(a >= b for a, b in zip(ordered, ordered[1:]))
    json.dumps(record)
    out = run_attack("nattack", model, x, y, 1.0, max_iter=2, population=4)
    assert accuracy_at_budgets(out, out.clean_correct, [1.0]) == [out.correct.float().mean().item()]
    with pytest.raises(ValueError, match="accuracy_curve"):
        accuracy_at_budgets(out, out.clean_correct, [0.5])


def test_run_attack_inside_inference_mode(tiny):
    model, x, y = tiny
    with torch.inference_mode():
        x_inf, y_inf = x[:16].clone(), y[:16].clone()  # inference tensors, as in validation
        out = run_attack("pgd20", model, x_inf, y_inf, 0.15, steps=5, step_size=0.04)
    assert out.correct.float().mean() < out.clean_correct.float().mean()


def test_unknown_attack_and_bad_parameters(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="valid names: .*pgd20.*autoattack"):
        run_attack("pgd7", model, x[:4], y[:4])
    with pytest.raises(ValueError, match="unknown parameters"):
        run_attack("pgd20", model, x[:4], y[:4], stepz=3)
    with pytest.raises(ValueError, match="budgeted"):
        run_attack("nattack", model, x[:4], y[:4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run_attack("fgsm", model, x[:4] * 2 - 0.5, y[:4])


def test_missing_library_gives_install_hint(tiny, monkeypatch):
    model, x, y = tiny
    monkeypatch.setitem(sys.modules, "foolbox", None)  # makes `import foolbox` raise ImportError
    with pytest.raises(ImportError, match=r"attack 'ddn' needs the package foolbox: pip install"):
        run_attack("ddn", model, x[:4], y[:4])
    run_attack("fgsm", model, x[:4], y[:4])  # in-house attacks need no library
