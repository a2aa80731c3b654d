"""Training objectives: natural, adversarial (Madry), error-silenced (ESQ), ALP and TRADES, as pure functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# METHODS is defined in esq_lightning/config/choices.py (torch-free: the schema reads it before torch is imported).
from esq_lightning.config.choices import METHODS
from esq_lightning.pairing import (
    LOGITS,
    check_distance_for_layers,
    forward_with_activations,
    logit_offset_stats,
    pairing_distance,
    pairing_loss,
)

# attack(x, y, loss_fn) -> x_adv, bound to the model and to this step's random generator by the caller.
Attack = Callable[..., Tensor]


@dataclass
class ObjectiveOutput:
    loss: Tensor
    logits: Tensor  # logits on the clean input (None-free: adversarial uses the adversarial logits here)
    logits_adv: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Objective:
    """A training objective selected by `method=` (SPEC section 3)."""

    name: str = "esq"
    pairing_layers: Sequence[str] = ("logits",)
    pairing_lambdas: Sequence[float] = (1.0,)
    pairing_p: int = 2
    pairing_distance: str | None = None  # DISTANCES name; None: relative_l{pairing_p}
    # The weight of method=alp / trades, required by that method (runs: conf/method/alp.yaml, trades.yaml).
    alp_lambda: float | None = None
    trades_beta: float | None = None
    # Pairing-weight warm-up: lambda_l * min(1, (epoch + 1) / pairing_warmup_epochs); 0 = the full weight from
    # the first step (the paper's). The default is for the Python API; runs take pairing.warmup_epochs (conf/pairing/).
    pairing_warmup_epochs: int = 0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method.name: unknown method '{self.name}'; allowed: {', '.join(METHODS)}")
        for key, owner in (("alp_lambda", "alp"), ("trades_beta", "trades")):
            if self.name == owner and getattr(self, key) is None:
                raise ValueError(f"method.{key}: method={owner} needs it (conf/method/{owner}.yaml)")
        if len(self.pairing_layers) != len(self.pairing_lambdas):
            raise ValueError(
                f"pairing.lambdas: {len(self.pairing_lambdas)} lambdas for {len(self.pairing_layers)} layers;"
                " give one lambda per layer"
            )
        if self.pairing_distance is not None:
            check_distance_for_layers(self.pairing_distance, self.pairing_layers)

    @property
    def needs_attack(self) -> bool:
        return self.name != "natural"

    def lambda_scale(self, epoch: int | None) -> float:
        """The factor on every pairing lambda at `epoch` (1 without a warm-up, or when no epoch is given)."""
        if not self.pairing_warmup_epochs or epoch is None:
            return 1.0
        return min(1.0, (int(epoch) + 1) / self.pairing_warmup_epochs)

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None = None, epoch: int | None = None
    ) -> ObjectiveOutput:
        if self.needs_attack and attack is None:
            raise RuntimeError(f"method '{self.name}' needs a training attack: keep callbacks.pgd enabled")
        if self.name == "esq":
            return self._esq(model, x, y, attack, self.lambda_scale(epoch))
        return getattr(self, f"_{self.name}")(model, x, y, attack)

    def _natural(self, model: nn.Module, x: Tensor, y: Tensor, attack: Attack | None) -> ObjectiveOutput:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return ObjectiveOutput(loss, logits, terms={"ce": loss.detach()})

    def _adversarial(self, model: nn.Module, x: Tensor, y: Tensor, attack: Attack) -> ObjectiveOutput:
        x_adv = attack(x, y)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        return ObjectiveOutput(loss, logits_adv, logits_adv, terms={"ce_adv": loss.detach()})

    def _esq(self, model: nn.Module, x: Tensor, y: Tensor, attack: Attack, scale: float = 1.0) -> ObjectiveOutput:
        # The attack runs first so that no clean activations are alive during its forward/backward passes.
        x_adv = attack(x, y)
        names = list(self.pairing_layers)
        logits, acts = forward_with_activations(model, x, names)
        logits_adv, acts_adv = forward_with_activations(model, x_adv, names)
        ce = F.cross_entropy(logits, y)
        lambdas = [lam * scale for lam in self.pairing_lambdas]
        pair, dists = pairing_loss(acts, acts_adv, names, lambdas, self.pairing_p, self.pairing_distance)
        terms = {"ce": ce.detach(), "pairing": pair.detach()}
        if self.pairing_warmup_epochs:
            terms["lambda_scale"] = torch.tensor(scale)
        terms.update({f"D/{n}": d.detach() for n, d in dists.items()})
        terms.update(honest_logit_terms(logits, logits_adv))
        return ObjectiveOutput(ce + pair, logits, logits_adv, terms)

    def _alp(self, model: nn.Module, x: Tensor, y: Tensor, attack: Attack) -> ObjectiveOutput:
        x_adv = attack(x, y)
        logits = model(x)
        logits_adv = model(x_adv)
        ce = F.cross_entropy(logits, y)
        ce_adv = F.cross_entropy(logits_adv, y)
        alp = F.mse_loss(logits, logits_adv)
        loss = 0.5 * ce + 0.5 * ce_adv + self.alp_lambda * alp
        return ObjectiveOutput(
            loss, logits, logits_adv, {"ce": ce.detach(), "ce_adv": ce_adv.detach(), "alp": alp.detach()}
        )

    def _trades(self, model: nn.Module, x: Tensor, y: Tensor, attack: Attack) -> ObjectiveOutput:
        # Zhang et al. 2019: the attack maximizes KL(p(x) || p(x_adv)), with p(x) fixed during the attack.
        with torch.no_grad():
            was_training = model.training
            model.eval()
            p_clean = F.softmax(model(x), dim=1)
            model.train(was_training)

        def kl_to_clean(logits_adv: Tensor, _y: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction="sum")

        x_adv = attack(x, y, loss_fn=kl_to_clean)
        logits = model(x)
        logits_adv = model(x_adv)
        ce = F.cross_entropy(logits, y)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        loss = ce + self.trades_beta * kl
        return ObjectiveOutput(loss, logits, logits_adv, {"ce": ce.detach(), "kl": kl.detach()})


def honest_logit_terms(logits: Tensor, logits_adv: Tensor) -> dict[str, Tensor]:
    """What the logits pairing cannot hide, whatever distance is trained (docs/pairing.md): D on centred logits,
    the mean logit offset, the centred norm and their ratio. Logged as train/D_centred/logits, train/logit_offset,
    train/logit_centred_norm and train/logit_offset_ratio."""
    with torch.no_grad():
        stats = logit_offset_stats(logits)
        return {
            f"D_centred/{LOGITS}": pairing_distance(logits, logits_adv, distance="centred_l2"),
            "logit_offset": stats["offset"],
            "logit_centred_norm": stats["centred_norm"],
            "logit_offset_ratio": stats["offset_ratio"],
        }
