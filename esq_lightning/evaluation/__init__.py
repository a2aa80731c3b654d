"""Robustness evaluation: white-box table, masking report, transfer matrix, error amplification, black-box curves."""

from esq_lightning.evaluation.amplification import amplification_curve, measured_at, module_names
from esq_lightning.evaluation.blackbox import blackbox_curves, check_blackbox_attacks, query_budget
from esq_lightning.evaluation.masking import format_flags, gradient_masking_report
from esq_lightning.evaluation.plots import plot_amplification, plot_blackbox
from esq_lightning.evaluation.transfer import markdown_table, transfer_matrix
from esq_lightning.evaluation.whitebox import attack_budget, attack_in_batches, evaluate_robustness, predict

__all__ = [
    "amplification_curve",
    "attack_budget",
    "attack_in_batches",
    "blackbox_curves",
    "check_blackbox_attacks",
    "evaluate_robustness",
    "format_flags",
    "gradient_masking_report",
    "markdown_table",
    "measured_at",
    "module_names",
    "plot_amplification",
    "plot_blackbox",
    "predict",
    "query_budget",
    "transfer_matrix",
]
