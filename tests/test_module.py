"""The training step: one SQ draw shared by every forward pass of a step, fresh draws across steps."""

from __future__ import annotations

import pytest
import torch

from esq_lightning.models import SmallCNN
from esq_lightning.quant import QUANTIZERS, Quantizer, quant_layers, quantize_model, set_sq_ratio
from esq_lightning.training.callbacks import TrainAttack
from esq_lightning.training.module import ESQModule
from esq_lightning.training.objectives import Objective


def _module(method: str = "esq", steps: int = 3, quantizer: Quantizer = QUANTIZERS[0]) -> ESQModule:
    torch.manual_seed(0)
    model = quantize_model(
        SmallCNN(num_classes=10, in_channels=1, mean=[0.3], std=[0.4]), quantizer.kind, bits=quantizer.bits
    )
    set_sq_ratio(model, 0.4)
    module = ESQModule(model, Objective(method), num_classes=10, seed=5)
    module.train_attack = TrainAttack(eps=0.2, step_size=0.05, steps=steps)
    return module


def _record_masks(module: ESQModule) -> tuple[list[torch.Tensor], list]:
    name, layer = quant_layers(module.model)[1]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, inp: seen.append(mod.sq_mask.clone()))
    return seen, handle


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: q.name)
def test_one_sq_draw_is_shared_by_the_attack_and_both_loss_passes(quantizer: Quantizer) -> None:
    module = _module(steps=3, quantizer=quantizer)
    module.train()
    seen, handle = _record_masks(module)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    module.training_step((x, y), 0)
    handle.remove()
    # 3 PGD steps (one forward each) + the clean and the adversarial forward of the loss.
    assert len(seen) == 5
    assert all(torch.equal(m, seen[0]) for m in seen)
    n_filters = seen[0].numel()
    assert int(seen[0].sum()) == round(0.4 * n_filters)


class _SteppedModule(ESQModule):
    """global_step is a read-only Trainer property; this stands in for a trainer at a chosen step."""

    step = 0

    @property
    def global_step(self) -> int:  # type: ignore[override]
        return self.step


def test_draws_depend_on_the_global_step_and_repeat_for_the_same_step() -> None:
    base = _module(method="natural")
    module = _SteppedModule(base.model, base.objective, num_classes=10, seed=5)
    layer = quant_layers(module.model)[1][1]
    masks = []
    for step in (0, 1, 0):
        module.step = step
        torch.manual_seed(step + 100)  # the global RNG must not matter: the draw uses (seed, step)
        module.draw_sq_selection()
        masks.append(layer.sq_mask.clone())
    assert torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[0], masks[1])
