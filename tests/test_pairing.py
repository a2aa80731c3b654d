"""Pairing loss and the training objectives."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.pairing import capture_activations, check_pairing_names, forward_with_activations, pairing_distance
from esq_lightning.training.objectives import Objective


class TwoBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def residual_module_names(self) -> list[str]:
        return ["block1", "block2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(x)))


def test_pairing_distance_matches_formula_and_is_zero_for_equal_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    expected = torch.stack([(a[i] - b[i]).norm() / (a[i].norm() + 1e-12) for i in range(5)]).mean()
    assert torch.allclose(pairing_distance(a, b, 2), expected)
    expected1 = torch.stack([(a[i] - b[i]).abs().sum() / (a[i].abs().sum() + 1e-12) for i in range(5)]).mean()
    assert torch.allclose(pairing_distance(a, b, 1), expected1)
    assert pairing_distance(a, a.clone(), 2).item() == 0.0
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        pairing_distance(a, b, 3)


def test_pairing_gradient_flows_through_both_branches() -> None:
    a = torch.randn(4, 10, requires_grad=True)
    b = torch.randn(4, 10, requires_grad=True)
    pairing_distance(a, b).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_capture_hooks_are_removed_and_capture_named_outputs() -> None:
    model = TwoBlock()
    x = torch.randn(2, 6)
    logits, acts = forward_with_activations(model, x, ["block2", "logits"])
    assert set(acts) == {"block2", "logits"}
    assert torch.equal(acts["block2"], model.block2(model.block1(x)))
    assert torch.equal(acts["logits"], logits)
    assert len(model.block2._forward_hooks) == 0
    with pytest.raises(RuntimeError), capture_activations(model, ["block1"]):
        assert len(model.block1._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(model.block1._forward_hooks) == 0


def test_unknown_pairing_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"pairing.layers: unknown module 'block9'.*logits, block1, block2"):
        check_pairing_names(TwoBlock(), ["logits", "block9"])
    check_pairing_names(TwoBlock(), ["logits", "block1", "fc"])


def _identity_attack(x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> torch.Tensor:
    return x.clone()


def _shift_attack(x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> torch.Tensor:
    return x + 0.5


def test_esq_objective_is_clean_ce_when_adversarial_equals_clean() -> None:
    torch.manual_seed(0)
    model, x, y = TwoBlock(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    obj = Objective("esq", ["logits", "block1"], [1.0, 0.5])
    out = obj(model, x, y, _identity_attack)
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y))
    assert out.terms["pairing"].item() == 0.0


def test_esq_objective_adds_weighted_distances() -> None:
    torch.manual_seed(0)
    model, x, y = TwoBlock(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    obj = Objective("esq", ["logits", "block1"], [1.0, 0.5])
    out = obj(model, x, y, _shift_attack)
    xa = x + 0.5
    expected = (
        F.cross_entropy(model(x), y)
        + pairing_distance(model(x), model(xa))
        + 0.5 * pairing_distance(model.block1(x), model.block1(xa))
    )
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["natural", "adversarial", "alp", "trades"])
def test_baseline_objectives(name: str) -> None:
    torch.manual_seed(0)
    model, x, y = TwoBlock(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    weight = {"alp": {"alp_lambda": 0.5}, "trades": {"trades_beta": 6.0}}.get(name, {})
    out = Objective(name, **weight)(model, x, y, _shift_attack)
    xa = x + 0.5
    z, za = model(x), model(xa)
    expected = {
        "natural": F.cross_entropy(z, y),
        "adversarial": F.cross_entropy(za, y),
        "alp": 0.5 * F.cross_entropy(z, y) + 0.5 * F.cross_entropy(za, y) + 0.5 * F.mse_loss(z, za),
        "trades": F.cross_entropy(z, y) + 6.0 * F.kl_div(F.log_softmax(za, 1), F.softmax(z, 1), reduction="batchmean"),
    }[name]
    assert torch.allclose(out.loss, expected)


def test_trades_attack_receives_kl_loss() -> None:
    torch.manual_seed(0)
    model, x, y = TwoBlock(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    seen = {}

    def attack(x_, y_, loss_fn=None):
        seen["loss_fn"] = loss_fn
        return x_ + 0.1

    Objective("trades", trades_beta=6.0)(model, x, y, attack)
    kl_same = seen["loss_fn"](model(x), y)
    kl_moved = seen["loss_fn"](model(x + 1.0), y)
    assert abs(kl_same.item()) < 1e-5 < kl_moved.item()


def test_objective_validation() -> None:
    with pytest.raises(ValueError, match="method.name: unknown method 'madry'"):
        Objective("madry")
    with pytest.raises(ValueError, match="pairing.lambdas"):
        Objective("esq", ["logits", "block1"], [1.0])
    with pytest.raises(ValueError, match="method.alp_lambda: method=alp needs it"):
        Objective("alp")
    with pytest.raises(RuntimeError, match="needs a training attack"):
        Objective("esq")(TwoBlock(), torch.randn(2, 6), torch.tensor([0, 1]), None)
