"""evaluate(cfg): measure trained checkpoints (whitebox, transfer, amplification, blackbox)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import esq_lightning
from esq_lightning.attacks import ATTACKS, check_attack_names
from esq_lightning.config.choices import EVAL_MODES
from esq_lightning.artifacts.checkpoint import checkpoint_config, load_model_weights, read_checkpoint, with_checkpoint_trust
from esq_lightning.data import build_datamodule
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation import (
    amplification_curve,
    attack_budget,
    blackbox_curves,
    check_blackbox_attacks,
    evaluate_robustness,
    format_flags,
    markdown_table,
    module_names,
    measured_at,
    plot_amplification,
    plot_blackbox,
    transfer_matrix,
)
from esq_lightning.evaluation.distributed import launch as launch_processes
from esq_lightning.evaluation.store import evaluation_identity, open_store
from esq_lightning.evaluation.loggers import check_eval_loggers, log_evaluation
from esq_lightning.evaluation.robustbench import check_robustbench, write_model_info
from esq_lightning.artifacts.results import SCHEMA_VERSION, build_results, print_results
from esq_lightning.utils import set_threads
from esq_lightning.artifacts.atomic import atomic_write_json, atomic_write_text
from esq_lightning.versions import package_versions

MODES = EVAL_MODES  # config/choices.py


def run_config_with_eval(train_config: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The training run's config with this evaluation's `eval` and `data` overrides on top."""
    from esq_lightning.config.schema import validate_eval_config

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


def load_trained_model(ckpt_path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier of a checkpoint written by esq-train (quantized layers and all), and its run config.

    A packed file of esq-export (model.esq) gives its rebuilt model (the dequantized weights, no quantization
    code) and the training config it carries, so every mode evaluates the file as shipped.
    """
    from esq_lightning.artifacts.export import is_packed_file, load_packed_for_eval
    from esq_lightning.training.train import build_network

    if is_packed_file(ckpt_path):
        return load_packed_for_eval(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    train_config = checkpoint_config(ckpt, ckpt_path)
    model = build_network(train_config["model"], train_config["quant"])
    load_model_weights(model, ckpt_path)
    model.eval()
    return model, train_config


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
    from esq_lightning.artifacts.runs import resolve_checkpoint

    return resolve_checkpoint(str(spec), cfg.paths.runs_root, int(cfg.get("seed", 0)))


def checkpoint_paths(cfg: DictConfig, mode: str) -> list[str]:
    ckpts = [_resolve(cfg, p) for p in (cfg.get("ckpts") or [])]
    if not ckpts and cfg.get("ckpt_path"):
        ckpts = [_resolve(cfg, cfg.ckpt_path)]
    if not ckpts:
        raise ESQUserError(f"ckpts: mode={mode} needs checkpoints, e.g. ckpts=[runs/a/checkpoints/final.ckpt,"
                           "runs/b/checkpoints/final.ckpt]")
    return ckpts


def load_checkpoints(paths: Sequence[str], mode: str) -> list[Loaded]:
    """Load every checkpoint and check that they share the dataset (one line naming the odd one out)."""
    loaded = []
    for path in paths:
        model, train_config = load_trained_model(path)
        loaded.append(Loaded(path, model, train_config, checkpoint_label(train_config)))
    first = dataset_identity(loaded[0].train_config)
    for item in loaded[1:]:
        ident = dataset_identity(item.train_config)
        if ident != first:
            raise ESQUserError(f"ckpts: {item.path} was trained on {ident} but {loaded[0].path} on {first}; "
                               f"all checkpoints of mode={mode} must share the dataset")
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
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _model_records(loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
    keys = ("setting", "experiment_name", "seed")
    out = []
    for item in loaded:
        tc = item.train_config
        out.append({"label": item.label, "checkpoint": item.path, **{k: tc.get(k) for k in keys},
                    "model": tc["model"].get("name"), "method": tc["method"].get("name"),
                    "quant": tc["quant"].get("kind"), "bits": int(tc["quant"].get("bits", 32))})
    return out


def _header(mode: str, cfg: DictConfig, run_cfg: DictConfig, loaded: Sequence[Loaded], out: Path,
            n: int) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "esq_lightning_version": esq_lightning.__version__,
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
        raise ESQUserError(f"eval.transfer.attack: {name} is a minimum-norm attack (its examples are not limited to "
                           f"eps, so the matrix would not be accuracy at the budget); allowed: {', '.join(budgeted)}")


@with_checkpoint_trust
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation `cfg.mode` asks for; returns the record it wrote into the Hydra run directory."""
    mode = str(cfg.get("mode") or "whitebox")
    if mode not in MODES:
        raise ESQUserError(f"mode={mode}: unknown evaluation mode; allowed: {', '.join(MODES)}")
    out = output_dir()
    set_threads(cfg.get("threads"))
    check_eval_loggers(cfg)  # logger=wandb|tensorboard (evaluation/loggers.py): a missing login fails here
    from esq_lightning.evaluation.deployed import evaluate_onnx, is_onnx_file

    onnx_files = [p for p in [cfg.get("ckpt_path"), *(cfg.get("ckpts") or [])] if p and is_onnx_file(p)]
    if onnx_files:
        # An ONNX file runs in onnxruntime: clean, replayed white-box examples and Square (evaluation/deployed.py).
        if mode != "whitebox" or cfg.get("ckpts"):
            raise ESQUserError(f"ckpt_path: {onnx_files[0]} is an ONNX file; it is evaluated alone with mode=whitebox "
                               "(ckpt_path=model.onnx); the other modes take checkpoints or packed files")
        return evaluate_onnx(cfg, out)
    if mode == "whitebox":
        return evaluate_whitebox(cfg, out)
    if mode == "audit":
        from esq_lightning.evaluation.audit import evaluate_audit

        return evaluate_audit(cfg, out)
    if mode == "transfer":
        check_attack_names([str(cfg.eval.transfer.attack)], "eval.transfer.attack")
        check_transfer_attack(str(cfg.eval.transfer.attack))
    loaded = load_checkpoints(checkpoint_paths(cfg, mode), mode)
    # eps, attack parameters and data resolve against the first checkpoint's config (the models share the data).
    run_cfg = run_config_with_eval(loaded[0].train_config, cfg)
    return {"transfer": evaluate_transfer, "amplification": evaluate_amplification,
            "blackbox": evaluate_blackbox}[mode](cfg, run_cfg, loaded, out)


def evaluate_whitebox(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Clean and per-attack accuracy of one checkpoint, results.json in the training schema + masking report."""
    if not cfg.get("ckpt_path"):
        extra = " (ckpts= is for mode=transfer|amplification|blackbox)" if cfg.get("ckpts") else ""
        raise ESQUserError(
            f"ckpt_path: mode=whitebox evaluates one checkpoint: give ckpt_path=path/to/final.ckpt{extra}")
    check_attack_names(list(cfg.eval.attacks), "eval.attacks")
    check_robustbench(cfg)
    # trainer=ddp_cpu|ddp: one process per device, each on its share of the batches (evaluation/distributed.py).
    shard = launch_processes(cfg.get("trainer"))
    cfg.ckpt_path = _resolve(cfg, cfg.ckpt_path)
    model, train_config = load_trained_model(cfg.ckpt_path)
    run_cfg = run_config_with_eval(train_config, cfg)
    datamodule = build_datamodule(run_cfg.data, seed=int(train_config["seed"]))
    datamodule.setup("test")
    x, y = datamodule.test_tensors()
    # --- worst case, checks and verdict (evaluation/checks.py); pgd_pairing at the checkpoint's own pairing ---
    from esq_lightning.attacks import pairing_attack_params
    from esq_lightning.evaluation.checks import Thresholds, evaluation_checks, format_verdict
    from esq_lightning.evaluation.threat import fgsm_factor

    params = OmegaConf.to_container(run_cfg.eval.get("params") or {}, resolve=True)
    params["pgd_pairing"] = {**pairing_attack_params(train_config), **(params.get("pgd_pairing") or {})}
    norm = str(run_cfg.eval.get("norm", "linf"))
    factor = fgsm_factor(run_cfg)
    # Per-(attack, batch) results in <run dir>/eval_state, read back when the same command runs again there. The
    # threat model (norm, FGSM's eps factor) is part of what the batches depend on.
    store = open_store(out, evaluation_identity(
        cfg.ckpt_path, x, y, list(run_cfg.eval.attacks), float(run_cfg.eval.eps),
        {**params, "_threat_model": {"norm": norm, "fgsm_factor": factor}}, run_cfg.eval.n_samples,
        int(run_cfg.eval.batch_size), int(cfg.seed)), cfg.get("resume", "auto"), shard)
    ev = evaluate_robustness(
        model, x, y, attacks=list(run_cfg.eval.attacks), eps=float(run_cfg.eval.eps), params=params,
        n_samples=run_cfg.eval.n_samples, batch_size=int(run_cfg.eval.batch_size), device=shard.device,
        seed=int(cfg.seed), progress=bool(cfg.get("progress", True)) and shard.is_main,
        masking_tolerance=float(run_cfg.eval.masking.tolerance),
        store=store, shard=shard, norm=norm, on_gradient_error="record", fgsm_factor=factor,
    )
    if shard.is_main:  # the checks run once, on the merged masks; rank 0 writes and prints the results
        ev["audit"] = evaluation_checks(model, x, y, ev, norm, float(run_cfg.eval.eps),
                                        Thresholds.from_config(run_cfg.eval.get("checks")), device=shard.device,
                                        batch_size=int(run_cfg.eval.batch_size), seed=int(cfg.seed))
    results = build_results(run_cfg, ev, checkpoint=str(cfg.ckpt_path), run_dir=str(out), mode="whitebox",
                            gradient_masking=ev["gradient_masking"], processes=shard.world_size)
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
        [item.model for item in loaded], [item.label for item in loaded], x, y, attack=attack, eps=eps,
        params=params, batch_size=int(ev.batch_size), device=default_device(), seed=int(cfg.seed),
        progress=bool(cfg.get("progress", True)),
    )
    record = {**_header("transfer", cfg, run_cfg, loaded, out, len(y)), **result,
              "threat_model": {"norm": result["params"].get("norm"), "eps": eps}}
    table = markdown_table(result)
    atomic_write_json(out / "transfer.json", record)
    atomic_write_text(out / "transfer.md", table)
    print(table, flush=True)
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.md'}", flush=True)
    log_evaluation(cfg, "transfer", record, [item.train_config for item in loaded], out=out)
    return record


def evaluate_amplification(cfg: DictConfig, run_cfg: DictConfig, loaded: Sequence[Loaded],
                           out: Path) -> dict[str, Any]:
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
            item.model, x, y, eps=eps, steps=steps, step_size=None if step_size is None else float(step_size),
            norm=str(ev.get("norm", "linf")), batch_size=int(ev.batch_size), device=default_device(),
            seed=int(cfg.seed), modules=names, progress=bool(cfg.get("progress", True)),
        )
        curves.append({"label": item.label, "checkpoint": item.path, "measured_at": measured_at(item.model), **curve})
    attack = curves[0]["attack"]
    title = (f"{run_cfg.data.name}: {steps}-step PGD, {attack['norm']} eps={eps:.4g}, "
             f"{len(y)} test inputs, eval mode, ratio 1")
    png = plot_amplification(curves, out / "amplification.png", title=title)
    record = {**_header("amplification", cfg, run_cfg, loaded, out, len(y)), "attack": attack,
              "threat_model": {"norm": attack["norm"], "eps": eps},
              "definition": "D_l = mean over inputs of ||F_l(x) - F_l(x_adv)||_2 / ||F_l(x)||_2, F_l the output of "
                            "residual module l (where, per model family: each curve's measured_at), x_adv from PGD "
                            "against the measured model; curves[i].logits: D at the logit layer, relative_l2 on raw "
                            "logits and centred_l2 on z - mean_k z (docs/pairing.md)",
              "curves": curves, "figure": str(png)}
    atomic_write_json(out / "amplification.json", record)
    for curve in curves:
        values = " ".join(f"{d:.4f}" for d in curve["d"])
        print(f"{curve['label']}: clean {curve['clean_acc']:.4f}, pgd {curve['adv_acc']:.4f}, D_l = {values}; "
              f"logits D {curve['logits']['relative_l2']:.4f}, centred {curve['logits']['centred_l2']:.4f}")
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
        raise ESQUserError("eval.blackbox: give attacks and budgets, e.g. eval.blackbox.attacks=[boundary,nattack] "
                           "eval.blackbox.budgets=[0,1,2,3,4]")
    if any(b < 0 for b in budgets):
        raise ESQUserError(f"eval.blackbox.budgets: L2 budgets must be >= 0, got {budgets}")
    params = bb.get("params") or {}
    check_blackbox_attacks(attacks, params)
    n = bb.get("n_samples") if bb.get("n_samples") is not None else ev.n_samples
    x, y = load_test_split(run_cfg, int(loaded[0].train_config["seed"]), n)
    curves = blackbox_curves(
        [item.model for item in loaded], [item.label for item in loaded], x, y, attacks=attacks, budgets=budgets,
        params=params, batch_size=int(ev.batch_size), device=default_device(), progress=bool(cfg.get("progress", True)),
    )
    title = f"{run_cfg.data.name}: black-box attacks, L2, {len(y)} test inputs, eval mode, ratio 1"
    png = plot_blackbox(curves, out / "blackbox.png", title=title)
    record = {**_header("blackbox", cfg, run_cfg, loaded, out, len(y)), "norm": "l2", "budgets": budgets,
              "attacks": attacks, "curves": curves, "figure": str(png)}
    atomic_write_json(out / "blackbox.json", record)
    for curve in curves:
        accs = " ".join(f"{a:.3f}" for a in curve["accuracy"])
        print(f"{curve['legend']}: {accs}")
    print(f"budgets: {' '.join(f'{b:g}' for b in budgets)}\nwrote {out / 'blackbox.json'} and {png}", flush=True)
    log_evaluation(cfg, "blackbox", record, [item.train_config for item in loaded], out=out)
    return record
