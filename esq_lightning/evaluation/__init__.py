"""Robustness evaluation: white-box table (and, built on it, transfer, amplification and black-box studies)."""

from esq_lightning.evaluation.whitebox import evaluate_robustness

__all__ = ["evaluate_robustness"]
