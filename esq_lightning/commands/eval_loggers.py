"""esq-eval on the dashboard: every evaluation mode sends its results to the loggers of `logger=` (W&B, TensorBoard).

One call per mode from esq_lightning/commands/evaluate.py, `log_evaluation(cfg, mode, record, train_configs)`:
- W&B: one run with job_type=eval in the training run's group (the checkpoint's config knows it), named
  `<training run name>-eval-<mode>`, tagged as esq-train tags plus `eval:<mode>`; the results as wandb.Table(s),
  the figures as images and as native W&B plots, the headline numbers in the run summary. Offline by default
  (never asks for a login); logger.wandb.offline=false needs `wandb login`, checked before anything is evaluated.
- TensorBoard: the summary numbers as scalars, each curve as scalars over its points, the figures as images,
  the tables as markdown text.
Other logger entries (csv) are ignored: the mode's JSON file is the record.

`dashboard_items(mode, record)` turns a mode's record into an `EvalLog` (tables, lines, bars, images, summary);
a new mode (the audit) can build its own EvalLog and pass it as `items=`, or rely on the generic fallback
(numeric top-level values as summary, `figure` as image).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from esq_lightning.errors import ESQUserError
from esq_lightning.figures import save_figure
from esq_lightning.training.loggers import isolated_wandb_env, results_row, wandb_tags


@dataclass
class Line:
    """Curves sharing one x axis: a native W&B line plot (wandb.plot.line_series) and TensorBoard scalars."""

    name: str
    title: str
    xname: str
    yname: str
    xs: list[float]
    ys: list[list[float]]
    keys: list[str]


@dataclass
class Bar:
    """One value per label: a native W&B bar chart (wandb.plot.bar)."""

    name: str
    title: str
    labels: list[str]
    values: list[float]
    value_name: str = "accuracy"


@dataclass
class EvalLog:
    """What one evaluation puts on the dashboard."""

    summary: dict[str, float] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)


# ---- what each mode shows ----------------------------------------------------------------------------------
def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def whitebox_items(record: Mapping[str, Any], out: Path | None = None) -> EvalLog:
    columns, values = results_row(record)
    log = EvalLog(tables={"eval/results": (columns, [values])})
    log.summary = {
        "eval/clean_acc": float(record["clean_acc"]),
        **{f"eval/{k}_acc": float(v) for k, v in (record.get("robust_acc") or {}).items()},
    }
    labels = ["clean", *(record.get("robust_acc") or {})]
    accs = [float(record["clean_acc"]), *(float(v) for v in (record.get("robust_acc") or {}).values())]
    tm = record.get("threat_model") or {}
    title = f"{record.get('dataset')}: accuracy per attack, {tm.get('norm')} eps={float(tm.get('eps', 0)):.4g}"
    log.bars.append(Bar("eval/accuracy_per_attack", title, labels, accs))
    attacks = record.get("attacks") or {}
    eps_rows = [
        [name, float(p["eps"]), float(record["robust_acc"][name])]
        for name, p in attacks.items()
        if _num((p or {}).get("eps")) and name in record["robust_acc"]
    ]
    if eps_rows:
        log.tables["eval/attacks"] = (["attack", "eps", "accuracy"], eps_rows)
    flags = (record.get("gradient_masking") or {}).get("flags") or []
    if flags:
        log.tables["eval/gradient_masking"] = (
            ["flag"],
            [[str(f.get("name", f)) if isinstance(f, Mapping) else str(f)] for f in flags],
        )
    if out is not None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.6, 3.6))
        ax = fig.add_subplot()
        ax.bar(labels, accs, color=["#4c72b0"] + ["#dd8452"] * (len(labels) - 1))
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\n{record.get('n_samples')} test inputs, eval mode, ratio 1", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        log.images["eval/figure/whitebox"] = save_figure(fig, Path(out) / "whitebox.png")
    return log


def transfer_items(record: Mapping[str, Any], out: Path | None = None) -> EvalLog:
    labels = list(record["labels"])
    matrix = [[float(v) for v in row] for row in record["matrix"]]
    log = EvalLog(
        tables={
            "eval/transfer_matrix": (["source \\ target", *labels], [[src, *row] for src, row in zip(labels, matrix)])
        }
    )
    log.tables["eval/clean"] = (
        ["model", "clean_acc"],
        [[lab, float(c)] for lab, c in zip(labels, record["clean_acc"])],
    )
    log.summary = {f"eval/white_box_acc/{lab}": matrix[i][i] for i, lab in enumerate(labels)}
    log.summary.update({f"eval/clean_acc/{lab}": float(c) for lab, c in zip(labels, record["clean_acc"])})
    for j, target in enumerate(labels):
        others = [matrix[i][j] for i in range(len(labels)) if i != j]
        if others:
            log.summary[f"eval/transfer_acc_min/{target}"] = min(others)
    log.bars.append(
        Bar(
            "eval/white_box_accuracy",
            f"{record.get('attack')}: accuracy on own adversarial examples",
            labels,
            [matrix[i][i] for i in range(len(labels))],
        )
    )
    if out is not None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1.6 + 1.1 * len(labels), 1.2 + 0.9 * len(labels)))
        ax = fig.add_subplot()
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xlabel("target (evaluated) model")
        ax.set_ylabel("source (attacked) model")
        tm = record.get("threat_model") or {}
        ax.set_title(
            f"transfer {record.get('attack')}, {tm.get('norm')} eps={float(tm.get('eps') or 0):.4g}", fontsize=9
        )
        fig.colorbar(im, ax=ax, fraction=0.046)
        log.images["eval/figure/transfer"] = save_figure(fig, Path(out) / "transfer.png")
    return log


def amplification_items(record: Mapping[str, Any], out: Path | None = None) -> EvalLog:
    curves = record["curves"]
    n_modules = max(len(c["d"]) for c in curves)
    log = EvalLog()
    log.lines.append(
        Line(
            "eval/D_l",
            "D_l per residual module",
            "residual module",
            "D_l",
            list(range(1, n_modules + 1)),
            [[float(d) for d in c["d"]] for c in curves],
            [c["label"] for c in curves],
        )
    )
    log.tables["eval/amplification"] = (
        ["model", "module_index", "module", "D_l"],
        [[c["label"], i + 1, name, float(d)] for c in curves for i, (name, d) in enumerate(zip(c["modules"], c["d"]))],
    )
    for c in curves:
        log.summary[f"eval/clean_acc/{c['label']}"] = float(c["clean_acc"])
        log.summary[f"eval/adv_acc/{c['label']}"] = float(c["adv_acc"])
        log.summary[f"eval/D_last/{c['label']}"] = float(c["d"][-1])
    if record.get("figure"):
        log.images["eval/figure/amplification"] = Path(record["figure"])
    return log


def blackbox_items(record: Mapping[str, Any], out: Path | None = None) -> EvalLog:
    curves = record["curves"]
    budgets = [float(b) for b in record["budgets"]]
    log = EvalLog()
    log.lines.append(
        Line(
            "eval/accuracy_vs_l2_budget",
            "accuracy vs L2 budget (black-box)",
            "L2 budget",
            "accuracy",
            budgets,
            [[float(a) for a in c["accuracy"]] for c in curves],
            [c["legend"] for c in curves],
        )
    )
    log.tables["eval/blackbox"] = (
        ["model", "attack", "budget", "accuracy"],
        [[c["label"], c["attack"], b, float(a)] for c in curves for b, a in zip(c["budgets"], c["accuracy"])],
    )
    for c in curves:
        log.summary[f"eval/acc_at_max_budget/{c['label']}/{c['attack']}"] = float(c["accuracy"][-1])
    if record.get("figure"):
        log.images["eval/figure/blackbox"] = Path(record["figure"])
    return log


def generic_items(record: Mapping[str, Any], out: Path | None = None) -> EvalLog:
    """Any other mode: its numeric top-level values as summary, its `figure` (if any) as an image."""
    log = EvalLog(summary={f"eval/{k}": float(v) for k, v in record.items() if _num(v) and k != "schema_version"})
    if record.get("figure"):
        log.images[f"eval/figure/{record.get('mode', 'eval')}"] = Path(record["figure"])
    return log


MODE_ITEMS = {
    "whitebox": whitebox_items,
    "transfer": transfer_items,
    "amplification": amplification_items,
    "blackbox": blackbox_items,
}


def dashboard_items(mode: str, record: Mapping[str, Any], out: Path | None = None) -> EvalLog:
    return MODE_ITEMS.get(mode, generic_items)(record, out)


# ---- which loggers, and their settings -----------------------------------------------------------------------
def _logger_entries(cfg: DictConfig) -> dict[str, Any]:
    loggers = cfg.get("logger") or {}
    return {name: conf for name, conf in loggers.items() if conf is not None and name in ("wandb", "tensorboard")}


def check_eval_loggers(cfg: DictConfig) -> None:
    """Fail before any checkpoint is read when a requested logger cannot work (missing package, no login)."""
    import importlib.util

    entries = _logger_entries(cfg)
    if "tensorboard" in entries and importlib.util.find_spec("tensorboard") is None:
        raise ESQUserError(
            "logger=tensorboard needs the tensorboard package: pip install 'esq-lightning[tensorboard]' "
            "(make setup installs it)"
        )
    if "wandb" in entries and not entries["wandb"].get("offline", True):
        import wandb

        if not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            raise ESQUserError(
                "logger.wandb.offline=false needs a W&B login: run `wandb login` or set WANDB_API_KEY "
                "(or keep the default offline mode and `wandb sync` later)"
            )


def _common_experiment(train_configs: Sequence[Mapping[str, Any]], mode: str) -> str:
    names = {tc.get("experiment_name") for tc in train_configs}
    if len(names) == 1 and None not in names:
        return str(next(iter(names)))
    data = ((train_configs[0].get("data") or {}).get("name")) if train_configs else None
    return f"{data}-eval-{mode}"


def resolve_logger_configs(cfg: DictConfig, mode: str, train_configs: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """The logger entries of the eval config, resolved against the (first) training run's config.

    ${experiment_name}, ${seed} and ${tags} of conf/logger/*.yaml then name the training run (so the W&B run lands
    in its group); ${task_name} is `eval`. Several checkpoints of different experiments share a group
    `<data>-eval-<mode>`.
    """
    entries = _logger_entries(cfg)
    if not entries:
        return {}
    base = dict(train_configs[0]) if train_configs else {}
    for key in ("logger", "hydra", "callbacks"):
        base.pop(key, None)
    raw = OmegaConf.to_container(cfg.logger, resolve=False)
    tags = [*(base.get("tags") or []), *(cfg.get("tags") or [])]
    context = OmegaConf.create(
        {
            **base,
            "task_name": "eval",
            "tags": tags,
            "experiment_name": _common_experiment(train_configs, mode),
            "logger": {k: v for k, v in raw.items() if k in entries},
        }
    )
    resolved = OmegaConf.to_container(context.logger, resolve=True)
    if "wandb" in resolved:
        resolved["wandb"]["tags"] = [*wandb_tags(context, resolved["wandb"].get("tags")), f"eval:{mode}"][:64]
        resolved["wandb"]["name"] = f"{resolved['wandb'].get('name') or context.experiment_name}-eval-{mode}"
    return resolved


# ---- the writers ---------------------------------------------------------------------------------------------
def _log_wandb(conf: Mapping[str, Any], log: EvalLog, run_config: dict[str, Any]) -> Path | None:
    import wandb

    save_dir = Path(str(conf.get("save_dir") or "."))
    save_dir.mkdir(parents=True, exist_ok=True)
    with isolated_wandb_env():
        run = wandb.init(
            project=conf.get("project"),
            entity=conf.get("entity"),
            name=conf.get("name"),
            group=conf.get("group"),
            job_type=str(conf.get("job_type") or "eval"),
            tags=list(conf.get("tags") or []),
            config=run_config,
            dir=str(save_dir),
            mode="offline" if conf.get("offline", True) else "online",
            reinit="create_new",
        )
        try:
            payload: dict[str, Any] = {}
            for name, (columns, rows) in log.tables.items():
                payload[name] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            for name, path in log.images.items():
                if Path(path).is_file():
                    payload[name] = wandb.Image(str(path))
            for line in log.lines:
                payload[f"{line.name}_plot"] = wandb.plot.line_series(
                    xs=line.xs, ys=line.ys, keys=line.keys, title=line.title, xname=line.xname
                )
            for bar in log.bars:
                table = wandb.Table(
                    columns=["label", bar.value_name], data=[[lab, v] for lab, v in zip(bar.labels, bar.values)]
                )
                payload[f"{bar.name}_plot"] = wandb.plot.bar(table, "label", bar.value_name, title=bar.title)
            run.log(payload)
            run.summary.update(log.summary)
            run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        finally:
            run.finish()
    return run_dir


def _log_tensorboard(conf: Mapping[str, Any], log: EvalLog, mode: str) -> Path:
    import numpy as np
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    log_dir = (
        Path(str(conf.get("save_dir") or ".")) / str(conf.get("name") or "tensorboard") / str(conf.get("version") or "")
    )
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for key, value in log.summary.items():
            writer.add_scalar(key, value, 0)
        for line in log.lines:
            for key, ys in zip(line.keys, line.ys):
                for step, y in enumerate(ys):
                    writer.add_scalar(f"{line.name}/{key}", y, step)
            writer.add_text(f"{line.name}/x", f"{line.xname}: " + ", ".join(f"{x:g}" for x in line.xs), 0)
        for name, (columns, rows) in log.tables.items():
            head = "| " + " | ".join(map(str, columns)) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join(
                "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |\n" for r in rows
            )
            writer.add_text(name, head + body, 0)
        for name, path in log.images.items():
            if Path(path).is_file():
                img = imread(str(path))
                img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, axis=-1)
                writer.add_image(name, img, 0, dataformats="HWC")
        writer.add_text("eval/mode", mode, 0)
    finally:
        writer.close()
    return log_dir


def _eval_settings(cfg: DictConfig, train_configs: Sequence[Mapping[str, Any]]) -> Any:
    """This evaluation's `eval` group as it resolved (it interpolates the checkpoint's data config)."""
    base = OmegaConf.create({k: v for k, v in (train_configs[0] if train_configs else {}).items() if k != "hydra"})
    merged = OmegaConf.merge(base, OmegaConf.create({"eval": cfg.get("eval") or {}}))
    try:
        return OmegaConf.to_container(merged.eval, resolve=True)
    except Exception:  # an interpolation only esq-eval's own config knows: record it as written
        return OmegaConf.to_container(cfg.get("eval") or {}, resolve=False)


def log_evaluation(
    cfg: DictConfig,
    mode: str,
    record: Mapping[str, Any],
    train_configs: Sequence[Mapping[str, Any]],
    items: EvalLog | None = None,
    out: Path | None = None,
) -> dict[str, str]:
    """Send one evaluation to the loggers of `cfg.logger`; returns {logger: where it wrote} (empty without any).

    `record` is what the mode wrote (results.json, transfer.json, ...), `train_configs` the training configs of
    its checkpoints (the first names the W&B group), `out` the eval run directory (figures drawn for the dashboard
    go there).
    """
    confs = resolve_logger_configs(cfg, mode, train_configs)
    if not confs:
        return {}
    log = items if items is not None else dashboard_items(mode, record, out)
    run_config = {
        "mode": mode,
        "eval": _eval_settings(cfg, train_configs),
        "checkpoints": [m.get("checkpoint") for m in record.get("models") or []] or [record.get("checkpoint")],
        "models": list(record.get("models") or []),
        "n_samples": record.get("n_samples"),
        "train_config": dict(train_configs[0]) if train_configs else {},
    }
    where: dict[str, str] = {}
    if "wandb" in confs:
        run_dir = _log_wandb(confs["wandb"], log, run_config)
        where["wandb"] = str(run_dir)
    if "tensorboard" in confs:
        where["tensorboard"] = str(_log_tensorboard(confs["tensorboard"], log, mode))
    for name, path in where.items():
        print(f"logged the {mode} evaluation to {name}: {path}", flush=True)
    return where
