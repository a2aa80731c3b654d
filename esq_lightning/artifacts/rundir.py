"""A run directory belongs to one run: a lock while a run works in it, and no second run over a finished one.

esq-train and esq-eval claim their run directory before Hydra writes anything into it (the Hydra callback
RunDirGuard, conf/hydra/default.yaml and eval.yaml, runs before Hydra creates the directory and saves
.hydra/config.yaml), and train()/evaluate() claim it again for callers that do not go through Hydra (the Python
API, tests); a claim this process already holds is not taken twice.

What a claim refuses, in one line naming the directory (ESQUserError, exit code 2):
- a directory another live run holds the lock of (two runs given the same hydra.run.dir at once);
- for esq-train: a directory holding a finished run (results.json or checkpoints/final.ckpt) or an
  interrupted one (checkpoints/last.ckpt), unless this run resumes that same run (ckpt_path= inside it);
- for esq-eval: a directory holding a training run (its records are never replaced by an evaluation's).
A run refused before it starts leaves no directory behind: the directory this invocation created is removed
again (forget_fresh_run_dir), as long as it holds nothing but what Hydra wrote.
Ranks 1..N-1 of a data-parallel run work in rank 0's directory: only rank 0 claims it.
"""

from __future__ import annotations

import atexit
import os
import shutil
from pathlib import Path
from typing import Any

from esq_lightning.errors import ESQUserError

LOCK_NAME = ".esq-run.lock"
RESULTS = "results.json"
# What Hydra (and the lock) put into a run directory before the task starts: such a directory holds no record.
_HYDRA_ONLY = {".hydra", LOCK_NAME}

_HELD: dict[str, Any] = {}  # resolved run dir -> FileLock held by this process
_FRESH: set[str] = set()  # run dirs this process created (removed again if the run is refused)


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def is_secondary_rank() -> bool:
    """True in ranks 1..N-1 of a data-parallel run (Lightning's launcher, torchrun, SLURM set these)."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _record_task(run_dir: Path) -> str | None:
    """The task of the record in run_dir (train/eval/...), 'train' for a readable record without one, or None."""
    import json

    path = run_dir / RESULTS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable"
    return str(record.get("task", "train")) if isinstance(record, dict) else "unreadable"


def describe_contents(run_dir: Path) -> tuple[str | None, str | None]:
    """(finished, interrupted): what marks run_dir as a finished or interrupted training run, or None."""
    finished = None
    task = _record_task(run_dir)
    if task is not None and task != "eval":
        finished = f"{RESULTS} of a {task} run" if task != "unreadable" else RESULTS
    elif (run_dir / "checkpoints" / "final.ckpt").is_file():
        finished = "checkpoints/final.ckpt"
    interrupted = "checkpoints/last.ckpt" if (run_dir / "checkpoints" / "last.ckpt").is_file() else None
    return finished, interrupted


def _inside(path: str | Path | None, run_dir: Path) -> bool:
    if path is None:
        return False
    try:
        Path(path).resolve().relative_to(run_dir.resolve())
    except ValueError:
        return False
    return True


def check_run_dir(run_dir: str | Path, task: str, resume_from: str | None = None) -> None:
    """Refuse run_dir for this run (see the module docstring); resume_from: the ckpt_path= of esq-train, as given."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    finished, interrupted = describe_contents(run_dir)
    if task == "eval":
        if finished or interrupted or (run_dir / "checkpoints").is_dir():
            what = finished or interrupted or "checkpoints/"
            raise ESQUserError(
                f"hydra.run.dir: {run_dir} holds a training run ({what}); esq-eval never writes over a training "
                f"record: give it a directory of its own, e.g. hydra.run.dir={run_dir / 'eval'} (or leave "
                f"hydra.run.dir unset)"
            )
        return
    eval_record = _record_task(run_dir) == "eval"
    if eval_record:
        raise ESQUserError(
            f"hydra.run.dir: {run_dir} holds an evaluation record ({RESULTS} of esq-eval); "
            "choose another hydra.run.dir for a training run"
        )
    resuming_here = resume_from is not None and (str(resume_from) == "last" or _inside(resume_from, run_dir))
    if (finished or interrupted) and not resuming_here:
        if resume_from is not None:
            raise ESQUserError(
                f"hydra.run.dir: {run_dir} holds another run ({finished or interrupted}) than the one ckpt_path="
                f"{resume_from} resumes; resume a run in its own directory, or choose a new hydra.run.dir"
            )
        if finished:
            raise ESQUserError(
                f"hydra.run.dir: {run_dir} holds a finished run ({finished}); a run never writes over another: "
                f"choose another hydra.run.dir (or leave it unset), or train on with ckpt_path=last and a larger "
                f"trainer.max_epochs"
            )
        raise ESQUserError(
            f"hydra.run.dir: {run_dir} holds an interrupted run ({interrupted}); resume it with ckpt_path=last "
            f"and the same config, or choose another hydra.run.dir"
        )


def claim_run_dir(run_dir: str | Path, task: str, resume_from: str | None = None) -> bool:
    """Check run_dir for this run and lock it for this process; False when this process holds it already.

    The lock (filelock, released when the process ends, also on kill -9) makes a second run given the same
    directory at the same time fail with one line instead of mixing checkpoints and results.
    """
    if is_secondary_rank():
        return False
    run_dir = Path(run_dir)
    key = _key(run_dir)
    if key in _HELD:
        return False
    from filelock import FileLock, Timeout

    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ESQUserError(
            f"hydra.run.dir: cannot create {run_dir}: {exc.strerror or exc}; choose a writable "
            "place (paths.runs_root=... or hydra.run.dir=...)"
        ) from None
    if created:
        _FRESH.add(key)
    lock = FileLock(str(run_dir / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ESQUserError(
            f"hydra.run.dir: {run_dir} is in use by another run that is still working (it holds "
            f"{run_dir / LOCK_NAME}); wait for it to end, or choose another hydra.run.dir"
        ) from None
    except OSError as exc:
        raise ESQUserError(
            f"hydra.run.dir: cannot write into {run_dir}: {exc.strerror or exc}; choose a writable "
            "place (paths.runs_root=... or hydra.run.dir=...)"
        ) from None
    _HELD[key] = lock
    try:
        check_run_dir(run_dir, task, resume_from)
    except ESQUserError:
        release_run_dir(run_dir)
        raise
    return True


def release_run_dir(run_dir: str | Path) -> None:
    lock = _HELD.pop(_key(run_dir), None)
    if lock is not None:
        lock.release()


def forget_fresh_run_dir() -> None:
    """Remove the run directories this invocation created and left without a record (a refused run).

    Only a directory holding nothing but Hydra's .hydra/, a log file and the lock goes; anything else stays.
    """
    for key in list(_FRESH):
        path = Path(key)
        if key in _HELD:
            release_run_dir(path)
        try:
            entries = list(path.iterdir())
        except OSError:
            _FRESH.discard(key)
            continue
        if all(
            e.name in _HYDRA_ONLY or e.suffix == ".log" or e.name == "csv" and not any(e.iterdir()) for e in entries
        ):
            shutil.rmtree(path, ignore_errors=True)
        _FRESH.discard(key)


def release_all() -> None:
    for key in list(_HELD):
        release_run_dir(key)
    _FRESH.clear()


atexit.register(release_all)


# ---- the Hydra callback ------------------------------------------------------------------------------------------
try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - Hydra is a dependency
    _Callback = object  # type: ignore[misc,assignment]


class RunDirGuard(_Callback):  # type: ignore[misc]
    """Claims hydra.run.dir before Hydra creates it and saves .hydra/ there (Callback.on_run_start).

    A refusal prints its one line and exits with code 2 here: Hydra would otherwise print its own report.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        import sys

        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        try:
            HydraConfig.instance().set_config(config)
            run_dir = OmegaConf.select(config, "hydra.run.dir")
            task = str(OmegaConf.select(config, "task_name", default="train"))
            resume = OmegaConf.select(config, "ckpt_path", default=None) if task == "train" else None
        except Exception:
            return
        if run_dir is None:
            return
        try:
            claim_run_dir(Path(str(run_dir)), task, None if resume is None else str(resume))
        except ESQUserError as exc:
            forget_fresh_run_dir()
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """esq-train -m: every job's config is checked before the first job runs (config/jobs.py)."""
        import sys

        from omegaconf import OmegaConf

        if is_secondary_rank() or str(OmegaConf.select(config, "task_name", default="")) != "train":
            return
        from esq_lightning.config.jobs import check_jobs

        try:
            check_jobs(str(config.hydra.job.config_name), list(config.hydra.overrides.task))
        except ESQUserError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        release_all()
