"""The names a config may choose from, defined once and torch-free.

The code that implements each choice imports its table from here (esq_lightning.quant, .pairing,
.training.objectives, .data.cifar), and the config schema (schema.py) checks a config against the same
tables before torch is imported. Adding a choice: add it here and implement it in the module named
beside its table. Quantizers are the exception: each family is one entry in quantizers.py, whose
registry these tables view.
"""

from __future__ import annotations

# ---- quantizers (one QuantizerSpec per family: esq_lightning/config/quantizers.py) -------------------
# Live read-only views of the quantizer registry: a family registered later appears in them. Re-exported here
# (`X as X`), where the code that implements the names reads them.
from esq_lightning.config.quantizers import (
    FULL_BITS,
)
from esq_lightning.config.quantizers import QUANT_BITS as QUANT_BITS
from esq_lightning.config.quantizers import QUANT_DEFAULT_KIND as QUANT_DEFAULT_KIND
from esq_lightning.config.quantizers import QUANT_FAMILIES as QUANT_FAMILIES
from esq_lightning.config.quantizers import UNIFORM_BITS as UNIFORM_BITS

# quant.act_bits: unsigned activation codes after the ReLUs (quant/modules.py quantize_activations; 32 = off).
ACT_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, FULL_BITS)

# ---- Stochastic Quantization selection (esq_lightning/quant/selection.py) -------------------------
SQ_VARIANTS: tuple[str, ...] = ("paper", "reference")
SQ_FUNCTIONS: tuple[str, ...] = ("constant", "linear", "softmax", "sigmoid")

# ---- training objectives (esq_lightning/training/objectives.py) ----------------------------------
METHODS: tuple[str, ...] = ("natural", "adversarial", "esq", "alp", "trades")

# ---- pairing distances (esq_lightning/pairing/distances.py maps each name to its function) -------
# name -> (logits_only, scale_invariant, shift_invariant, description)
PAIRING_DISTANCES: dict[str, tuple[bool, bool, bool, str]] = {
    "relative_l2": (False, True, False, "the paper's: ||F(x) - F(x_adv)||_2 / ||F(x)||_2 (any layer)"),
    "relative_l1": (False, True, False, "||F(x) - F(x_adv)||_1 / ||F(x)||_1 (any layer)"),
    "centred_l2": (True, True, True, "relative_l2 on centred logits z - mean_k z (logits only)"),
    "log_softmax_l2": (True, False, True, "||log_softmax(z) - log_softmax(z_adv)||_2^2 (logits only)"),
    "kl": (True, False, True, "KL(softmax(z) || softmax(z_adv)) (logits only)"),
}
PAIRING_LOGITS_ONLY: tuple[str, ...] = tuple(n for n, (logits_only, *_) in PAIRING_DISTANCES.items() if logits_only)

# ---- esq-eval modes (esq_lightning/commands/evaluate.py runs each) ----------------------------------
EVAL_MODES: tuple[str, ...] = ("whitebox", "transfer", "amplification", "blackbox", "audit")

# ---- datasets (esq_lightning/data/) ----------------------------------------------------------------
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100")
# (archive, extracted folder) of the official CIFAR python-version archives (data/cifar.py CIFAR_META).
CIFAR_FILES: dict[str, tuple[str, str]] = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python"),
}

# ---- training attacks (esq_lightning/training/attacks.py; conf/attack/*.yaml, docs/fast-training.md) ----------
# pgd: k steps, random start in the eps-ball, projected (the paper's); fgsm: one step from x; fgsm_rs: one step
# of 1.25 eps from a uniform start in the eps-ball, projected (Wong et al. 2020); nfgsm: one step of eps from
# uniform noise in [-2 eps, 2 eps], not projected onto the eps-ball (de Jorge et al. 2022).
TRAIN_ATTACKS: tuple[str, ...] = ("pgd", "fgsm", "fgsm_rs", "nfgsm")
# Names whose attack is one gradient step.
SINGLE_STEP_TRAIN_ATTACKS: tuple[str, ...] = ("fgsm", "fgsm_rs", "nfgsm")
