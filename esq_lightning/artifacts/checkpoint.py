"""Reading checkpoints: the run config they carry, model weights (Lightning or plain state dicts), resume checks."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esq_lightning.artifacts.results import NOT_TRAINING_KEYS
from esq_lightning.errors import ESQUserError

# ---- safe loading --------------------------------------------------------------------------------------
# A .ckpt is a pickle, and unpickling can call any importable function (os.system, ...): a file from
# someone else must not run code on load. Every checkpoint read here and in Lightning's resume
# (plugins.AtomicCheckpointIO.load_checkpoint) goes through torch.load(weights_only=True): its
# unpickler rebuilds tensors, storages, dtypes and the builtin containers and primitives (dict, list,
# tuple, set, str, int, float, bool, None, bytes, collections.OrderedDict / Counter) and refuses every
# other global. That is everything an esq-train checkpoint holds: the weights, Lightning's optimizer
# and scheduler states, loops and callbacks state, and esq_config (the resolved run config as plain
# containers). SAFE_GLOBALS adds the few other types a checkpoint of this project may carry.
SAFE_GLOBALS: tuple[Any, ...] = ()
# The opt-in for files the user trusts (e.g. written by other tools): the config key of esq-train,
# esq-eval and esq-export.
TRUST_KEY = "trust_checkpoint"
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("esq_trust_checkpoint", default=False)
_WARNED: set[str] = set()


@contextlib.contextmanager
def trusting_checkpoints(trusted: bool) -> Iterator[None]:
    """Within the block, checkpoints load with full unpickling (trusted) or weights_only (the default)."""
    token = _TRUSTED.set(bool(trusted))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def with_checkpoint_trust(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of an entry point fn(cfg, ...): its checkpoint reads follow cfg.trust_checkpoint (default false)."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        trusted = cfg.get(TRUST_KEY, False) if hasattr(cfg, "get") else False
        if trusted not in (True, False):
            raise ESQUserError(f"{TRUST_KEY}: {trusted!r} is not a boolean; allowed: true, false")
        with trusting_checkpoints(bool(trusted)):
            return fn(cfg, *args, **kwargs)

    return wrapper


def checkpoints_trusted() -> bool:
    return _TRUSTED.get()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _refusal_reason(exc: BaseException) -> str:
    """The specific line of torch's weights-only error (it starts with generic advice to disable the check)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    specific = [ln for ln in lines[1:] if not ln.lower().startswith(("check the documentation", "weights only"))]
    return " ".join((specific[0] if specific else lines[0] if lines else "").split())[:300]


def _disallowed_globals(path: str | Path, exc: BaseException) -> list[str]:
    names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    if not names:
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            names = []
    return list(dict.fromkeys(names))


def _warn_trusted(path: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        print(
            f"warning: {TRUST_KEY}=true: unpickling {path} in full, which runs any code the file carries; "
            "use it only for files you trust",
            file=sys.stderr,
            flush=True,
        )


def safe_torch_load(
    path: str | Path, map_location: Any = "cpu", trusted: bool | None = None, opener: Callable[[], Any] | None = None
) -> Any:
    """torch.load(path) that never runs code from the file unless trusted (trust_checkpoint=true).

    A file that needs a global outside the allowlist raises ESQUserError naming the file and the global;
    any other unreadable file raises ESQUserError naming the file. `opener` gives a file object to read
    instead of `path` (remote checkpoints).
    """
    trusted = checkpoints_trusted() if trusted is None else trusted
    source = opener() if opener is not None else path
    try:
        if trusted:
            _warn_trusted(str(path))
            return torch.load(source, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _disallowed_globals(path, exc) if not trusted else []
        if names:
            raise ESQUserError(
                f"refusing to load {path}: it needs the global {', '.join(names)}, which is not among the types a "
                f"checkpoint holds (tensors, containers, numbers, strings), and unpickling it could run code; if you "
                f"trust the file, rerun with {TRUST_KEY}=true"
            ) from None
        if not trusted and "weights only load failed" in str(exc).lower():
            raise ESQUserError(
                f"cannot read checkpoint {path}: the weights-only unpickler refused it "
                f"({_refusal_reason(exc)}); if you trust the file, rerun with {TRUST_KEY}=true"
            ) from None
        raise ESQUserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    except ESQUserError:
        raise
    except Exception as exc:
        raise ESQUserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    finally:
        if opener is not None and hasattr(source, "close"):
            source.close()


def read_checkpoint(path: str | Path, trusted: bool | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (see safe_torch_load), with a one-line error naming the file when it is missing,
    unreadable, or needs code to load."""
    path = Path(path)
    if not path.is_file():
        raise ESQUserError(f"checkpoint not found: {path}")
    kind = not_a_checkpoint(path)
    if kind:
        raise ESQUserError(
            f"{path} is {kind}, not a checkpoint; give the .ckpt file a run wrote "
            "(<run dir>/checkpoints/final.ckpt or last.ckpt)"
        )
    ckpt = safe_torch_load(path, trusted=trusted)
    if not isinstance(ckpt, dict):
        raise ESQUserError(
            f"{path} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict with a state_dict)"
        )
    return ckpt


def not_a_checkpoint(path: str | Path) -> str | None:
    """What a file that is certainly no torch checkpoint is ('a packed model (esq-export)', 'a JSON file (...)',
    'an empty file', ...), from its first bytes; None for anything that may be one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"ESQPACK\x00"):
        return "a packed model written by esq-export (esq-eval and load_model read it; training cannot resume from it)"
    if head.lstrip()[:1] in (b"{", b"["):
        name = Path(path).name
        return f"a JSON file ({'a results record' if name == 'results.json' else name})"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[:2] != b"PK" and head[:1] != b"\x80":
        # torch.save writes a zip archive (PK) or, in the legacy format, a pickle (protocol byte 0x80).
        return "neither a zip archive nor a pickle (a truncated or foreign file)"
    return None


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    if "esq_config" not in ckpt:
        raise ESQUserError(f"{path} was not written by esq-train (no esq_config inside)")
    return ckpt["esq_config"]


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The classifier's weights from a Lightning checkpoint ("model." prefix) or a plain state dict."""
    state = ckpt.get("state_dict", ckpt)
    prefix = "model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    # torch.compile saves its wrapped module under _orig_mod.
    return {k.replace("_orig_mod.", ""): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """One line naming the file when `state` does not fit `model` (other keys or shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = (
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected, "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})"
        )
        raise ESQUserError(f"{path} holds weights of another model than {type(model).__name__}: {detail}")


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights into model; a checkpoint of another architecture fails with one line naming the file."""
    state = model_state_dict(read_checkpoint(path))
    check_model_state(model, state, path)
    model.load_state_dict(state)


LAST = "last.ckpt"


def resolve_resume_path(spec: str, run_dir: str | Path | None) -> Path:
    """The checkpoint that `ckpt_path=` names: `last`, a run directory, or a checkpoint file.

    `last` is <run dir>/checkpoints/last.ckpt of *this* run, so resuming an interrupted run needs its
    hydra.run.dir=; a run directory (or its checkpoints/ folder) means its last.ckpt.
    """
    if spec == "last":
        if run_dir is None:
            raise ESQUserError("ckpt_path=last: no run directory to look in; give ckpt_path=<run dir or .ckpt file>")
        path = Path(run_dir) / "checkpoints" / LAST
        if not path.is_file():
            raise ESQUserError(
                f"ckpt_path=last: no checkpoint at {path}; `last` looks in this run's directory, so resume with "
                "the interrupted run's hydra.run.dir=<its run dir>, or give ckpt_path=<its run dir or a .ckpt file>"
            )
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        raise ESQUserError(
            f"ckpt_path: {path} is a directory without checkpoints/{LAST}; allowed: a run directory, "
            "a .ckpt file, or `last`"
        )
    if not path.is_file():
        raise ESQUserError(
            f"ckpt_path: checkpoint not found: {path}; allowed: a .ckpt file, a run directory, or `last`"
        )
    return path


# A resume continues the same run: the resumed config must equal the stored one (the checkpoint's esq_config) in
# every key, except those that change how the run is watched, logged, evaluated, computed or where it writes, not
# what is trained: the keys that are no part of a run's training config (artifacts/results.py NOT_TRAINING_KEYS, the
# same list that tells finished runs apart; docs/reliability.md lists them). A key and everything under it may change. A different run from those
# weights is `init_from=`.
RESUME_MAY_CHANGE = NOT_TRAINING_KEYS
# May grow (train on), never shrink; the cosine schedule's T_max follows trainer.max_epochs (conf/scheduler/cosine.yaml).
RESUME_MAY_GROW = ("trainer.max_epochs", "scheduler.T_max")
_ABSENT = object()


def resume_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, this run's value) for every key a resume may not change (RESUME_MAY_CHANGE)."""
    if prefix in RESUME_MAY_CHANGE:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            found += resume_differences(
                old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}.{key}" if prefix else str(key)
            )
        return found
    if prefix in RESUME_MAY_GROW and isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return [] if new >= old else [(prefix, old, new)]
    return [] if old == new else [(prefix, old, new)]


def _shown(value: Any) -> str:
    from esq_lightning.errors import show_value

    return "(absent)" if value is _ABSENT else show_value(value)


def check_resume_checkpoint(path: str | Path, model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """Fail with one line naming the file unless `path` is a training checkpoint of this run's model and config.

    Lightning itself would raise deep inside `fit` with a traceback (an unpickling error, a missing
    key, a state_dict mismatch) after the data is loaded. Every key that changes what is trained must
    equal the stored config's (RESUME_MAY_CHANGE lists the others); the refusal names each differing
    key with both values. Returns the checkpoint's stored config.
    """
    ckpt = read_checkpoint(path)
    for key in ("state_dict", "optimizer_states", "loops", "epoch", "global_step"):
        if key not in ckpt:
            kind = (
                "a plain state dict"
                if "state_dict" not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
                else f"no {key}"
            )
            raise ESQUserError(
                f"ckpt_path: {path} is not a Lightning training checkpoint ({kind}); to start from "
                f"its weights use init_from={path}"
            )
    check_model_state(model, model_state_dict(ckpt), path)
    old = ckpt.get("esq_config") or {}
    if old:
        differences = resume_differences(old, config)
        if differences:
            shown = "; ".join(f"{key}={_shown(was)} there, {_shown(now)} here" for key, was, now in differences)
            raise ESQUserError(
                f"ckpt_path: {path} was written by another run than this config ({shown}); a resume continues the "
                f"same run: resume with its config (only {', '.join(RESUME_MAY_CHANGE[:4])}, ..., and a larger "
                f"trainer.max_epochs may change; docs/reliability.md), or start a new run from its weights with "
                f"init_from={path}"
            )
    return old


def check_something_left(run_dir: str | Path, config: dict[str, Any]) -> None:
    """A finished run (results.json in run_dir) resumed without a larger trainer.max_epochs: nothing to train."""
    import json

    results = Path(run_dir) / "results.json"
    if not results.is_file():
        return
    try:
        record = json.loads(results.read_text())
    except (OSError, ValueError):
        return
    done = record.get("epochs") if isinstance(record, dict) else None
    want = (config.get("trainer") or {}).get("max_epochs")
    if isinstance(done, int) and isinstance(want, int) and want <= done:
        raise ESQUserError(
            f"ckpt_path: {run_dir} holds a finished run that trained {done} epoch{'' if done == 1 else 's'}; "
            f"trainer.max_epochs={want} leaves "
            f"nothing to train, so its records stay as they are (set trainer.max_epochs above {done} to train on)"
        )


def _dig(d: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def keep_metrics_of_interrupted_run(run_dir: str | Path) -> Path | None:
    """Move csv/metrics.csv of the interrupted run aside before a resume; returns where it went.

    Lightning's CSVLogger rewrites metrics.csv from its own in-memory rows, so the resumed run would
    otherwise drop every row logged before the interruption. Called on global rank 0 only.
    """
    src = Path(run_dir) / "csv" / "metrics.csv"
    if not src.is_file():
        return None
    k = 1
    while (dst := src.with_name(f"metrics.before-resume-{k}.csv")).exists():
        k += 1
    os.replace(src, dst)
    return dst


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _epoch(row: dict[str, str]) -> float | None:
    try:
        return float(row.get("epoch") or "")
    except ValueError:
        return None


def merge_resumed_metrics(run_dir: str | Path) -> Path | None:
    """csv/metrics.csv as the whole run's history: the rows moved aside at each resume, then the resumed run's.

    Each resumed part supersedes the earlier rows from its first epoch on (the epoch cut short by the interruption
    appears once, as the resumed run logged it). Written atomically; the aside files are removed after. Called on
    global rank 0 once the run's CSV logger has saved its rows; returns the merged file, or None with nothing to do.
    """
    import csv
    import io

    from esq_lightning.atomic import atomic_write_text

    folder = Path(run_dir) / "csv"
    current = folder / "metrics.csv"

    def part(p: Path) -> int:
        try:
            return int(p.stem.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return 0

    parts = sorted(folder.glob("metrics.before-resume-*.csv"), key=part)
    if not parts:
        return None
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for path in [*parts, *([current] if current.is_file() else [])]:
        fields, new = _csv_rows(path)
        header += [f for f in fields if f not in header]
        starts = [e for e in map(_epoch, new) if e is not None]
        if starts:
            first = min(starts)
            rows = [r for r in rows if (e := _epoch(r)) is not None and e < first]
        rows += new
    header = sorted(header)  # Lightning's CSV writer keeps its columns sorted and appends in that order
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(current, text.getvalue())
    for path in parts:
        path.unlink(missing_ok=True)
    return current
