"""RobustBench's model-info JSON from a white-box evaluation (esq-eval robustbench.write=true).

The fields are those of RobustBench's model_info/<dataset>/<Linf|L2>/<ModelName>.json files: link, name, authors,
additional_data, number_forward_passes, dataset, venue, architecture, eps (a fraction string like "8/255" for
L_inf), clean_acc, reported, autoattack_acc (percentages as strings with two decimals), footnote. esq-lightning
fills what it measured (clean and AutoAttack accuracy, eps, architecture, the weight bit width in the footnote);
the paper's fields (link, name, authors, venue, reported) come from `robustbench.*` or stay null.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

from esq_lightning.atomic import atomic_write_json
from esq_lightning.config.quantizers import QUANTIZER_SPECS
from esq_lightning.errors import ESQUserError

FIELDS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "footnote",
)
ARCHITECTURES = {
    "wrn28_10": "WideResNet-28-10",
    "resnet152": "ResNet-152",
    "resnet20": "ResNet-20",
    "resnet56": "ResNet-56",
    "preact_resnet18": "PreActResNet-18",
    "small_cnn": "SmallCNN",
}
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}
FULL_TEXT = "full-precision weights (32 bits)"
# RobustBench evaluates on the full test set.
FULL_TEST_SET = 10000


def quant_text(kind: str) -> str:
    """The words for the weights of quantizer family ``kind`` (its entry's text, config/quantizers.py)."""
    if kind == "full":
        return FULL_TEXT
    spec = QUANTIZER_SPECS.get(kind)
    return spec.text if spec is not None else kind


def eps_string(eps: float, norm: str) -> str:
    """`8/255` for an L_inf budget on the 1/255 grid (RobustBench's notation), else the shortest exact decimal."""
    if norm == "linf":
        k = eps * 255
        if abs(k - round(k)) < 1e-6 and round(k) > 0:
            return f"{round(k)}/255"
        frac = Fraction(eps).limit_denominator(10000)
        if abs(float(frac) - eps) < 1e-12:
            return f"{frac.numerator}/{frac.denominator}" if frac.denominator != 1 else str(frac.numerator)
    return f"{eps:g}"


def _percent(acc: float) -> str:
    return f"{100 * float(acc):.2f}"


def model_info(
    results: Mapping[str, Any], train_config: Mapping[str, Any], fields: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The model-info record of a white-box results record that includes the `autoattack` attack."""
    fields = dict(fields or {})
    robust = results.get("robust_acc") or {}
    if "autoattack" not in robust:
        raise ESQUserError(
            "robustbench.write=true: the RobustBench file needs AutoAttack accuracy; add autoattack to "
            f"eval.attacks (got {list(robust)}), e.g. eval.attacks=[autoattack]"
        )
    used = (results.get("attacks") or {}).get("autoattack") or {}
    norm = str(used.get("norm") or (results.get("threat_model") or {}).get("norm") or "linf")
    eps = float(used.get("eps", (results.get("threat_model") or {}).get("eps")))
    model = (train_config.get("model") or {}).get("name")
    quant = train_config.get("quant") or {}
    kind = str(quant.get("kind", "full"))
    bits = int(quant.get("bits", 32))
    n = int(results.get("n_samples") or 0)
    notes = [
        f"{quant_text(kind)}: {bits}-bit weights"
        + (", first and last layers full precision" if quant.get("keep_first_last") else ""),
        f"trained with {(train_config.get('method') or {}).get('name')} (setting {train_config.get('setting')})",
        f"clean and AutoAttack ({used.get('version', 'standard')}) accuracy on {n} test points"
        + ("" if n >= FULL_TEST_SET else f" (RobustBench uses the full {FULL_TEST_SET})"),
        "evaluated in eval mode at full quantization by esq-lightning",
    ]
    info = {
        "link": fields.get("link"),
        "name": fields.get("name"),
        "authors": fields.get("authors"),
        "additional_data": bool(fields.get("additional_data", False)),
        "number_forward_passes": 1,
        "dataset": results.get("dataset"),
        "venue": fields.get("venue"),
        "architecture": fields.get("architecture") or ARCHITECTURES.get(str(model), str(model)),
        "eps": eps_string(eps, norm),
        "clean_acc": _percent(results["clean_acc"]),
        "reported": None if fields.get("reported") is None else str(fields["reported"]),
        "autoattack_acc": _percent(robust["autoattack"]),
        "footnote": "; ".join(notes) + ".",
    }
    return {k: info[k] for k in FIELDS}


def check_robustbench(cfg: Any) -> None:
    """Before evaluating: robustbench.write=true needs autoattack among eval.attacks (and mode=whitebox)."""
    rb = cfg.get("robustbench") or {}
    if not rb.get("write"):
        return
    if str(cfg.get("mode") or "whitebox") != "whitebox":
        raise ESQUserError(
            f"robustbench.write=true: the RobustBench file comes from mode=whitebox, not mode={cfg.mode}"
        )
    attacks = [str(a) for a in (cfg.eval.get("attacks") or [])]
    if "autoattack" not in attacks:
        raise ESQUserError(
            "robustbench.write=true: the RobustBench file needs AutoAttack accuracy; add autoattack to "
            f"eval.attacks (got {attacks}), e.g. eval.attacks=[autoattack]"
        )


def write_model_info(cfg: Any, results: Mapping[str, Any], train_config: Mapping[str, Any], out: Path) -> Path | None:
    """With robustbench.write=true: <out>/robustbench/<dataset>/<Linf|L2>/<model_name>.json; returns its path."""
    from omegaconf import OmegaConf

    rb = cfg.get("robustbench") or {}
    if not rb.get("write"):
        return None
    fields = OmegaConf.to_container(rb, resolve=True) if not isinstance(rb, dict) else dict(rb)
    info = model_info(results, train_config, fields)
    norm = str(((results.get("attacks") or {}).get("autoattack") or {}).get("norm") or "linf")
    name = str(fields.get("model_name") or train_config.get("experiment_name") or "model")
    path = Path(out) / "robustbench" / str(info["dataset"]) / THREAT_MODELS.get(norm, norm) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, info)
    print(f"wrote RobustBench model info {path}", flush=True)
    return path
