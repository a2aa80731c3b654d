"""What esq-eval does: evaluate(cfg) runs the mode cfg.mode names (whitebox, audit, transfer, amplification,
blackbox) on trained checkpoints or packed files, and writes its records into the Hydra run directory."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from esq_lightning.artifacts.checkpoint import with_checkpoint_trust
from esq_lightning.artifacts.loading import load_trained_model
from esq_lightning.artifacts.results import SCHEMA_VERSION, build_results, print_results
from esq_lightning.artifacts.runs import resolve_checkpoint
from esq_lightning.atomic import atomic_write_json, atomic_write_text
from esq_lightning.attacks import ATTACKS, check_attack_names, pairing_attack_params
from esq_lightning.commands.checks import validate_eval_config
from esq_lightning.commands.eval_loggers import check_eval_loggers, log_evaluation
from esq_lightning.config.choices import EVAL_MODES
from esq_lightning.config.threat import ThreatModel
from esq_lightning.data import build_datamodule
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation import (
    amplification_curve,
    attack_budget,
    blackbox_curves,
    check_blackbox_attacks,
    format_flags,
    markdown_table,
    measured_at,
    module_names,
    plot_amplification,
    plot_blackbox,
    transfer_matrix,
)
from esq_lightning.evaluation.audit import BUDGETS, CURVE_ATTACKS, audit_markdown, audit_model, plot_audit
from esq_lightning.evaluation.checks import Thresholds, format_verdict
from esq_lightning.evaluation.distributed import launch as launch_processes
from esq_lightning.evaluation.robustbench import check_robustbench, write_model_info
from esq_lightning.evaluation.sequence import EvalSettings, evaluate_model
from esq_lightning.evaluation.store import evaluation_identity, open_store
from esq_lightning.utils import set_threads
from esq_lightning.versions import __version__, package_versions

MODES = EVAL_MODES  # config/choices.py


def run_config_with_eval(train_config: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The training run's config with this evaluation's `eval` and `data` overrides on top."""
    overrides = OmegaConf.create({"eval": cfg.eval, "data": cfg.get("data") or {}, "task_name": "eval"})
    base = OmegaConf.create(train_config)
    # The evaluation's own attack parameters replace the training run's: a checkpoint's stored (resolved)
    # eval.params.fgsm.eps or step sizes would otherwise pin budgets that eval.eps no longer decides.
    if base.get("eval") is not None and "params" in base.eval:
        base.eval.params = {}
    run_cfg = OmegaConf.merge(base, overrides)
    # A typo or bad value in eval.* / data.* fails here in one line, before any data is read.
    validate_eval_config(cfg, run_cfg)
    return run_cfg


@dataclass
class Loaded:
    """One checkpoint of a multi-model mode: its path, model, training config and the label of tables and plots."""

    path: str
    model: torch.nn.Module
    train_config: dict[str, Any]
    label: str


def checkpoint_label(train_config: dict[str, Any]) -> str:
    """`<setting> (<quant>)`, or the experiment name when the setting is `custom` (labels of rows, columns, curves)."""
    setting = train_config.get("setting")
    name = setting if setting and setting != "custom" else train_config.get("experiment_name") or "model"
    quant = (train_config.get("quant") or {}).get("kind", "?")
    return f"{name} ({quant})"


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Labels made unique by a ` #k` suffix on repeats (two seeds of one setting)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def dataset_identity(train_config: dict[str, Any]) -> dict[str, Any]:
    """What decides the test split: the dataset name, and for carved splits (digits) its size and seed."""
    data = train_config.get("data") or {}
    ident = {"name": data.get("name")}
    if "test_size" in data:
        ident.update(test_size=data.get("test_size"), split_seed=data.get("split_seed"))
    return ident


def _resolve(cfg: DictConfig, spec: Any) -> str:
    """A checkpoint path, or `setting:NAME` looked up among the finished runs under paths.runs_root (seed=)."""
    return resolve_checkpoint(str(spec), cfg.paths.runs_root, int(cfg.get("seed", 0)))


def checkpoint_paths(cfg: DictConfig, mode: str) -> list[str]:
    ckpts = [_resolve(cfg, p) for p in (cfg.get("ckpts") or [])]
    if not ckpts and cfg.get("ckpt_path"):
        ckpts = [_resolve(cfg, cfg.ckpt_path)]
    if not ckpts:
        raise ESQUserError(
            f"ckpts: mode={mode} needs checkpoints, e.g. ckpts=[runs/a/checkpoints/final.ckpt,"
            "runs/b/checkpoints/final.ckpt]"
        )
    return ckpts


def load_checkpoints(paths: Sequence[str], mode: str) -> list[Loaded]:
    """Load every checkpoint and check that they share the dataset (one line naming the odd one out)."""
    loaded = []
    for path in paths:
        model, train_config, _, _ = load_trained_model(path)
        loaded.append(Loaded(path, model, train_config, checkpoint_label(train_config)))
    first = dataset_identity(loaded[0].train_config)
    for item in loaded[1:]:
        ident = dataset_identity(item.train_config)
        if ident != first:
            raise ESQUserError(
                f"ckpts: {item.path} was trained on {ident} but {loaded[0].path} on {first}; "
                f"all checkpoints of mode={mode} must share the dataset"
            )
    for item, label in zip(loaded, unique_labels([x.label for x in loaded])):
        item.label = label
    return loaded


def load_test_split(run_cfg: DictConfig, seed: int, n_samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    datamodule = build_datamodule(run_cfg.data, seed=seed)
    datamodule.setup("test")
    x, y = datamodule.test_tensors()
    return (x[:n_samples], y[:n_samples]) if n_samples is not None else (x, y)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _model_records(loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
    keys = ("setting", "experiment_name", "seed")
    out = []
    for item in loaded:
        tc = item.train_config
        out.append(
            {
                "label": item.label,
                "checkpoint": item.path,
                **{k: tc.get(k) for k in keys},
                "model": tc["model"].get("name"),
                "method": tc["method"].get("name"),
                "quant": tc["quant"].get("kind"),
                "bits": int(tc["quant"].get("bits", 32)),
            }
        )
    return out


def _header(
    mode: str, cfg: DictConfig, run_cfg: DictConfig, loaded: Sequence[Loaded], out: Path, n: int
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "esq_lightning_version": __version__,
        "versions": package_versions(),
        "task": "eval",
        "mode": mode,
        "dataset": run_cfg.data.name,
        "seed": int(cfg.seed),
        "n_samples": n,
        "eval_sq_ratio": 1.0,
        "models": _model_records(loaded),
        "run_dir": str(out),
    }


def check_transfer_attack(name: str) -> None:
    """The transfer matrix needs examples within the budget: minimum-norm attacks (DDN, C&W, Boundary) are refused."""
    if ATTACKS[name].kind != "budgeted":
        budgeted = [n for n, s in ATTACKS.items() if s.kind == "budgeted"]
        raise ESQUserError(
            f"eval.transfer.attack: {name} is a minimum-norm attack (its examples are not limited to "
            f"eps, so the matrix would not be accuracy at the budget); allowed: {', '.join(budgeted)}"
        )


@with_checkpoint_trust
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation `cfg.mode` asks for; returns the record it wrote into the Hydra run directory."""
    mode = str(cfg.get("mode") or "whitebox")
    if mode not in MODES:
        raise ESQUserError(f"mode={mode}: unknown evaluation mode; allowed: {', '.join(MODES)}")
    out = output_dir()
    # Never over a training record, never two evaluations at once in one directory (artifacts/rundir.py).
    from esq_lightning.artifacts.rundir import claim_run_dir, release_run_dir

    claimed = claim_run_dir(out, "eval")
    try:
        return _evaluate(cfg, mode, out)
    finally:
        if claimed:
            release_run_dir(out)


def _evaluate(cfg: DictConfig, mode: str, out: Path) -> dict[str, Any]:
    set_threads(cfg.get("threads"))
    check_eval_loggers(cfg)  # logger=wandb|tensorboard (commands/eval_loggers.py): a missing login fails here
    # Here, not at the top: commands/deployed.py (onnxruntime, an optional extra) imports this module.
    from esq_lightning.commands.deployed import evaluate_onnx, is_onnx_file

    onnx_files = [p for p in [cfg.get("ckpt_path"), *(cfg.get("ckpts") or [])] if p and is_onnx_file(p)]
    if onnx_files:
        # An ONNX file runs in onnxruntime: clean, replayed white-box examples and Square (commands/deployed.py).
        if mode != "whitebox" or cfg.get("ckpts"):
            raise ESQUserError(
                f"ckpt_path: {onnx_files[0]} is an ONNX file; it is evaluated alone with mode=whitebox "
                "(ckpt_path=model.onnx); the other modes take checkpoints or packed files"
            )
        return evaluate_onnx(cfg, out)
    if mode == "whitebox":
        return evaluate_whitebox(cfg, out)
    if mode == "audit":
        return evaluate_audit(cfg, out)
    if mode == "transfer":
        check_attack_names([str(cfg.eval.transfer.attack)], "eval.transfer.attack")
        check_transfer_attack(str(cfg.eval.transfer.attack))
    loaded = load_checkpoints(checkpoint_paths(cfg, mode), mode)
    # eps, attack parameters and data resolve against the first checkpoint's config (the models share the data).
    run_cfg = run_config_with_eval(loaded[0].train_config, cfg)
    return {"transfer": evaluate_transfer, "amplification": evaluate_amplification, "blackbox": evaluate_blackbox}[
        mode
    ](cfg, run_cfg, loaded, out)


def evaluate_whitebox(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Clean and per-attack accuracy of one checkpoint, results.json in the training schema + masking report."""
    if not cfg.get("ckpt_path"):
        extra = " (ckpts= is for mode=transfer|amplification|blackbox)" if cfg.get("ckpts") else ""
        raise ESQUserError(
            f"ckpt_path: mode=whitebox evaluates one checkpoint: give ckpt_path=path/to/final.ckpt{extra}"
        )
    check_attack_names(list(cfg.eval.attacks), "eval.attacks")
    check_robustbench(cfg)
    # trainer=ddp_cpu|ddp: one process per device, each on its share of the batches (evaluation/distributed.py).
    shard = launch_processes(cfg.get("trainer"))
    cfg.ckpt_path = _resolve(cfg, cfg.ckpt_path)
    model, train_config, _, _ = load_trained_model(cfg.ckpt_path)
    run_cfg = run_config_with_eval(train_config, cfg)
    datamodule = build_datamodule(run_cfg.data, seed=int(train_config["seed"]))
    datamodule.setup("test")
    x, y = datamodule.test_tensors()
    # The one evaluation sequence (evaluation/sequence.py); pgd_pairing at the checkpoint's own pairing.
    threat = ThreatModel.from_config(run_cfg)
    settings = EvalSettings.from_config(
        run_cfg, train_config, int(cfg.seed), progress=bool(cfg.get("progress", True)) and shard.is_main
    )
    # Per-(attack, batch) results in <run dir>/eval_state, read back when the same command runs again there. The
    # threat model (norm, FGSM's eps factor) is part of what the batches depend on.
    store = open_store(
        out,
        evaluation_identity(
            cfg.ckpt_path,
            x,
            y,
            list(settings.attacks),
            threat.eps,
            {**settings.params, "_threat_model": {"norm": threat.norm, "fgsm_factor": threat.fgsm_factor}},
            settings.n_samples,
            settings.batch_size,
            settings.seed,
        ),
        cfg.get("resume", "auto"),
        shard,
    )
    ev = evaluate_model(model, x, y, threat, settings, device=shard.device, store=store, shard=shard)
    results = build_results(
        run_cfg,
        ev,
        checkpoint=str(cfg.ckpt_path),
        run_dir=str(out),
        mode="whitebox",
        gradient_masking=ev["gradient_masking"],
        processes=shard.world_size,
    )
    if not shard.is_main:
        return results
    atomic_write_json(out / "results.json", results)
    print_results(results)
    print(format_flags(ev["gradient_masking"]), flush=True)
    print(format_verdict(ev["audit"]["verdict"], ev["audit"]["flags"]), flush=True)
    write_model_info(cfg, results, train_config, out)
    log_evaluation(cfg, "whitebox", results, [train_config], out=out)
    return results


def evaluate_transfer(cfg: DictConfig, run_cfg: DictConfig, loaded: Sequence[Loaded], out: Path) -> dict[str, Any]:
    """The transfer matrix of the checkpoints: transfer.json and transfer.md."""
    ev = run_cfg.eval
    attack = str(ev.transfer.attack)
    all_params = OmegaConf.to_container(ev.get("params") or {}, resolve=True)
    eps, params = attack_budget(attack, float(ev.eps), all_params.get(attack, {}))
    x, y = load_test_split(run_cfg, int(loaded[0].train_config["seed"]), ev.n_samples)
    result = transfer_matrix(
        [item.model for item in loaded],
        [item.label for item in loaded],
        x,
        y,
        attack=attack,
        eps=eps,
        params=params,
        batch_size=int(ev.batch_size),
        device=default_device(),
        seed=int(cfg.seed),
        progress=bool(cfg.get("progress", True)),
    )
    record = {
        **_header("transfer", cfg, run_cfg, loaded, out, len(y)),
        **result,
        "threat_model": {"norm": result["params"].get("norm"), "eps": eps},
    }
    table = markdown_table(result)
    atomic_write_json(out / "transfer.json", record)
    atomic_write_text(out / "transfer.md", table)
    print(table, flush=True)
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.md'}", flush=True)
    log_evaluation(cfg, "transfer", record, [item.train_config for item in loaded], out=out)
    return record


def evaluate_amplification(cfg: DictConfig, run_cfg: DictConfig, loaded: Sequence[Loaded], out: Path) -> dict[str, Any]:
    """D_l per residual module for every checkpoint: amplification.json and one PNG with a curve per model."""
    ev = run_cfg.eval
    amp = ev.get("amplification") or {}
    steps = int(amp.get("steps", 10))
    step_size = amp.get("step_size")
    eps = float(ev.eps)
    x, y = load_test_split(run_cfg, int(loaded[0].train_config["seed"]), ev.n_samples)
    curves = []
    for item in loaded:
        try:
            names = module_names(item.model)
        except TypeError as exc:
            raise ESQUserError(f"ckpts: {item.path}: {exc}") from None
        curve = amplification_curve(
            item.model,
            x,
            y,
            eps=eps,
            steps=steps,
            step_size=None if step_size is None else float(step_size),
            norm=str(ev.get("norm", "linf")),
            batch_size=int(ev.batch_size),
            device=default_device(),
            seed=int(cfg.seed),
            modules=names,
            progress=bool(cfg.get("progress", True)),
        )
        curves.append({"label": item.label, "checkpoint": item.path, "measured_at": measured_at(item.model), **curve})
    attack = curves[0]["attack"]
    title = (
        f"{run_cfg.data.name}: {steps}-step PGD, {attack['norm']} eps={eps:.4g}, "
        f"{len(y)} test inputs, eval mode, ratio 1"
    )
    png = plot_amplification(curves, out / "amplification.png", title=title)
    record = {
        **_header("amplification", cfg, run_cfg, loaded, out, len(y)),
        "attack": attack,
        "threat_model": {"norm": attack["norm"], "eps": eps},
        "definition": "D_l = mean over inputs of ||F_l(x) - F_l(x_adv)||_2 / ||F_l(x)||_2, F_l the output of "
        "residual module l (where, per model family: each curve's measured_at), x_adv from PGD "
        "against the measured model; curves[i].logits: D at the logit layer, relative_l2 on raw "
        "logits and centred_l2 on z - mean_k z (docs/pairing.md)",
        "curves": curves,
        "figure": str(png),
    }
    atomic_write_json(out / "amplification.json", record)
    for curve in curves:
        values = " ".join(f"{d:.4f}" for d in curve["d"])
        print(
            f"{curve['label']}: clean {curve['clean_acc']:.4f}, pgd {curve['adv_acc']:.4f}, D_l = {values}; "
            f"logits D {curve['logits']['relative_l2']:.4f}, centred {curve['logits']['centred_l2']:.4f}"
        )
    print(f"wrote {out / 'amplification.json'} and {png}", flush=True)
    log_evaluation(cfg, "amplification", record, [item.train_config for item in loaded], out=out)
    return record


def evaluate_blackbox(cfg: DictConfig, run_cfg: DictConfig, loaded: Sequence[Loaded], out: Path) -> dict[str, Any]:
    """Accuracy vs L2 budget under the black-box attacks for every checkpoint: blackbox.json and blackbox.png."""
    ev = run_cfg.eval
    bb = OmegaConf.to_container(ev.get("blackbox") or {}, resolve=True)
    attacks = list(bb.get("attacks") or [])
    budgets = [float(b) for b in bb.get("budgets") or []]
    if not attacks or not budgets:
        raise ESQUserError(
            "eval.blackbox: give attacks and budgets, e.g. eval.blackbox.attacks=[boundary,nattack] "
            "eval.blackbox.budgets=[0,1,2,3,4]"
        )
    if any(b < 0 for b in budgets):
        raise ESQUserError(f"eval.blackbox.budgets: L2 budgets must be >= 0, got {budgets}")
    params = bb.get("params") or {}
    check_blackbox_attacks(attacks, params)
    n = bb.get("n_samples") if bb.get("n_samples") is not None else ev.n_samples
    x, y = load_test_split(run_cfg, int(loaded[0].train_config["seed"]), n)
    curves = blackbox_curves(
        [item.model for item in loaded],
        [item.label for item in loaded],
        x,
        y,
        attacks=attacks,
        budgets=budgets,
        params=params,
        batch_size=int(ev.batch_size),
        device=default_device(),
        progress=bool(cfg.get("progress", True)),
    )
    title = f"{run_cfg.data.name}: black-box attacks, L2, {len(y)} test inputs, eval mode, ratio 1"
    png = plot_blackbox(curves, out / "blackbox.png", title=title)
    record = {
        **_header("blackbox", cfg, run_cfg, loaded, out, len(y)),
        "norm": "l2",
        "budgets": budgets,
        "attacks": attacks,
        "curves": curves,
        "figure": str(png),
    }
    atomic_write_json(out / "blackbox.json", record)
    for curve in curves:
        accs = " ".join(f"{a:.3f}" for a in curve["accuracy"])
        print(f"{curve['legend']}: {accs}")
    print(f"budgets: {' '.join(f'{b:g}' for b in budgets)}\nwrote {out / 'blackbox.json'} and {png}", flush=True)
    log_evaluation(cfg, "blackbox", record, [item.train_config for item in loaded], out=out)
    return record


def _plain(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def evaluate_audit(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """esq-eval mode=audit (evaluation/audit.py): audit.json, audit.md, audit.png and results.json (one per
    checkpoint)."""
    paths = checkpoint_paths(cfg, "audit")
    loaded = load_checkpoints(paths, "audit")
    run_cfg = run_config_with_eval(loaded[0].train_config, cfg)
    ev_cfg = run_cfg.eval
    if str(ev_cfg.get("norm", "linf")) != "linf":
        raise ESQUserError("eval.norm: mode=audit audits the L_inf threat model; allowed: linf")
    audit_cfg = _plain(ev_cfg.get("audit"))
    budget = str(ev_cfg.get("budget", "standard"))
    threat = ThreatModel.from_config(run_cfg)
    eps = threat.eps
    settings = EvalSettings(
        attacks=list(audit_cfg.get("attacks") or []),
        params=_plain(ev_cfg.get("params")),
        batch_size=int(ev_cfg.batch_size),
        seed=int(cfg.seed),
        masking_tolerance=float(ev_cfg.masking.tolerance),
        thresholds=Thresholds.from_config(_plain(ev_cfg.get("checks"))),
        progress=bool(cfg.get("progress", True)),
    )
    x, y = load_test_split(run_cfg, int(loaded[0].train_config["seed"]), ev_cfg.n_samples)
    records = []
    for i, item in enumerate(loaded):
        rec = audit_model(
            item.model,
            x,
            y,
            threat,
            settings,
            budget=budget,
            pairing=pairing_attack_params(item.train_config),
            eps_factors=[float(f) for f in audit_cfg["eps_factors"]],
            unbounded_eps=audit_cfg["unbounded_eps"],
            device=default_device(),
        )
        rec = {"label": item.label, "checkpoint": item.path, **rec}
        records.append(rec)
        model_cfg = run_config_with_eval(item.train_config, cfg)
        ev = {**rec, "audit": {"verdict": rec["verdict"], "flags": rec["flags"], "budget": budget}}
        results = build_results(model_cfg, ev, checkpoint=item.path, run_dir=str(out), mode="audit")
        target = out / "results.json" if len(loaded) == 1 else out / f"model{i}" / "results.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, results)
        print_results(results)
        print(format_verdict(rec["verdict"], rec["flags"]), flush=True)
    command = "esq-eval " + " ".join(sys.argv[1:]) if sys.argv[1:] else "esq-eval mode=audit"
    title = f"{run_cfg.data.name}: audit ({budget}), L_inf eps={eps:.4g}, {len(y)} test inputs, eval mode, ratio 1"
    png = plot_audit(records, out / "audit.png", title)
    record = {
        **_header("audit", cfg, run_cfg, loaded, out, len(y)),
        "budget": budget,
        "threat_model": {"norm": "linf", "eps": eps},
        "attack_sets": {"attacks": BUDGETS[budget], "curve": CURVE_ATTACKS[budget]},
        "models_audit": records,
        "figure": str(png),
        "command": command,
    }
    atomic_write_json(out / "audit.json", record)
    atomic_write_text(out / "audit.md", audit_markdown(records, eps, run_cfg.data.name, command))
    print(f"wrote {out / 'audit.json'}, {out / 'audit.md'} and {png}", flush=True)
    return record
