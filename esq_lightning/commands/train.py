"""What esq-train does: train(cfg) builds data, model, module, callbacks and loggers from a Hydra config, fits,
evaluates the final model on the test split (evaluation/sequence.py) and writes results.json."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from esq_lightning.artifacts.checkpoint import (
    check_resume_checkpoint,
    check_something_left,
    keep_metrics_of_interrupted_run,
    load_model_weights,
    merge_resumed_metrics,
    resolve_resume_path,
    with_checkpoint_trust,
)
from esq_lightning.artifacts.loading import add_act_quant, build_network
from esq_lightning.artifacts.results import (
    build_results,
    logit_offset_warnings,
    model_width,
    print_results,
    train_threat_model,
)
from esq_lightning.artifacts.rundir import claim_run_dir, release_run_dir
from esq_lightning.artifacts.runs import resolve_init_from
from esq_lightning.atomic import atomic_write_json
from esq_lightning.attacks import frozen_eval
from esq_lightning.commands.checks import validate_config
from esq_lightning.config.threat import ThreatModel
from esq_lightning.data import build_datamodule
from esq_lightning.errors import ESQUserError, EvaluationFailed
from esq_lightning.evaluation.checks import format_verdict, sq_schedule_flags, unattackable_verdict
from esq_lightning.evaluation.sequence import EvalSettings, evaluate_model
from esq_lightning.notices import quiet_wandb_logger
from esq_lightning.pairing import check_pairing_names, logit_offset_stats, resolve_distance
from esq_lightning.quant import calibrate_act_quant, full_quantization, quantize_model
from esq_lightning.quant.packing import packed_size
from esq_lightning.training.callbacks.collapse import CollapseMonitor
from esq_lightning.training.callbacks.progress import progress_callbacks, progress_enabled
from esq_lightning.training.checkpoint_io import AtomicCheckpointIO
from esq_lightning.training.loggers import log_results_table, restore_wandb_env, snapshot_wandb_env, wandb_logger_config
from esq_lightning.training.module import ESQModule
from esq_lightning.training.objectives import Objective
from esq_lightning.utils import set_threads

# The named warning of a run whose quantization-ratio schedule ended below 1 (results.json warnings).
# Training inputs that calibrate the activation clipping ranges (quant.act_bits < 32).
ACT_CALIBRATION_SAMPLES = 256


def allocate_mixed_precision(cfg: DictConfig, model: nn.Module, datamodule: Any) -> dict[str, Any]:
    """quant.budget_bytes: the robustness-aware bit allocation (compress/mixed.py), applied to ``model`` in place.

    The sensitivity inputs are quant.sensitivity_samples validation inputs drawn with the run's seed."""
    from esq_lightning.compress.mixed import allocate_bits

    q = cfg.quant
    datamodule.setup("fit")
    x, y = datamodule.val_tensors()
    n = min(int(q.sensitivity_samples), len(x))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(cfg.seed)))[:n]
    try:
        alloc = allocate_bits(model, x[idx], y[idx], float(cfg.eval.eps), list(q.allocate_bits), int(q.budget_bytes))
    except ValueError as exc:
        raise ESQUserError(str(exc)) from None
    quantize_model(
        model, q.kind, per_filter=q.per_filter, variant=q.variant, f=q.f, bits=q.bits, layer_bits=alloc["layer_bits"]
    )
    return alloc


def build_objective(cfg: DictConfig) -> Objective:
    method = cfg.method
    pairing = cfg.pairing
    return Objective(
        name=method.name,
        pairing_layers=list(pairing.layers),
        pairing_lambdas=[float(v) for v in pairing.lambdas],
        pairing_p=int(pairing.get("p") or 2),
        pairing_distance=resolve_distance(pairing.get("distance"), pairing.get("p")),
        # Only the method that uses it has the key (conf/method/alp.yaml, trades.yaml; the schema checks it).
        alp_lambda=method.get("alp_lambda"),
        trades_beta=method.get("trades_beta"),
        pairing_warmup_epochs=int(pairing.warmup_epochs),
    )


def compile_model(model: nn.Module, pairing_layers: list[str], **compile_kwargs: Any) -> nn.Module:
    """torch.compile the classifier (`compile: true`); docs/performance.md has the costs.

    Pairing at inner modules captures their outputs with forward hooks added around each pass. By
    default dynamo does not guard on module hooks, so a compiled model would silently skip them;
    guarding costs one more graph (hooks on vs off), compiled once and reused every step.
    """
    if any(name != "logits" for name in pairing_layers):
        import torch._dynamo.config as dynamo_config  # loads the compiler stack: only with compile: true

        dynamo_config.skip_nnmodule_hook_guards = False
    return torch.compile(model, **compile_kwargs)


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if conf is None:
            continue
        # conf/logger/wandb.yaml sets offline: true; an entry without the key is online (WandbLogger's default).
        if name == "wandb" and not conf.get("offline"):
            _require_wandb_login()
        if name == "tensorboard":
            _require_tensorboard()
        if name == "wandb":
            # Tags from the config plus setting/quant/method/data/model, so a sweep's runs filter by them.
            conf = wandb_logger_config(cfg, conf)
        logger = instantiate(conf)
        if name == "wandb":
            logger = quiet_wandb_logger(logger)
        loggers.append(logger)
    return loggers


def _require_wandb_login() -> None:
    import wandb  # optional (logger=wandb): imported only when asked for

    if not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
        raise ESQUserError(
            "logger.wandb.offline=false needs a W&B login: run `wandb login` or set WANDB_API_KEY "
            "(or keep the default offline mode and `wandb sync` later)"
        )


def _require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ESQUserError("logger=tensorboard needs the tensorboard package: pip install tensorboard")


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[pl.Callback]:
    callbacks = [instantiate(conf) for conf in (cfg.get("callbacks") or {}).values() if conf is not None]
    # LearningRateMonitor refuses to run without a logger; with logger=none there is nothing to monitor into.
    return [cb for cb in callbacks if has_logger or not isinstance(cb, pl.callbacks.LearningRateMonitor)]


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def resolve_ckpt_path(spec: str | None, out: Path) -> str | None:
    if spec is None:
        return None
    return str(resolve_resume_path(str(spec), out))


@with_checkpoint_trust
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and evaluate one run; returns (results, objects)."""
    out = output_dir()
    # Every config error fails here, in one line, before any data is read (docs/reliability.md).
    validate_config(cfg)
    # The run directory belongs to this run while it works (artifacts/rundir.py); esq-train claimed it already.
    claimed = claim_run_dir(out, "train", None if cfg.get("ckpt_path") is None else str(cfg.ckpt_path))
    try:
        return _train(cfg, out)
    finally:
        if claimed:
            release_run_dir(out)


def _train(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    set_threads(cfg.get("threads"))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    # Unpruned first: the start (init_from) has no masks; the pruning structure is added after it is loaded.
    model = build_network(cfg.model, cfg.quant, activations=False)
    check_pairing_names(model, list(cfg.pairing.layers))
    init_from = resolve_init_from(
        cfg.get("init_from"),
        cfg.paths.runs_root,
        cfg.data.name,
        cfg.model.name,
        cfg.seed,
        threat_model=train_threat_model(cfg),
        init_seed=cfg.get("init_seed"),
        width=model_width(cfg.model),
    )
    if init_from:
        # The start's weights (a full-precision or weight-quantized run); the clipping ranges start afresh.
        load_model_weights(model, init_from)
    from esq_lightning.compress.pruning import add_pruning

    model = add_pruning(model, str((cfg.get("prune") or {}).get("method") or "none"))
    model = add_act_quant(model, cfg.quant)
    if int(cfg.quant.act_bits) < 32 and not cfg.get("ckpt_path"):
        # Clipping ranges from the first 256 unshuffled training inputs: the same on every rank; then learned.
        calibrate_act_quant(model, datamodule.train_tensors()[0][:ACT_CALIBRATION_SAMPLES])
    # Compression from the start's weights (docs/compression.md); a resumed run takes its masks from the checkpoint.
    compression: dict[str, Any] = {}
    if cfg.quant.get("budget_bytes") is not None:
        compression["allocation"] = allocate_mixed_precision(cfg, model, datamodule)
    prune_cfg = cfg.get("prune")
    if prune_cfg is not None and prune_cfg.method != "none" and not cfg.get("ckpt_path"):
        from esq_lightning.compress.pruning import init_pruning

        try:
            compression["prune"] = init_pruning(model, prune_cfg)
        except ValueError as exc:
            raise ESQUserError(str(exc)) from None
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out)
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)

    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    config["init_from"] = init_from
    if "allocation" in compression:
        # The checkpoint rebuilds the allocated widths (esq-eval, esq-export, resume) without allocating again.
        config["quant"]["layer_bits"] = dict(compression["allocation"]["layer_bits"])
        config["quant"]["budget_bytes"] = None
    if ckpt_path:
        check_resume_checkpoint(ckpt_path, model, config)
        check_something_left(out, config)
        if pl.utilities.rank_zero_only.rank == 0:
            keep_metrics_of_interrupted_run(out)
    module = ESQModule(
        model=model,
        objective=build_objective(cfg),
        num_classes=cfg.data.num_classes,
        optimizer=optimizer,
        scheduler=scheduler,
        seed=cfg.seed,
        config=config,
        channels_last=bool(cfg.get("channels_last")),
    )
    if cfg.get("compile"):
        module.model = compile_model(module.model, list(cfg.pairing.layers))

    # WandbLogger(offline=True) sets WANDB_MODE in os.environ; restored in finally so it cannot leak to the next job.
    wandb_env = snapshot_wandb_env()
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    # Collapse to a constant output, and a run ending far below its start, are named (callbacks/collapse.py).
    collapse_monitor = CollapseMonitor()
    callbacks.append(collapse_monitor)
    # `progress`: a compact bar, or one line per epoch; a one-line model summary (callbacks/progress.py).
    callbacks += progress_callbacks(cfg)
    if prune_cfg is not None and prune_cfg.method == "hydra":
        from esq_lightning.compress.pruning import PruneCallback

        callbacks.append(PruneCallback(int(prune_cfg.score_epochs)))
    module.compression = compression
    module.training_flags = []
    trainer = pl.Trainer(
        **{**OmegaConf.to_container(cfg.trainer, resolve=True), "enable_progress_bar": progress_enabled(cfg)},
        callbacks=callbacks,
        logger=loggers if loggers else False,
        default_root_dir=str(out),
        # Attacks need autograd during validation; Lightning's default inference_mode forbids it.
        inference_mode=False,
        # The tensor loaders shard themselves by rank (same permutation on every rank).
        use_distributed_sampler=False,
        # Checkpoints go to a temporary file next to the target, then an atomic rename (plugins.py).
        plugins=[AtomicCheckpointIO()],
    )
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        train_seconds = time.perf_counter() - start
        # CPU time of the fit in this process: steadier than wall-clock on a shared CPU (benchmarks/).
        module.training_record = {"train_cpu_seconds": time.process_time() - start_cpu}
        val_acc = trainer.callback_metrics.get("val/clean_acc")
        module.training_flags = collapse_monitor.flags(float(val_acc) if val_acc is not None else None)
        # Catastrophic overfitting seen by the robust validation (training/callbacks/overfitting.py).
        watch = getattr(module, "overfitting_monitor", None)
        if watch is not None:
            module.training_flags += watch.flags()
            module.training_record["catastrophic_overfitting"] = watch.record()
        final_ckpt = out / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final_ckpt)
        results: dict[str, Any] = {}
        if trainer.is_global_zero:
            keep_metrics_history(loggers, out)
            results = evaluate_and_record(cfg, module, datamodule, trainer, final_ckpt, train_seconds, out, loggers)
        return results, {"trainer": trainer, "module": module, "datamodule": datamodule}
    finally:
        _finish_wandb(loggers)
        restore_wandb_env(wandb_env)


def keep_metrics_history(loggers: list[Any], out: Path) -> None:
    """After a resume, csv/metrics.csv holds the whole run's rows again (checkpoint.merge_resumed_metrics)."""
    from pytorch_lightning.loggers import CSVLogger

    csv_loggers = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    for lg in csv_loggers:
        lg.save()
    merged = merge_resumed_metrics(out)
    if merged is not None:
        header = merged.read_text().splitlines()[0].split(",")
        for lg in csv_loggers:  # later rows (the test metrics) are appended under the merged header
            lg.experiment.metrics_keys = sorted(set(header) | set(lg.experiment.metrics_keys))
            if set(lg.experiment.metrics_keys) != set(header):
                lg.experiment._rewrite_with_new_header(lg.experiment.metrics_keys)


def evaluate_and_record(
    cfg: DictConfig,
    module: ESQModule,
    datamodule: pl.LightningDataModule,
    trainer: pl.Trainer,
    final_ckpt: Path,
    train_seconds: float,
    out: Path,
    loggers: list[Any],
) -> dict[str, Any]:
    """The end-of-training evaluation on the test split, written to results.json and the loggers."""
    datamodule.setup("test")
    x, y = datamodule.test_tensors()
    model = getattr(module.model, "_orig_mod", module.model)
    # The one evaluation sequence (evaluation/sequence.py): worst case, checks, and the verdict with the flags of
    # the training monitors; pgd_pairing at this run's own pairing.
    threat = ThreatModel.from_config(cfg)
    settings = EvalSettings.from_config(
        cfg, OmegaConf.to_container(cfg, resolve=True), int(cfg.seed), progress=progress_enabled(cfg)
    )
    # A run shorter than its SQ schedule says so in its verdict (sq_schedule_short).
    ev = evaluate_model(
        model,
        x,
        y,
        threat,
        settings,
        device=module.device,
        extra_flags=[*getattr(module, "training_flags", []), *sq_schedule_flags(_final_sq_ratio(trainer, model))],
    )
    # The logit offset against the centred logits on the test inputs, and its named warning (docs/pairing.md).
    offset = measure_logit_offset(model, x[: cfg.eval.n_samples] if cfg.eval.n_samples else x, module.device)
    results = build_results(
        cfg,
        ev,
        gradient_masking=ev.get("gradient_masking"),
        epochs=trainer.current_epoch,
        train_seconds=train_seconds,
        checkpoint=str(final_ckpt),
        run_dir=str(out),
        **packed_size(model),
        val={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        logit_offset=offset,
        **sq_schedule_record(trainer, model),
        warnings=logit_offset_warnings(offset),
        compression=compression_record(
            model, getattr(module, "compression", {}), cfg.get("compress_name"), cfg.get("budget")
        ),
        **getattr(module, "training_record", {}),
    )
    for warning in results["warnings"]:
        print(f"warning: {warning['name']}: {warning['message']}", flush=True)
    atomic_write_json(out / "results.json", results)
    for logger in loggers:
        logger.log_metrics(
            {
                "test/clean_acc": results["clean_acc"],
                **{f"test/{k}_acc": v for k, v in results["robust_acc"].items()},
                **{f"test/logit_{k}": v for k, v in offset.items()},
            }
        )
    log_results_table(loggers, results)
    print_results(results)
    audit = results["audit"]
    # The table's verdict row is the verdict; below it the checks that fired and, for warn, what to run next. A
    # model that cannot be attacked honestly is named once, by the CLI (cli/train.py).
    print(format_verdict(audit["verdict"], audit["flags"]), flush=True)
    if audit["verdict"] != "pass" and not unattackable_verdict(audit):
        print(
            f"the robust accuracies above may overstate robustness; run esq-eval mode=audit ckpt_path={final_ckpt}",
            flush=True,
        )
    return results


def compression_record(
    model: nn.Module, done: dict[str, Any], preset: str | None = None, budget: int | None = None
) -> dict[str, Any]:
    """results.json `compression`: the bits of every Conv2d/Linear, the sparsity per layer, the allocation and
    pruning as done (each derived from the model that was evaluated), and the preset and budget level of the
    robustness-vs-bytes front (conf/compress/) when the run had one."""
    from esq_lightning.compress.pruning import prunable_layers, sparsity_report
    from esq_lightning.quant import QuantMixin

    bits = {name: (int(m.bits) if isinstance(m, QuantMixin) else 32) for name, m in prunable_layers(model)}
    record: dict[str, Any] = {"layer_bits": bits}
    if preset is not None:
        record.update(preset=str(preset), budget=None if budget is None else int(budget))
    sparsity = sparsity_report(model)
    if sparsity:
        record["sparsity"] = sparsity
    record.update({k: v for k, v in done.items()})
    return record


def _final_sq_ratio(trainer: pl.Trainer, model: nn.Module) -> float | None:
    """The SQ ratio of the last training epoch (the quant_ratio callback's), None without quantized layers."""
    from esq_lightning.quant import quant_layers
    from esq_lightning.training.callbacks.quant_ratio import QuantRatioCallback

    if not quant_layers(model):
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, QuantRatioCallback):
            return float(cb.ratio)
    return 1.0


def sq_schedule_record(trainer: pl.Trainer, model: nn.Module) -> dict[str, Any]:
    """results.json `sq_ratio_final` for a quantized run: the ratio its last training epoch used."""
    ratio = _final_sq_ratio(trainer, model)
    return {} if ratio is None else {"sq_ratio_final": ratio}


def raise_if_unattackable(results: dict[str, Any]) -> None:
    """EvaluationFailed (the CLI: one line, exit code 3) when the run's model could not be attacked honestly.

    Not in a multirun: one collapsed job of a sweep is a result of the sweep, not the end of it."""
    failed = unattackable_verdict(results.get("audit") or {})
    if failed:
        raise EvaluationFailed(f"{failed} ({Path(results.get('run_dir', '.')) / 'results.json'})")


def measure_logit_offset(
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 500,
) -> dict[str, float]:
    """esq_lightning.pairing.logit_offset_stats over `x`, in eval mode at full quantization."""
    model.to(device)
    with torch.no_grad(), frozen_eval(model), full_quantization(model):
        z = torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    return {k: float(v) for k, v in logit_offset_stats(z).items()}


def _finish_wandb(loggers: list[Any]) -> None:
    # Closing the run here means the next job of a multirun never logs into this one.
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb  # optional: only when a W&B logger ran

        if wandb.run is not None:
            wandb.finish()
