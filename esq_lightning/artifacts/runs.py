"""Run directories: find finished runs by their results.json, and resolve `setting:NAME` to a checkpoint.

One rule serves every place that looks for "the newest finished run of a setting" (init_from=setting:NF,
esq-eval ckpt_path=setting:NF, esq-reproduce): a training record (task train) of that derived setting
label, whose checkpoint exists, with the requested seed, dataset and model, and for a start of a new run the
same training threat model; the newest checkpoint wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from esq_lightning.errors import ESQUserError

RESULTS = "results.json"


def iter_results(root: str | Path, unreadable: list[tuple[Path, str]] | None = None
                 ) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every readable results.json under root (a run or multirun directory), as (run_dir, results).

    The others (a run that is still writing, a corrupt or foreign file) are skipped; with `unreadable`,
    each is appended to it as (path, why).
    """
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.rglob(RESULTS)):
        record = read_json_record(path, unreadable)
        if record is not None:
            yield path.parent, record


def read_json_record(path: Path, unreadable: list[tuple[Path, str]] | None = None) -> dict[str, Any] | None:
    """The JSON object in path, or None (and (path, why) appended to `unreadable`) when it cannot be read."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
    else:
        if isinstance(record, dict):
            return record
        why = f"not a JSON object but a {type(record).__name__}"
    if unreadable is not None:
        unreadable.append((path, why))
    return None


def train_threat_model(res: dict[str, Any]) -> dict[str, Any] | None:
    """The threat model a run trained against (records older than the field: the one it was evaluated at)."""
    return res.get("train_threat_model", res.get("threat_model"))


def _same_threat_model(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Same norm and eps; a run without any attack (callbacks.pgd=null) fits every threat model."""
    if a is None or b is None:
        return True
    return str(a.get("norm")) == str(b.get("norm")) and abs(float(a["eps"]) - float(b["eps"])) <= 1e-9


def find_runs(runs_root: str | Path, setting: str, *, seed: int | None = None, dataset: str | None = None,
              model: str | None = None, threat_model: dict[str, Any] | None = None,
              width: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The finished training runs of `setting` under runs_root that match every given field, newest first.

    `width` (the model's capacity knobs, results.model_width) must match where the run recorded it, so a
    wider network never starts from a narrower one's weights."""
    found = []
    for _, res in iter_results(runs_root):
        if res.get("task", "train") != "train" or res.get("setting") != setting:
            continue
        if not res.get("checkpoint") or not Path(res["checkpoint"]).is_file():
            continue
        if seed is not None and res.get("seed") != seed:
            continue
        if dataset is not None and res.get("dataset") != dataset or model is not None and res.get("model") != model:
            continue
        if threat_model is not None and not _same_threat_model(train_threat_model(res), threat_model):
            continue
        if width and res.get("model_width") is not None and res.get("model_width") != width:
            continue
        found.append(res)
    return sorted(found, key=lambda r: Path(r["checkpoint"]).stat().st_mtime, reverse=True)


def _width(width: dict[str, Any] | None) -> str:
    return "".join(f", {k} {v}" for k, v in sorted((width or {}).items()))


def _describe(tm: dict[str, Any] | None) -> str:
    return "no training attack" if tm is None else f"{tm.get('norm')} eps={float(tm['eps']):.4g}"


def resolve_init_from(spec: str | None, runs_root: str | Path, dataset: str, model: str, seed: int,
                      threat_model: dict[str, Any] | None = None, init_seed: int | None = None,
                      width: dict[str, Any] | None = None) -> str | None:
    """A checkpoint path for `init_from`.

    `setting:NF` picks the newest finished run of setting NF with the same dataset, model, training threat
    model, width and seed (`init_seed` when given) under runs_root, so a quantization stage finds the
    full-precision start of an earlier stage without a hand-copied path. Another seed or threat model is
    never taken silently: the error says what exists.
    """
    if spec is None or not str(spec).startswith("setting:"):
        if spec is not None and not Path(spec).is_file():
            raise ESQUserError(f"init_from: file not found: {spec}")
        return spec
    setting = str(spec).split(":", 1)[1]
    want_seed = seed if init_seed is None else int(init_seed)
    found = find_runs(runs_root, setting, seed=want_seed, dataset=dataset, model=model, threat_model=threat_model,
                       width=width)
    if found:
        return found[0]["checkpoint"]
    others = find_runs(runs_root, setting, dataset=dataset, model=model)
    if not others:
        raise ESQUserError(
            f"init_from={spec}: no finished run of setting {setting} for data={dataset} model={model} under "
            f"{runs_root} (train it first, e.g. esq-train experiment={dataset}/{setting}, or give a checkpoint path)"
        )
    seen = sorted({(int(r.get("seed", -1)), _describe(train_threat_model(r)), _width(r.get("model_width")))
                   for r in others})
    shown = ", ".join(f"seed {s} ({tm}{w})" for s, tm, w in seen[:6])
    raise ESQUserError(
        f"init_from={spec}: no finished run of setting {setting} with seed {want_seed} trained at "
        f"{_describe(threat_model)}{_width(width)} for data={dataset} model={model} under {runs_root}; found {shown}. "
        f"Train that start first, or choose one with init_seed=<seed> (and the same eps), or give a checkpoint path"
    )


def resolve_checkpoint(spec: str, runs_root: str | Path, seed: int) -> str:
    """A checkpoint path for esq-eval: a path as it is, or `setting:NAME` = the newest finished training run of
    setting NAME with this seed under runs_root (one dataset and model only; otherwise give paths)."""
    if not str(spec).startswith("setting:"):
        return str(spec)
    setting = str(spec).split(":", 1)[1]
    found = find_runs(runs_root, setting, seed=seed)
    if not found:
        raise ESQUserError(f"{spec}: no finished training run of setting {setting} with seed {seed} under {runs_root} "
                           "(set paths.runs_root=... and seed=..., or give a checkpoint path)")
    kinds = {(r.get("dataset"), r.get("model")) for r in found}
    if len(kinds) > 1:
        raise ESQUserError(f"{spec}: runs of setting {setting} for several data/models under {runs_root} "
                           f"({sorted(kinds)}); give a checkpoint path or a narrower paths.runs_root")
    return found[0]["checkpoint"]
