"""Resumable evaluation: the per-sample results of every (attack, batch), written atomically as an evaluation goes.

esq-eval (whitebox) keeps <run dir>/eval_state/:

    identity.json            what the results depend on (checkpoint hash, test inputs hash, eps, attacks,
                             parameters, n_samples, batch size, seed); another config refuses to resume
    clean/000000.json ...    one file per batch: its inputs [start, stop), the per-sample mask as a string
    <attack>/000000.json     of 0/1 ("stayed correct"), and the attack's parameter record for that batch

Every file is written with utils.atomic_write_json (temporary file, fsync, rename), so a kill at any point
leaves whole batches only. Re-running the same command in the same run directory reads the finished
batches and computes the rest. A batch's result depends on its inputs and the attack's parameters only:
the registry seeds each attack call from its `seed` parameter, and run_in_batches seeds the global RNGs
per (seed, attack, batch) for anything else, so a batch computed after a resume, or on another process
(evaluation/distributed.py), equals the one of an uninterrupted single-process run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from esq_lightning.atomic import atomic_write_json
from esq_lightning.errors import ESQUserError
from esq_lightning.utils import file_digest

STATE_DIR = "eval_state"
FORMAT = 1
_MASK64 = (1 << 64) - 1


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every batch of n inputs; the last one may be shorter."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def batch_seed(seed: int, key: str, index: int) -> int:
    """A seed for batch `index` of `key` (an attack name or "clean"): a pure function of the three, so it
    is the same whichever process runs the batch and whether or not the evaluation was resumed."""
    z = (
        int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(key.encode()) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB
    ) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def tensor_digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def evaluation_identity(
    checkpoint: str | Path,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str],
    eps: float,
    params: Mapping[str, Any],
    n_samples: int | None,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """What an evaluation's per-batch results depend on; two runs with equal identities give equal batches."""
    if n_samples is not None:
        x, y = x[:n_samples], y[:n_samples]
    return {
        "format": FORMAT,
        "checkpoint_sha256": file_digest(checkpoint),
        "test_inputs_sha256": tensor_digest(x, y),
        "n_samples": len(y),
        "eps": float(eps),
        "attacks": list(attacks),
        "params": json.loads(json.dumps(dict(params), sort_keys=True)),
        "batch_size": int(batch_size),
        "seed": int(seed),
    }


_WHAT = {
    "checkpoint_sha256": "another checkpoint (its sha256 differs)",
    "test_inputs_sha256": "other test inputs (data or n_samples)",
    "format": "an older state format",
}


def _difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    for key in dict.fromkeys([*new, *old]):
        if old.get(key) != new.get(key):
            if key in _WHAT:
                return _WHAT[key]
            name = {
                "eps": "eval.eps",
                "attacks": "eval.attacks",
                "params": "eval.params",
                "n_samples": "eval.n_samples",
                "batch_size": "eval.batch_size",
            }.get(key, key)
            return f"{name}={json.dumps(old.get(key))} there, {json.dumps(new.get(key))} here"
    return "nothing"


def _mask_text(mask: Tensor) -> str:
    return "".join("1" if v else "0" for v in mask.tolist())


def _mask_of(text: str) -> Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


class EvalStore:
    """The per-batch results of one evaluation under <run dir>/eval_state (see the module docstring)."""

    def __init__(self, folder: str | Path, identity: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = dict(identity)

    @classmethod
    def open(cls, run_dir: str | Path, identity: Mapping[str, Any], resume: bool | str = "auto") -> EvalStore:
        """The store of run_dir: continued when it holds this evaluation, refused (one line) when it holds another.

        resume: "auto" continues a partial evaluation of the same config (and starts one when there is none),
        True requires one to continue, False discards what is there and starts over.
        """
        folder = Path(run_dir) / STATE_DIR
        id_file = folder / "identity.json"
        old = None
        if id_file.is_file():
            try:
                old = json.loads(id_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ESQUserError(
                    f"resume: cannot read {id_file} ({type(exc).__name__}); resume=false discards "
                    "the partial evaluation, or use another hydra.run.dir"
                ) from None
        if old is not None and resume is False:
            shutil.rmtree(folder)
            old = None
        if old is None:
            if resume is True:
                raise ESQUserError(
                    f"resume=true: no partial evaluation in {run_dir} to continue; give the "
                    "interrupted evaluation's directory as hydra.run.dir=<its run dir>"
                )
            atomic_write_json(id_file, dict(identity))
            return cls(folder, identity)
        if old != dict(identity):
            raise ESQUserError(
                f"resume: {folder} holds a partial evaluation of another config ({_difference(old, identity)}); "
                "rerun with the same config to continue it, resume=false to discard it, or another hydra.run.dir"
            )
        store = cls(folder, identity)
        done = store.finished_batches()
        if done:
            print(f"resuming the evaluation in {run_dir}: {done} batches already done", flush=True)
        return store

    def _path(self, key: str, index: int) -> Path:
        return self.folder / key / f"{index:06d}.json"

    def finished_batches(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json"))

    def get(self, key: str, index: int, start: int, stop: int) -> tuple[Tensor, dict[str, Any]] | None:
        """(mask, parameter record) of a finished batch, or None when it is still to compute."""
        path = self._path(key, index)
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if (rec.get("start"), rec.get("stop")) != (start, stop) or len(rec.get("correct", "")) != stop - start:
            return None
        return _mask_of(rec["correct"]), rec.get("params") or {}

    def put(self, key: str, index: int, start: int, stop: int, mask: Tensor, params: Mapping[str, Any]) -> None:
        atomic_write_json(
            self._path(key, index),
            {
                "key": key,
                "batch": index,
                "start": start,
                "stop": stop,
                "correct": _mask_text(mask),
                "params": dict(params),
            },
        )


def run_in_batches(
    key: str,
    n: int,
    batch_size: int,
    compute: Callable[[int, int], tuple[Tensor, Mapping[str, Any]]],
    store: EvalStore | None = None,
    shard: Any | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Run compute(start, stop) -> (per-sample bool mask, parameter record) over every batch of n inputs.

    With a store, finished batches are read back and new ones written as they finish; with a shard
    (evaluation/distributed.py), this process computes its share of the batches and the masks of all
    processes are gathered. Returns the mask of all n inputs, in order, and the batches' records.
    """
    bounds = batch_bounds(n, batch_size)
    mine = shard.batches(len(bounds)) if shard is not None else range(len(bounds))
    done: dict[int, tuple[Tensor, dict[str, Any]]] = {}
    device = torch.device(device)
    for index in tqdm(mine, desc=key, disable=not progress, leave=False):
        start, stop = bounds[index]
        got = store.get(key, index, start, stop) if store is not None else None
        if got is None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(batch_seed(seed, key, index))
                mask, params = compute(start, stop)
            # Through JSON, so a batch computed now and one read back after a resume are the same objects.
            mask, params = mask.detach().cpu().bool(), json.loads(json.dumps(dict(params)))
            if store is not None:
                store.put(key, index, start, stop, mask, params)
            got = (mask, params)
        done[index] = got
    if shard is not None and shard.world_size > 1:
        done = shard.merge(done)
    missing = [i for i in range(len(bounds)) if i not in done]
    if missing:
        raise RuntimeError(f"{key}: batches {missing[:5]} were evaluated by no process")
    masks = [done[i][0] for i in range(len(bounds))]
    return (torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)), [done[i][1] for i in range(len(bounds))]


def open_store(run_dir: str | Path, identity: Mapping[str, Any], resume: Any, shard: Any | None = None) -> EvalStore:
    """EvalStore.open on the main process, then on the others once it has checked (or reset) the folder.

    resume: auto (default), true or false (see EvalStore.open). A refusal is raised on every process.
    """
    if resume not in (True, False, "auto"):
        raise ESQUserError(
            f"resume: {resume!r} is not allowed; allowed: auto (continue a partial evaluation of the "
            "same config in this run directory), true (require one), false (start over)"
        )
    error = None
    if shard is None or shard.is_main:
        try:
            store = EvalStore.open(run_dir, identity, resume)
        except ESQUserError as exc:
            error = str(exc)
    if shard is not None:
        error = shard.broadcast(error)
    if error is not None:
        raise ESQUserError(error)
    if shard is not None and not shard.is_main:
        store = EvalStore(Path(run_dir) / STATE_DIR, identity)
    if shard is None or shard.is_main:
        print(
            f"per-batch results go to {store.folder}; if interrupted, rerun the same command with "
            f"hydra.run.dir={run_dir} to continue",
            flush=True,
        )
    return store
