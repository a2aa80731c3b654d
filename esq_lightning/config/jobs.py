"""Every job of a sweep validated before the first one runs (esq-train -m, esq-reproduce's training stages).

Hydra's basic sweeper composes each job's config only when the job starts, so a bad value in the fifth job of a
sweep (or a sweep preset's hydra.sweeper.params) would fail after four jobs trained. check_jobs expands the sweep
the way the basic sweeper does (the command line's comma lists and the preset's params, as a Cartesian product),
composes every job's config and runs the schema's phase-1 check on it (config/schema.py): the first error stops
everything in one line naming the job.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from esq_lightning.errors import ESQUserError

CONFIG_MODULE = "esq_lightning.conf"
# A sweep larger than this is checked on its first MAX_CHECKED jobs (composing takes a few milliseconds a job).
MAX_CHECKED = 512


def composition_error(config_name: str, overrides: list[str], exc: BaseException) -> ESQUserError:
    """Hydra's composition error (unknown group option, misspelt key, bad override) as the CLI's one line, with the
    "did you mean" hint."""
    import re

    from esq_lightning.errors import did_you_mean

    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:
        group, option = missing.group(1), missing.group(2)
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return ESQUserError(
            f"{group}={option}: unknown option of group {group}{did_you_mean(option, options)}; "
            f"allowed: {', '.join(options) or '(none)'}"
        )
    override = re.search(r"Could not override '([^']+)'", text)
    if override and ("not in struct" in f"{text} {exc.__cause__}" or "To append to your config" in text):
        key = override.group(1)
        parent, _, leaf = key.rpartition(".")
        siblings: list[str] = []
        try:
            from hydra import compose as hydra_compose
            from hydra import initialize_config_module
            from hydra.core.global_hydra import GlobalHydra
            from omegaconf import OmegaConf

            rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
            GlobalHydra.instance().clear()
            with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
                base = hydra_compose(config_name, overrides=rest)
            node = OmegaConf.select(base, parent) if parent else base
            siblings = [str(k) for k in node] if hasattr(node, "keys") else []
        except Exception:
            pass
        where = f" of {parent}" if parent else ""
        allowed = f"; allowed keys{where}: {', '.join(siblings)}" if siblings else "; add it with +" + key + "=..."
        return ESQUserError(f"{key}: unknown key{did_you_mean(leaf, siblings)}{allowed}")
    line = " ".join(text.split())
    return ESQUserError(line or f"{type(exc).__name__} while composing the {config_name} config")


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        yield


def _compose(config_name: str, overrides: list[str]) -> Any:
    from hydra import compose

    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except ESQUserError:
        raise
    except Exception as exc:
        raise composition_error(config_name, overrides, exc) from None


def expand_jobs(config_name: str, overrides: Sequence[str]) -> list[list[str]]:
    """The override lists of the sweep's jobs, in the basic sweeper's order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(overrides))
    except Exception as exc:
        raise ESQUserError(" ".join(str(exc).split())) from None
    choices: list[list[str]] = []
    keys = set()
    for o in parsed:
        key = o.get_key_element()
        keys.add(key.lstrip("+~"))
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    # The sweep preset's own params (conf/sweep/*.yaml: hydra.sweeper.params), read from the first job's config.
    first = [c[0] for c in choices]
    cfg = _compose(config_name, first)
    sweeper = cfg.hydra.get("sweeper") or {}
    # Another sweeper (Optuna: hparams_search=) draws its own values: its jobs are checked at their base config.
    basic = "BasicSweeper" in str(sweeper.get("_target_", "BasicSweeper"))
    params = (sweeper.get("params") or {}) if basic else {}
    for key, value in params.items():
        if str(key) in keys:
            continue  # the command line's value wins
        [o] = parser.parse_overrides([f"{key}={value}"])
        choices.append([f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line])
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_CHECKED)]


def check_jobs(config_name: str, overrides: Sequence[str]) -> int:
    """Compose and validate every job of the sweep (phase 1; for config_name other than train, composition only:
    an unknown key or group option); ESQUserError naming the first bad job. Returns the number of jobs checked."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from esq_lightning.config.schema import validate_train_config

    saved = HydraConfig.instance().cfg
    try:
        with _hydra():
            jobs = expand_jobs(config_name, overrides)
            for i, job in enumerate(jobs):
                cfg = _compose(config_name, job)
                with open_dict(cfg):
                    cfg.hydra.runtime.output_dir = "<job dir>"
                    cfg.hydra.job.num = i
                HydraConfig.instance().set_config(cfg)
                if config_name != "train":
                    continue  # esq-eval's keys are validated once merged with the checkpoint's config
                try:
                    validate_train_config(cfg)
                except ESQUserError as exc:
                    swept = [o for o in job if o not in overrides] or job
                    raise ESQUserError(
                        f"job {i} of {len(jobs)} ({' '.join(swept)}): {exc}; no job was started"
                    ) from None
    finally:
        if saved is not None:
            HydraConfig.instance().cfg = saved
    return len(jobs)
