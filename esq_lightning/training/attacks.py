"""Training attacks by name (`callbacks.pgd.name`, conf/attack/*.yaml) and the GradAlign regulariser.

- pgd: `steps` steps of `step_size` from a uniform start in the eps-ball, projected onto it (SPEC section 3).
- fgsm: one step of `step_size` from x (no random start): the attack that overfits catastrophically.
- fgsm_rs: one step of `step_size` (1.25 eps in conf/attack/fgsm_rs.yaml) from a uniform start in the eps-ball,
  projected (Wong, Rice, Kolter 2020).
- nfgsm: one step of `step_size` (eps) from uniform noise in [-noise, noise] (noise = 2 eps), NOT projected onto the
  eps-ball (de Jorge et al. 2022): a training perturbation may reach noise + step_size = 3 eps in L_inf. Only the
  training input changes: the evaluation's threat model stays eval.eps (every robust accuracy is measured there).

Every attack clamps its input to the data range [0, 1] and draws its start from the generator it is given (the
module passes step_generator(seed, step, Stream.ATTACK)), so a step's perturbation is a function of (seed, step).
Inside SQ the attack sees the step's one weight selection, as every other pass of the step does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esq_lightning.attacks import pgd
from esq_lightning.attacks.pgd import _random_start
from esq_lightning.attacks.utils import as_autograd_input, frozen_eval, grad_enabled
from esq_lightning.config.choices import SINGLE_STEP_TRAIN_ATTACKS, TRAIN_ATTACKS
from esq_lightning.quant.modules import frozen_quant_weights


@dataclass
class TrainAttack:
    """The attack that makes x_adv during training (SPEC section 3), by name (module docstring)."""

    eps: float
    step_size: float
    steps: int
    norm: str = "linf"
    random_start: bool = True
    name: str = "pgd"
    # Half-width of the uniform start; None: eps. Projection onto the eps-ball after each step (False: nfgsm).
    noise: float | None = None
    project: bool = True
    # Weight of the GradAlign regulariser added to the training loss (0: off); the module reads it.
    gradalign: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in TRAIN_ATTACKS:
            raise ValueError(
                f"callbacks.pgd.name: unknown training attack {self.name!r}; allowed: {', '.join(TRAIN_ATTACKS)}"
            )
        if self.name in SINGLE_STEP_TRAIN_ATTACKS and self.steps != 1:
            raise ValueError(f"callbacks.pgd.steps: {self.steps}, but {self.name} is one step; allowed: 1")
        if not self.project and self.norm != "linf":
            raise ValueError("callbacks.pgd.project: false is defined for norm=linf only")

    @property
    def start_radius(self) -> float:
        return self.eps if self.noise is None else float(self.noise)

    def record(self) -> dict[str, Any]:
        """What results.json states under `train_attack`."""
        out = asdict(self)
        out["noise"] = self.start_radius if self.random_start else 0.0
        return out

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None, loss_fn: Any = None
    ) -> Tensor:
        if self.project and self.start_radius == self.eps:
            # PGD, FGSM and FGSM-RS: the library PGD (projected, start uniform in the eps-ball).
            return pgd(
                model,
                x,
                y,
                eps=self.eps,
                step_size=self.step_size,
                steps=self.steps,
                norm=self.norm,
                random_start=self.random_start,
                loss_fn=loss_fn,
                generator=generator,
            )
        return self._noisy_linf(model, x, y, generator, loss_fn)

    def _noisy_linf(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None, loss_fn: Any
    ) -> Tensor:
        """L_inf steps from a start of half-width `noise`, projected onto the eps-ball only when `project`."""
        loss_fn = loss_fn or (lambda z, t: F.cross_entropy(z, t, reduction="sum"))
        with grad_enabled():
            x0, y0 = as_autograd_input(x), as_autograd_input(y)
            delta = (
                _random_start(x0, self.start_radius, "linf", generator) if self.random_start else torch.zeros_like(x0)
            )
            x_adv = (x0 + delta).clamp(0.0, 1.0)
            with frozen_eval(model), frozen_quant_weights(model):
                for _ in range(self.steps):
                    x_adv.requires_grad_(True)
                    (grad,) = torch.autograd.grad(loss_fn(model(x_adv), y0), x_adv)
                    with torch.no_grad():
                        delta = x_adv + self.step_size * grad.sign() - x0
                        if self.project:
                            delta = delta.clamp(-self.eps, self.eps)
                        x_adv = (x0 + delta).clamp(0.0, 1.0)
        return x_adv.detach()


def gradalign_term(model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """GradAlign (Andriushchenko & Flammarion 2020): mean over the batch of 1 - cos(grad_x L(x), grad_x L(x + eta)),
    eta uniform in the L_inf eps-ball (drawn from `generator`); differentiable in the weights through the second
    gradient (double backpropagation), as in the authors' code.

    The gradients are those the attack sees: BatchNorm in eval mode (its running statistics untouched), the
    step's SQ selection; the parameters keep their gradients.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        x1 = x.detach().clone().requires_grad_(True)
        (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y), x1)
        x2 = (x.detach() + _random_start(x, eps, "linf", generator)).clamp(0.0, 1.0).requires_grad_(True)
        (g2,) = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)
    finally:
        for m, mode in modes:
            m.training = mode
    cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1, eps=1e-12)
    return (1.0 - cos).mean()
