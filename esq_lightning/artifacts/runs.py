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

import yaml

from esq_lightning.artifacts.results import NOT_TRAINING_KEYS, flatten
from esq_lightning.errors import ESQUserError, show_value

RESULTS = "results.json"


def iter_results(
    root: str | Path, unreadable: list[tuple[Path, str]] | None = None, required: tuple[str, ...] = ()
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every readable results.json under root (a run or multirun directory), as (run_dir, results).

    The others (a run that is still writing, a corrupt or foreign file, a record with a field of the wrong type or
    without a `required` field: record_problem) are skipped; with `unreadable`, each is appended to it as (path, why).
    """
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.rglob(RESULTS)):
        record = read_json_record(path, unreadable)
        if record is None:
            continue
        problem = record_problem(record, required)
        if problem is not None:
            if unreadable is not None:
                unreadable.append((path, problem))
            continue
        yield path.parent, record


# The results record's schema (artifacts/results.py build_results writes it): the fields every record has, and the
# type of each field a reader relies on wherever it is present. Numbers exclude booleans.
_NUMBER, _INT, _STR, _DICT, _LIST, _NONE = "a number", "an integer", "a string", "an object", "a list", "null"
RECORD_REQUIRED = ("dataset", "model", "seed", "clean_acc", "robust_acc")
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "schema_version": (_INT,),
    "task": (_STR,),
    "setting": (_STR, _NONE),
    "dataset": (_STR,),
    "model": (_STR,),
    "method": (_STR,),
    "quant": (_STR,),
    "bits": (_INT,),
    "act_bits": (_INT,),
    "seed": (_INT,),
    "clean_acc": (_NUMBER,),
    "robust_acc": (_DICT,),
    "attacks": (_DICT,),
    "threat_model": (_DICT, _NONE),
    "train_threat_model": (_DICT, _NONE),
    "n_samples": (_INT, _NONE),
    "pairing": (_DICT,),
    "epochs": (_INT,),
    "train_seconds": (_NUMBER,),
    "checkpoint": (_STR, _NONE),
    "run_dir": (_STR,),
    "audit": (_DICT,),
    "worst_case": (_DICT,),
    "warnings": (_LIST,),
    "model_width": (_DICT,),
    "sq_ratio_final": (_NUMBER,),
    "eval_sq_ratio": (_NUMBER,),
    "init_from": (_STR, _NONE),
}


def _is(value: Any, kind: str) -> bool:
    if kind == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {_STR: str, _DICT: dict, _LIST: list, _NONE: type(None)}[kind])


def _type_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {
            "bool": "a boolean",
            "str": "a string",
            "dict": "an object",
            "list": "a list",
            "int": "an integer",
            "float": "a number",
        }.get(type(value).__name__, type(value).__name__)
    )


def record_problem(record: dict[str, Any], required: tuple[str, ...] = RECORD_REQUIRED) -> str | None:
    """None for a record that fits the schema, else one phrase naming the first field that does not."""
    for key in required:
        if key not in record:
            return f"field {key}: missing"
    for key, kinds in RECORD_FIELDS.items():
        if key in record and not any(_is(record[key], k) for k in kinds):
            return f"field {key}: {_type_name(record[key])} where {' or '.join(kinds)} belongs"
    for name, acc in (record.get("robust_acc") or {}).items():
        if not _is(acc, _NUMBER):
            return f"field robust_acc.{name}: {_type_name(acc)} where a number belongs"
    return None


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


def find_runs(
    runs_root: str | Path,
    setting: str,
    *,
    seed: int | None = None,
    dataset: str | None = None,
    model: str | None = None,
    threat_model: dict[str, Any] | None = None,
    width: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
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


def stored_training_config(res: dict[str, Any], run_dir: str | Path | None = None) -> dict[str, Any]:
    """A finished run's training config: results.json `train_config`, or for older records the run's
    .hydra/config.yaml with the same keys left out ({} when neither exists)."""
    if isinstance(res.get("train_config"), dict):
        return res["train_config"]
    if run_dir is None:
        if not res.get("checkpoint"):
            return {}
        run_dir = Path(res["checkpoint"]).parent.parent
    hydra_config = Path(run_dir) / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        try:
            tree = yaml.safe_load(hydra_config.read_text())
        except (OSError, yaml.YAMLError):
            tree = None
        if isinstance(tree, dict):
            return flatten(tree, skip=NOT_TRAINING_KEYS)
    return {}


def config_differences(configs: list[dict[str, Any]], ignore: tuple[str, ...] = ("seed",)) -> dict[str, list[Any]]:
    """{key: its distinct values} for every key whose value differs among the given training configs."""
    keys = sorted({k for c in configs for k in c} - set(ignore))
    out = {}
    for key in keys:
        values: list[Any] = []
        for c in configs:
            value = c.get(key, "(absent)")
            if value not in values:
                values.append(value)
        if len(values) > 1:
            out[key] = values
    return out


# `setting:NAME/key:value/...` narrows the candidates to runs whose training config has key = value (the value as
# YAML reads it: 30, 0.2, true, bwn). Written with ':' and '/', it needs no quoting on a Hydra command line.
def parse_setting_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """('NF', {key: value}) of `setting:NF/key:value/...`; a filter without ':' is a one-line error."""
    name, *parts = str(spec).split(":", 1)[1].split("/")
    filters: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition(":")
        if not sep or not key:
            raise ESQUserError(
                f"{spec}: the filter {part!r} is not key:value (e.g. setting:{name}/trainer.max_epochs:30)"
            )
        filters[key] = yaml.safe_load(value)
    return name, filters


def _matches(config: dict[str, Any], filters: dict[str, Any]) -> bool:
    return all(
        key in config and (config[key] == value or str(config[key]) == str(value)) for key, value in filters.items()
    )


def choose_run(found: list[dict[str, Any]], spec: str, filters: dict[str, Any], where: str) -> dict[str, Any]:
    """The one run `spec` names among `found` (newest first): the newest of those whose training configs equal
    each other but for the seed. Runs of several configs are refused with what differs and how to pick one."""
    configs = [stored_training_config(r) for r in found]
    if filters:
        kept = [(r, c) for r, c in zip(found, configs, strict=True) if _matches(c, filters)]
        if not kept:
            shown = ", ".join(f"{k}:{v}" for k, v in filters.items())
            raise ESQUserError(f"{spec}: none of the {len(found)} finished run(s) found {where} has {shown}")
        found, configs = [r for r, _ in kept], [c for _, c in kept]
    differences = config_differences(configs)
    if not differences:
        return found[0]
    shown = "; ".join(
        f"{key}: {' | '.join(show_value(v) for v in values)}" for key, values in list(differences.items())[:6]
    )
    more = f" (and {len(differences) - 6} more keys)" if len(differences) > 6 else ""
    key, values = next(iter(differences.items()))
    runs = ", ".join(str(Path(r["checkpoint"]).parent.parent) for r in found[:4])
    setting = spec.split(":", 1)[1].split("/")[0]
    raise ESQUserError(
        f"{spec}: {len(found)} finished runs {where} differ in their training config ({shown}{more}); pick one: "
        f"a run directory ({runs}{', ...' if len(found) > 4 else ''}) or a key filter, e.g. "
        f"setting:{setting}/{key}:{values[0]}"
    )


def resolve_run_dir(spec: str) -> str | None:
    """The checkpoint of a finished run directory given where a checkpoint is expected, else None."""
    path = Path(spec)
    record = read_json_record(path / RESULTS) if path.is_dir() and (path / RESULTS).is_file() else None
    if record is None or not record.get("checkpoint"):
        return None
    return str(record["checkpoint"])


def _width(width: dict[str, Any] | None) -> str:
    return "".join(f", {k} {v}" for k, v in sorted((width or {}).items()))


def _describe(tm: dict[str, Any] | None) -> str:
    return "no training attack" if tm is None else f"{tm.get('norm')} eps={float(tm['eps']):.4g}"


def resolve_init_from(
    spec: str | None,
    runs_root: str | Path,
    dataset: str,
    model: str,
    seed: int,
    threat_model: dict[str, Any] | None = None,
    init_seed: int | None = None,
    width: dict[str, Any] | None = None,
) -> str | None:
    """A checkpoint path for `init_from`.

    `setting:NF` picks the newest finished run of setting NF with the same dataset, model, training threat
    model, width and seed (`init_seed` when given) under runs_root, so a quantization stage finds the
    full-precision start of an earlier stage without a hand-copied path. Another seed or threat model is
    never taken silently: the error says what exists.
    """
    if spec is None or not str(spec).startswith("setting:"):
        if spec is not None and resolve_run_dir(spec):
            return resolve_run_dir(spec)
        if spec is not None and not Path(spec).is_file():
            raise ESQUserError(f"init_from: file not found: {spec}")
        return spec
    setting, filters = parse_setting_spec(str(spec))
    want_seed = seed if init_seed is None else int(init_seed)
    found = find_runs(
        runs_root, setting, seed=want_seed, dataset=dataset, model=model, threat_model=threat_model, width=width
    )
    if found:
        return choose_run(found, f"init_from={spec}", filters, f"under {runs_root}")["checkpoint"]
    others = find_runs(runs_root, setting, dataset=dataset, model=model)
    if not others:
        raise ESQUserError(
            f"init_from={spec}: no finished run of setting {setting} for data={dataset} model={model} under "
            f"{runs_root} (train it first, e.g. esq-train experiment={dataset}/{setting}, or give a checkpoint path)"
        )
    seen = sorted(
        {(int(r.get("seed", -1)), _describe(train_threat_model(r)), _width(r.get("model_width"))) for r in others}
    )
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
        return resolve_run_dir(str(spec)) or str(spec)
    setting, filters = parse_setting_spec(str(spec))
    found = find_runs(runs_root, setting, seed=seed)
    if not found:
        raise ESQUserError(
            f"{spec}: no finished training run of setting {setting} with seed {seed} under {runs_root} "
            "(set paths.runs_root=... and seed=..., or give a checkpoint path)"
        )
    kinds = {(r.get("dataset"), r.get("model")) for r in found}
    if len(kinds) > 1:
        raise ESQUserError(
            f"{spec}: runs of setting {setting} for several data/models under {runs_root} "
            f"({sorted(kinds)}); give a checkpoint path or a narrower paths.runs_root"
        )
    return choose_run(found, spec, filters, f"with seed {seed} under {runs_root}")["checkpoint"]
