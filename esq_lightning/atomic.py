"""The one atomic writer: every file a run leaves (results.json, reports, checkpoints, evaluation state, exports)
is written to a temporary file beside its target, fsynced, renamed into place, and the folder fsynced.

A reader, or a run killed at any point, sees the old file or the new one, never half of one. The temporary file
lives in the target's folder (same filesystem, so os.replace is an atomic rename); a temporary file in the system
temp folder would make the final move a copy wherever /tmp is another filesystem (a tmpfs, a container overlay).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    # Reading it from /proc avoids os.umask's set-and-restore, which races with other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. a platform without directory file descriptors
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class WriteFailed(OSError):
    """A file could not be written (disk full, file-size limit, read-only place); the previous file is intact.

    The CLI prints its message as one line (exit code 2): it names the file and says the old one is unchanged."""


def _failed(path: Path, exc: OSError) -> WriteFailed:
    had = "the previous file is unchanged" if path.exists() else "no file was left there"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return WriteFailed(exc.errno, f"could not write {path}: {reason}; {had}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = True) -> None:
    """Call write(f) on a temporary file beside `path`, then make it `path` atomically and durably.

    A failure to write (ENOSPC, EFBIG under RLIMIT_FSIZE, EROFS, EACCES) raises WriteFailed, one line naming the
    file; the target keeps its previous content and no temporary file is left."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _failed(path, exc) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions an ordinary open() would (shared run folders).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, WriteFailed):
            raise
        raise _failed(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj, path) such that a crash at any point leaves the old file or the new one."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
