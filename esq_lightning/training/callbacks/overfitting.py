"""Catastrophic overfitting caught while training (docs/fast-training.md).

Single-step training attacks can overfit to themselves: within an epoch multi-step PGD accuracy collapses while
single-step FGSM accuracy holds or rises (Wong et al. 2020). The PGD callback feeds this detector every robust
validation (multi-step PGD at eps: the validation attack, never the training attack, and FGSM at eps). It fires
once, the first time

    PGD accuracy < best PGD accuracy so far - drop   and   FGSM accuracy >= FGSM accuracy at that best - fgsm_tolerance

A plain loss of robustness (both fall) is not catastrophic overfitting, and an attack that merely got stronger
is not either. The flag is `catastrophic_overfitting` (metrics val/catastrophic_overfitting, the W&B run, the
end-of-training verdict and results.json).
"""

from __future__ import annotations

from typing import Any


class OverfittingDetector:
    def __init__(self, drop: float = 0.2, fgsm_tolerance: float = 0.05) -> None:
        if not 0 < drop <= 1:
            raise ValueError(f"callbacks.pgd.co_drop: {drop} is out of range; allowed: 0 < co_drop <= 1")
        if not 0 <= fgsm_tolerance <= 1:
            raise ValueError(f"callbacks.pgd.co_fgsm_tolerance: {fgsm_tolerance} is out of range; allowed: 0 to 1")
        self.drop = drop
        self.fgsm_tolerance = fgsm_tolerance
        self.best_epoch: int | None = None
        self.best_pgd = -1.0
        self.fgsm_at_best = 0.0
        self.fired_epoch: int | None = None
        self.at_fire: tuple[float, float] | None = None
        self.history: list[tuple[int, float, float]] = []

    @property
    def fired(self) -> bool:
        return self.fired_epoch is not None

    def update(self, epoch: int, pgd_acc: float, fgsm_acc: float) -> tuple[bool, bool]:
        """Feed one robust validation; returns (new best PGD accuracy, fired now)."""
        self.history.append((int(epoch), float(pgd_acc), float(fgsm_acc)))
        if pgd_acc > self.best_pgd:
            self.best_epoch, self.best_pgd, self.fgsm_at_best = int(epoch), float(pgd_acc), float(fgsm_acc)
            return True, False
        if self.fired:
            return False, False
        if pgd_acc < self.best_pgd - self.drop and fgsm_acc >= self.fgsm_at_best - self.fgsm_tolerance:
            self.fired_epoch, self.at_fire = int(epoch), (float(pgd_acc), float(fgsm_acc))
            return False, True
        return False, False

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_pgd": self.best_pgd,
            "fgsm_at_best": self.fgsm_at_best,
            "fired_epoch": self.fired_epoch,
            "at_fire": list(self.at_fire) if self.at_fire else None,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_epoch, self.best_pgd = state["best_epoch"], float(state["best_pgd"])
        self.fgsm_at_best, self.fired_epoch = float(state["fgsm_at_best"]), state["fired_epoch"]
        self.at_fire = tuple(state["at_fire"]) if state["at_fire"] else None
        self.history = [tuple(h) for h in state["history"]]

    def message(self) -> str:
        if self.at_fire is None:
            return "no catastrophic overfitting"
        pgd_acc, fgsm_acc = self.at_fire
        return (
            f"validation PGD accuracy fell to {100 * pgd_acc:.1f}% at epoch {self.fired_epoch} from its best "
            f"{100 * self.best_pgd:.1f}% (epoch {self.best_epoch}) while FGSM accuracy held "
            f"({100 * fgsm_acc:.1f}% against {100 * self.fgsm_at_best:.1f}%)"
        )

    def record(self) -> dict[str, Any]:
        return {
            "detected": self.fired,
            "epoch": self.fired_epoch,
            "best_epoch": self.best_epoch,
            "best_pgd_acc": self.best_pgd if self.best_epoch is not None else None,
            "pgd_acc": self.at_fire[0] if self.at_fire else None,
            "fgsm_acc": self.at_fire[1] if self.at_fire else None,
            "drop": self.drop,
            "fgsm_tolerance": self.fgsm_tolerance,
            "history": [{"epoch": e, "pgd_acc": p, "fgsm_acc": f} for e, p, f in self.history],
        }
