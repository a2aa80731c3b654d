"""The Python API: the CLI's steps as functions, composing the same Hydra configs.

    from esq_lightning import train, evaluate, export, load_model, load_results

    results = train(quant="twn", trainer__max_epochs=2, threads=1)          # esq-train quant=twn trainer.max_epochs=2
    record = evaluate(results["checkpoint"], eval__attacks=["fgsm"])        # esq-eval ckpt_path=... eval.attacks=[fgsm]
    report = export(results["checkpoint"])                                  # esq-export ckpt_path=...

Keyword arguments are the CLI's overrides: `key=value` is `key=value`, a double underscore is a dot
(`trainer__max_epochs=2` is `trainer.max_epochs=2`), a dict value is a config node (`trainer={"max_epochs": 2}`),
lists and None are written as Hydra reads them ([a,b], null). `overrides=[...]` takes raw override strings
(`+trainer.limit_val_batches=2`, `experiment=digits/from_scratch`). `run_dir=` sets the run directory (by default the
one esq-train/esq-eval would use, under paths.runs_root). Config errors raise ESQUserError before torch is imported,
as on the command line.

train, evaluate and export return their record and print nothing: no tables, no bars, no library set-up lines
(the record's `warnings` and `audit` hold what the command would print; Python warnings still show). Asked with
`verbose=True` or `progress=True`, they print what the command prints; `progress` (the config key of every command)
sets the bars and defaults to `verbose`: `verbose=True, progress=False` prints one line per epoch instead of a bar.

Note: `esq_lightning.train`, `.evaluate` and `.export` are these functions; what the commands do lives in
esq_lightning.commands (train, evaluate), the loading of a trained model in esq_lightning.artifacts.loading.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import esq_lightning.config.resolvers  # noqa: F401  (registers the configs' resolvers)
from esq_lightning.artifacts.runs import iter_results
from esq_lightning.config.jobs import composition_error
from esq_lightning.config.schema import validate_train_config
from esq_lightning.errors import ESQUserError
from esq_lightning.notices import quiet_library_notices

CONFIG_MODULE = "esq_lightning.conf"
_PLAIN = re.compile(r"^[A-Za-z0-9_./:+\-@]*$")


# ---- keyword arguments -> Hydra overrides ------------------------------------------------------------------------
def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        if _PLAIN.match(text) and text not in ("", "null", "true", "false"):
            return text
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    raise ESQUserError(
        f"{value!r}: a keyword argument must be a str, number, bool, None, list or dict (got {type(value).__name__})"
    )


def to_overrides(kwargs: Mapping[str, Any], overrides: Iterable[str] = ()) -> list[str]:
    """Hydra override strings of the API's keyword arguments (dicts flattened into dotted keys)."""
    out = [str(o) for o in overrides]

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                add(f"{key}.{k}", v)
        else:
            out.append(f"{key}={_value(value)}")

    for key, value in kwargs.items():
        add(key.replace("__", "."), value)
    return out


# ---- composing like the entry points do --------------------------------------------------------------------------
def compose(config_name: str, overrides: list[str], run_dir: str | Path | None = None) -> DictConfig:
    """The config the entry point would run (Hydra's `hydra:` resolvers set up), its run directory created."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if run_dir is not None:
        overrides = [*overrides, f"hydra.run.dir={_value(str(Path(run_dir).resolve()))}"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as exc:
        raise composition_error(config_name, overrides, exc) from None
    out = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).resolve()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
        cfg.hydra.job.override_dirname = ""
    HydraConfig.instance().set_config(cfg)
    # The run directory is claimed before anything is written into it (artifacts/rundir.py): a finished run's
    # .hydra/ is never replaced by another run's.
    from esq_lightning.artifacts.rundir import claim_run_dir

    resume = OmegaConf.select(cfg, "ckpt_path", default=None) if config_name == "train" else None
    claim_run_dir(
        out, str(OmegaConf.select(cfg, "task_name", default=config_name)), None if resume is None else str(resume)
    )
    # What Hydra writes next to every run: esq-report reads the overrides of a run from here.
    hydra_dir = out / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(job_cfg, hydra_dir / "config.yaml")
    return cfg


def _quiet() -> None:
    quiet_library_notices()


@contextlib.contextmanager
def _claimed_run() -> Iterator[None]:
    """The run directory compose() claims is released when the call ends; a refused run leaves no directory."""
    from esq_lightning.artifacts import rundir

    try:
        yield
    except ESQUserError:
        rundir.forget_fresh_run_dir()
        raise
    finally:
        rundir.release_all()


# Lightning's loggers write their INFO lines (device, seed, fit stopped) through a handler of their own.
LIBRARY_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def _output(verbose: bool) -> Iterator[None]:
    """Nothing printed unless `verbose`: stdout kept, the libraries' INFO lines dropped (their warnings still show)."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _with_progress(kwargs: dict[str, Any], overrides: Iterable[str], progress: bool | None, verbose: bool) -> None:
    """The config key `progress`: the argument, else an override that sets it, else `verbose`."""
    if progress is not None:
        kwargs["progress"] = bool(progress)
    elif not any(str(o).lstrip("+~").startswith("progress=") for o in overrides) and "progress" not in kwargs:
        kwargs["progress"] = bool(verbose)


# ---- the API -----------------------------------------------------------------------------------------------------
def train(
    *,
    overrides: Iterable[str] = (),
    run_dir: str | Path | None = None,
    verbose: bool = False,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """esq-train: train and evaluate one run; returns its results record (results.json; `checkpoint` is its path).
    Prints nothing unless verbose=True or progress=True (then what esq-train prints; progress: the bars)."""
    _quiet()
    _with_progress(kwargs, overrides, progress, verbose)
    with _claimed_run():
        cfg = compose("train", to_overrides(kwargs, overrides), run_dir)
        validate_train_config(cfg)  # phase 1, before torch is imported
        from esq_lightning.commands.train import train as run  # torch and Lightning load here, after the check

        with _output(verbose or bool(progress)):
            results, _ = run(cfg)
    return results


def evaluate(
    ckpt_path: str | Path | None = None,
    *,
    ckpts: Iterable[str | Path] | None = None,
    mode: str | None = None,
    overrides: Iterable[str] = (),
    run_dir: str | Path | None = None,
    verbose: bool = False,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """esq-eval: mode=whitebox on `ckpt_path` (a checkpoint or a packed .esq file), or mode=transfer|amplification|
    blackbox on `ckpts`; returns the record the mode wrote (results.json, transfer.json, ...). Prints nothing unless
    verbose=True or progress=True (then what esq-eval prints; progress: the bars)."""
    _quiet()
    _with_progress(kwargs, overrides, progress, verbose)
    if ckpt_path is not None:
        kwargs["ckpt_path"] = str(ckpt_path)
    if ckpts is not None:
        kwargs["ckpts"] = [str(c) for c in ckpts]
    if mode is not None:
        kwargs["mode"] = mode
    with _claimed_run():
        cfg = compose("eval", to_overrides(kwargs, overrides), run_dir)
        # As esq-eval: the eval config is checked once merged with the checkpoint's (before any data is read).
        from esq_lightning.commands.evaluate import (
            evaluate as run,  # torch loads here: `import esq_lightning` stays cheap
        )

        with _output(verbose or bool(progress)):
            return run(cfg)


def export(
    ckpt_path: str | Path,
    out: str | Path | None = None,
    verify: bool = True,
    format: str = "packed",
    overwrite: bool = False,
    verbose: bool = False,
    progress: bool | None = None,
    **onnx_options: Any,
) -> dict[str, Any]:
    """esq-export: write the packed (b-bit) file of a checkpoint; returns the size report (`path` is the file).
    format="onnx" (esq-export format=onnx): the ONNX file checked in onnxruntime, its record returned;
    onnx_options are export_onnx's (n_samples, attack, eps, attack_params, rtol, threads, ...). An existing `out` is
    replaced only with overwrite=True; the source never. Prints nothing unless verbose=True or progress=True
    (format=onnx: the attack's bar)."""
    _quiet()
    show_bars = bool(verbose if progress is None else progress)
    if format == "onnx":
        from esq_lightning.artifacts.export import check_export_target
        from esq_lightning.commands.onnx_export import export_onnx

        check_export_target(Path(ckpt_path), Path(out) if out else Path(ckpt_path).with_suffix(".onnx"), overwrite)
        with _output(verbose or show_bars):
            return export_onnx(ckpt_path, out, progress=show_bars, **onnx_options)
    if format != "packed" or onnx_options:
        raise ESQUserError(f"format={format}: allowed: packed, onnx (keyword options only with onnx)")
    from esq_lightning.artifacts.export import export_checkpoint  # torch loads here

    with _output(verbose or show_bars):
        return export_checkpoint(ckpt_path, out, verify=verify, overwrite=overwrite)


def load_model(path: str | Path, with_config: bool = False) -> Any:
    """The classifier of a checkpoint (quantized layers, eval mode) or of a packed .esq file (rebuilt plain model);
    with `with_config`, (model, training config)."""
    from esq_lightning.artifacts.loading import load_trained_model  # torch loads here

    if not Path(path).is_file():
        raise ESQUserError(f"{path}: no such checkpoint or packed model file")
    model, config, _, _ = load_trained_model(path)
    return (model, config) if with_config else model


def load_results(path: str | Path) -> dict[str, Any] | list[dict[str, Any]]:
    """A JSON record file (results.json, transfer.json, amplification.json, blackbox.json) as a dict; a directory
    (a run, a multirun, paths.runs_root) as the list of every results.json record under it, in path order."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    if not path.is_dir():
        raise ESQUserError(f"{path}: no such results file or run directory")
    return [res for _, res in iter_results(path)]
