"""Run directories: find finished runs by their results.json, and resolve `init_from=setting:NAME`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from esq_lightning.errors import ESQUserError

RESULTS = "results.json"


def iter_results(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every readable results.json under root (a run or multirun directory), as (run_dir, results)."""
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.rglob(RESULTS)):
        try:
            yield path.parent, json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run that is still writing, or a foreign file: not a finished run


def resolve_init_from(
    spec: str | None, runs_root: str | Path, dataset: str, model: str, seed: int, width: dict[str, Any] | None = None
) -> str | None:
    """A checkpoint path for `init_from`.

    `setting:NF` picks the newest finished run of setting NF with the same dataset, model and seed
    under runs_root (falling back to any seed when none matches), so a quantization stage finds the
    full-precision start of an earlier stage without a hand-copied path. ``width`` (the model's capacity
    knobs, results.model_width) must match too where the run recorded it, so a wider network never
    starts from a narrower one's weights.
    """
    if spec is None or not str(spec).startswith("setting:"):
        if spec is not None and not Path(spec).is_file():
            raise ESQUserError(f"init_from: file not found: {spec}")
        return spec
    setting = str(spec).split(":", 1)[1]
    candidates = [
        (run_dir, res) for run_dir, res in iter_results(runs_root)
        if res.get("setting") == setting and res.get("dataset") == dataset and res.get("model") == model
        and res.get("checkpoint") and Path(res["checkpoint"]).is_file()
        and (not width or res.get("model_width") is None or res.get("model_width") == width)
    ]
    same_seed = [c for c in candidates if c[1].get("seed") == seed]
    pool = same_seed or candidates
    if not pool:
        raise ESQUserError(
            f"init_from={spec}: no finished run of setting {setting} for data={dataset} model={model} under "
            f"{runs_root} (train it first, e.g. esq-train experiment={dataset}/{setting}, or give a checkpoint path)"
        )
    run_dir, res = max(pool, key=lambda c: (Path(c[1]["checkpoint"]).stat().st_mtime))
    if not same_seed:
        print(f"warning: init_from={spec}: no run of setting {setting} with seed {seed} under {runs_root}; "
              f"starting from seed {res.get('seed')}: {res['checkpoint']}", flush=True)
    return res["checkpoint"]


def resolve_checkpoint(spec: str, runs_root: str | Path, seed: int) -> str:
    """A checkpoint path for esq-eval: a path as it is, or `setting:NAME` = the newest finished training run of
    setting NAME with this seed under runs_root (one dataset and model only; otherwise give paths)."""
    if not str(spec).startswith("setting:"):
        return str(spec)
    setting = str(spec).split(":", 1)[1]
    found = [res for _, res in iter_results(runs_root)
             if res.get("task", "train") == "train" and res.get("setting") == setting and res.get("seed") == seed
             and res.get("checkpoint") and Path(res["checkpoint"]).is_file()]
    if not found:
        raise ESQUserError(f"{spec}: no finished training run of setting {setting} with seed {seed} under {runs_root} "
                           "(set paths.runs_root=... and seed=..., or give a checkpoint path)")
    kinds = {(r.get("dataset"), r.get("model")) for r in found}
    if len(kinds) > 1:
        raise ESQUserError(f"{spec}: runs of setting {setting} for several data/models under {runs_root} "
                           f"({sorted(kinds)}); give a checkpoint path or a narrower paths.runs_root")
    return max(found, key=lambda r: Path(r["checkpoint"]).stat().st_mtime)["checkpoint"]
