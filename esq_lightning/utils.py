"""Small shared helpers: thread counts and file digests (atomic writes: atomic.py; step generators: rng.py)."""

from __future__ import annotations

import hashlib
import os

import torch


def _cgroup_cpu_limit() -> int | None:
    # A container's CPU quota (cgroup v2 cpu.max "quota period") is invisible to os.cpu_count().
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(int(quota) // int(period)))


def usable_cpus() -> int:
    """Logical CPUs this process may run on: the affinity mask, capped by a cgroup CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    return min(n, limit) if limit else n


def physical_cores() -> int:
    """Usable cores without SMT siblings: a second hardware thread per core speeds up convolutions little."""
    per_core = 1
    try:
        # e.g. "0,64" or "0-1": the hardware threads that share core 0.
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as fh:
            siblings = fh.read().strip()
        per_core = 0
        for part in siblings.split(","):
            lo, _, hi = part.partition("-")
            per_core += int(hi) - int(lo) + 1 if hi else 1
    except (OSError, ValueError):
        per_core = 1
    return max(1, usable_cpus() // max(1, per_core))


def concurrent_jobs() -> int:
    """How many processes of this kind share the machine, from the launchers' environment (1 if unknown)."""
    for var in ("ESQ_CONCURRENT_JOBS", "PYTEST_XDIST_WORKER_COUNT"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def auto_threads() -> int:
    """Threads that do not oversubscribe the CPU: an explicit OMP_NUM_THREADS wins (joblib/loky workers of a
    Hydra sweep get cpu_count // n_jobs there), else physical cores // concurrent jobs (pytest-xdist workers,
    ESQ_CONCURRENT_JOBS)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, physical_cores() // concurrent_jobs())


def set_threads(threads: int | str | None) -> int:
    """Set torch's intra-op threads: a number, "auto" (see auto_threads) or None (torch's default).

    Returns the number in force.
    """
    if isinstance(threads, str):
        if threads.strip().lower() != "auto":
            if not threads.strip().isdigit():
                raise ValueError(f"threads must be a positive integer, 'auto' or null, got {threads!r}")
            threads = int(threads)
        else:
            threads = auto_threads()
    if threads is not None and threads > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB blocks (checkpoint identities, export provenance, archive checks)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
