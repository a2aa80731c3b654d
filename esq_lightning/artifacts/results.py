"""results.json: one record per run (training or evaluation), the source of every table and figure."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from esq_lightning.config.threat import threat_model
from esq_lightning.versions import __version__, package_versions

SCHEMA_VERSION = 1


def train_threat_model(cfg: DictConfig) -> dict[str, Any] | None:
    """The attack a run trained against (callbacks.pgd's norm and eps), None without one. A start found by
    init_from=setting:NAME must have trained against the same one."""
    pgd = (cfg.get("callbacks") or {}).get("pgd")
    if pgd is None:
        return None
    return {"norm": str(pgd.get("norm", "linf")), "eps": float(pgd.eps)}


def train_attack_record(cfg: DictConfig) -> dict[str, Any] | None:
    """What the training attack was (callbacks.pgd; training/attacks.py), None without one: name, eps, steps, step
    size, the half-width of its random start (noise, 0 without one), whether it projects onto the eps-ball, and
    the GradAlign weight. A run written before the names existed trained with pgd."""
    pgd = (cfg.get("callbacks") or {}).get("pgd")
    if pgd is None:
        return None
    eps = float(pgd.eps)
    random_start = bool(pgd.get("random_start", True))
    noise = pgd.get("noise")
    return {
        "name": str(pgd.get("name") or "pgd"),
        "eps": eps,
        "steps": int(pgd.steps),
        "step_size": float(pgd.step_size),
        "random_start": random_start,
        "noise": (eps if noise is None else float(noise)) if random_start else 0.0,
        "project": bool(pgd.get("project", True)),
        "gradalign": float(pgd.get("gradalign") or 0.0),
    }


def train_attack_label(record: dict[str, Any] | None) -> str | None:
    """A short name of a training attack record for report rows: pgd10, fgsm_rs, nfgsm, fgsm_rs+gradalign0.2."""
    if not record:
        return None
    name = str(record.get("name") or "pgd")
    label = f"pgd{int(record.get('steps', 0))}" if name == "pgd" else name
    if record.get("gradalign"):
        label += f"+gradalign{float(record['gradalign']):g}"
    return label


# The capacity knobs of the model configs (conf/model/*.yaml): SmallCNN and the ResNets take `width` (channels of
# the first stage), the Wide ResNet also `widen_factor`.
WIDTH_KEYS = ("width", "widen_factor")


def model_width(cfg_model: Any) -> dict[str, int]:
    """{knob: value} of the model's capacity knobs that its config sets (results.json `model_width`)."""
    return {k: int(cfg_model.get(k)) for k in WIDTH_KEYS if cfg_model.get(k) is not None}


# Keys of a run's config that change how it is watched, logged, evaluated, computed or where it writes, not what it
# trains (the names and the labels derived from the others are left out too). Everything else is the run's training
# config (results.json `train_config`): what `setting:NAME` tells candidates apart by and what esq-report groups on.
NOT_TRAINING_KEYS = (
    "logger",
    "threads",
    "trust_checkpoint",
    "ckpt_path",
    "tags",
    "optimized_metric",
    "paths",
    "eval",
    "hparams_search",
    "channels_last",
    "compile",
    "init_seed",
    "task_name",
    "experiment_name",
    "setting",
    "progress",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.accelerator",
    "data.data_dir",
    "data.num_workers",
    "hydra",
    "callbacks.checkpoint",
)
# NOT_TRAINING_KEYS are also what a resume may change (artifacts/checkpoint.py RESUME_MAY_CHANGE).


def flatten(tree: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """{dotted key: leaf value} of a nested mapping (lists are leaves), without the keys in `skip` and below them."""
    if prefix in skip:
        return {}
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key in sorted(tree, key=str):
            out.update(flatten(tree[key], f"{prefix}.{key}" if prefix else str(key), skip))
        return out
    return {prefix: tree}


def training_config(cfg: Any) -> dict[str, Any]:
    """The run's training config: {dotted key: value} of every key but NOT_TRAINING_KEYS (values resolved)."""
    if isinstance(cfg, DictConfig):
        try:
            tree = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # a partial config (the Python API's, a stored checkpoint's) keeps its interpolations
            tree = OmegaConf.to_container(cfg, resolve=False)
    else:
        tree = dict(cfg or {})
    return flatten(tree, skip=NOT_TRAINING_KEYS)


def build_results(cfg: DictConfig, ev: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The results record of a run: config identity, accuracies as fractions, threat model, timing."""
    pairing = cfg.get("pairing") or {}
    return {
        "schema_version": SCHEMA_VERSION,
        "esq_lightning_version": __version__,
        # torch, Lightning, numpy, ... as installed (constraints.txt pins the ones the test suite passed with).
        "versions": package_versions(),
        "task": cfg.get("task_name", "train"),
        "experiment": cfg.get("experiment_name"),
        "setting": cfg.get("setting"),
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "quant": cfg.quant.kind,
        "bits": int(cfg.quant.get("bits", 32)),
        "act_bits": int(cfg.quant.get("act_bits", 32)),
        "model_width": model_width(cfg.model),
        "pairing": {
            "layers": list(pairing.get("layers", [])),
            "lambdas": [float(v) for v in pairing.get("lambdas", [])],
            "p": int(pairing.get("p") or 2),
            "distance": _distance_name(pairing),
        },
        "seed": int(cfg.seed),
        "init_from": cfg.get("init_from"),
        # Every key that changes what is trained, so runs are told apart and grouped by their whole config.
        "train_config": training_config(cfg),
        "clean_acc": ev["clean_acc"],
        "robust_acc": ev["robust_acc"],
        "attacks": ev["attacks"],
        "threat_model": threat_model(cfg, ev["attacks"]),
        "train_threat_model": train_threat_model(cfg),
        "train_attack": train_attack_record(cfg),
        "n_samples": ev["n_samples"],
        "eval_sq_ratio": 1.0,
        # The per-sample worst case at the threat model (evaluation/worstcase.py): robust_acc.worst_case and which
        # attacks entered it; the checks' verdict and flags (evaluation/checks.py) when they ran.
        **({"worst_case": ev["worst_case"]} if ev.get("worst_case") else {}),
        **({"audit": ev["audit"]} if ev.get("audit") else {}),
        **extra,
    }


# A run whose mean logit offset carries more of ||z|| than the centred logits do gets the named warning
# LOGIT_OFFSET_WARNING: sqrt(K) |mean_k z| > OFFSET_WARN_RATIO * ||z - mean_k z|| (means over the test inputs).
# Above 1, more than half of ||z||^2 is a common offset that changes no prediction: the paper's relative
# distance on the logits has been lowered by drift rather than by silencing errors.
LOGIT_OFFSET_WARNING = "logit_offset_drift"
OFFSET_WARN_RATIO = 1.0


def _distance_name(pairing: Any) -> str:
    distance, p = pairing.get("distance"), pairing.get("p")
    return str(distance) if distance is not None else f"relative_l{int(p or 2)}"


def logit_offset_warnings(stats: dict[str, float], ratio: float = OFFSET_WARN_RATIO) -> list[dict[str, Any]]:
    """[] or the one named warning for results.json["warnings"], from esq_lightning.pairing.logit_offset_stats."""
    if not stats["offset_ratio"] > ratio:
        return []
    return [
        {
            "name": LOGIT_OFFSET_WARNING,
            "message": f"the mean logit offset ({stats['offset']:.3g}) carries {stats['offset_ratio']:.2f}x the norm "
            f"of the centred logits ({stats['centred_norm']:.3g}), above {ratio:g}x: a relative distance "
            "on raw logits can fall by this drift alone; read D_centred/logits (docs/pairing.md)",
            "offset": stats["offset"],
            "centred_norm": stats["centred_norm"],
            "offset_ratio": stats["offset_ratio"],
            "threshold": ratio,
        }
    ]


def format_table(results: dict[str, Any]) -> str:
    """A small plain-text table of a results record."""
    rows = [
        ("dataset", results["dataset"]),
        ("model", results["model"]),
        ("setting", results.get("setting")),
        ("method", results["method"]),
        ("quant", results["quant"]),
        ("seed", results["seed"]),
        ("threat model", f"{results['threat_model']['norm']} eps={results['threat_model']['eps']:.4g}"),
        ("n_samples", results["n_samples"]),
        ("clean_acc", f"{results['clean_acc']:.4f}"),
    ]
    for name, acc in results["robust_acc"].items():
        eps = results["attacks"].get(name, {}).get("eps")
        label = f"{name} acc" + (f" (eps={eps:.4g})" if isinstance(eps, (int, float)) else "")
        if name == "worst_case" and results.get("worst_case"):
            label = f"worst_case acc (all {len(results['worst_case']['attacks'])} attacks at the threat model)"
        rows.append((label, f"{acc:.4f}"))
    audit = results.get("audit") or {}
    if audit.get("verdict"):
        rows.append(
            (
                "verdict",
                f"{audit['verdict']}"
                + (f" ({', '.join(f['name'] for f in audit.get('flags', []))})" if audit.get("flags") else ""),
            )
        )
    if results.get("sq_ratio_final") is not None:
        ratio = float(results["sq_ratio_final"])
        rows.append(("sq_ratio_final", f"{ratio:g}" + ("" if ratio >= 1 else " (below 1: flag sq_schedule_short)")))
    for key in ("epochs", "train_seconds", "checkpoint"):
        if key in results:
            value = results[key]
            rows.append((key, f"{value:.1f}" if isinstance(value, float) else value))
    width = max(len(str(k)) for k, _ in rows)
    line = "-" * (width + 2 + max(len(str(v)) for _, v in rows))
    return "\n".join([line, *(f"{str(k).ljust(width)}  {v}" for k, v in rows), line])


def print_results(results: dict[str, Any]) -> None:
    print(format_table(results), flush=True)
