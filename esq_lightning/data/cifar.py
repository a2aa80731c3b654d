"""CIFARDataModule: CIFAR-10/100 from the official python-version archives, read safely, no torchvision."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esq_lightning.atomic import atomic_write
from esq_lightning.config.choices import CIFAR_FILES
from esq_lightning.data.augment import CropFlip
from esq_lightning.data.base import TensorDataModule
from esq_lightning.data.loader import AugmentFn
from esq_lightning.utils import file_digest


class CorruptArchiveError(RuntimeError):
    """A CIFAR archive or batch file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class CifarMeta:
    """Where a CIFAR variant lives inside its official archive."""

    title: str
    archive: str
    folder: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR_META: dict[str, CifarMeta] = {
    "cifar10": CifarMeta(
        title="CIFAR-10",
        archive=CIFAR_FILES["cifar10"][0],
        folder=CIFAR_FILES["cifar10"][1],
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarMeta(
        title="CIFAR-100",
        archive=CIFAR_FILES["cifar100"][0],
        folder=CIFAR_FILES["cifar100"][1],
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def cifar_meta(name: str) -> CifarMeta:
    """Archive layout of `name` ("cifar10" or "cifar100")."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in CIFAR_META:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_META)}")
    return CIFAR_META[key]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a CIFAR batch needs nothing else, and a tampered
    archive then cannot run code on load."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"disallowed global {module}.{name}")
        return super().find_class(module, name)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _parse_batch(raw: bytes, label_key: str, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3072) uint8 pixels and (N,) labels from one pickled batch; CorruptArchiveError otherwise."""
    try:
        d = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        # Keys are bytes in the official (Python 2) pickles; accept str keys as well.
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except Exception as exc:
        raise CorruptArchiveError(f"corrupt CIFAR batch {where}: {_one_line(exc)}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise CorruptArchiveError(
            f"corrupt CIFAR batch {where}: data {data.shape}, labels {labels.shape} (expected (N, 3072), (N,))"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptArchiveError(f"corrupt CIFAR batch {where}: labels outside [0, {num_classes})")
    return data, labels


def _to_tensors(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # Rows are channel-major (1024 red, 1024 green, 1024 blue, each row-major 32x32).
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float().div_(255.0)
    return x, torch.from_numpy(labels).long()


def _folder_complete(folder: Path, meta: CifarMeta) -> bool:
    return all((folder / f).is_file() for f in meta.train_files + meta.test_files)


def _read_folder(folder: Path, meta: CifarMeta) -> tuple[torch.Tensor, ...]:
    def read(files: Iterable[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for f in files:
            path = folder / f
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise CorruptArchiveError(f"cannot read CIFAR batch {path}: {_one_line(exc)}") from exc
            out.append(_parse_batch(raw, meta.label_key, meta.num_classes, str(path)))
        return out

    return (*_to_tensors(read(meta.train_files)), *_to_tensors(read(meta.test_files)))


def _read_tarball(archive: Path, meta: CifarMeta) -> tuple[torch.Tensor, ...]:
    """Read the batch files straight from the archive, in memory: nothing is written to disk."""
    wanted = {f"{meta.folder}/{f}": f for f in meta.train_files + meta.test_files}
    raws: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    raws[wanted[name]] = fobj.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise CorruptArchiveError(f"corrupt CIFAR archive {archive}: {_one_line(exc)}") from exc
    missing = [f for f in wanted.values() if f not in raws]
    if missing:
        raise CorruptArchiveError(f"corrupt CIFAR archive {archive}: missing {', '.join(missing)}")

    def parse(files: Iterable[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [_parse_batch(raws[f], meta.label_key, meta.num_classes, f"{archive}:{f}") for f in files]

    return (*_to_tensors(parse(meta.train_files)), *_to_tensors(parse(meta.test_files)))


def load_cifar(data_dir: str | os.PathLike, name: str = "cifar10") -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) from `data_dir`, x float32 (N, 3, 32, 32) in [0, 1], y int64.

    Reads the extracted folder when it is complete, else the tarball; FileNotFoundError (one line)
    when neither is there, CorruptArchiveError naming the file when one cannot be read.
    """
    meta = cifar_meta(name)
    root = Path(data_dir)
    folder, archive = root / meta.folder, root / meta.archive
    if _folder_complete(folder, meta):
        return _read_folder(folder, meta)
    if archive.is_file():
        return _read_tarball(archive, meta)
    raise FileNotFoundError(
        f"{meta.title} not found in {root}: expected {meta.archive} or {meta.folder}/ "
        "(set data.data_dir=..., or data.download=true when online)"
    )


def download_cifar(data_dir: str | os.PathLike, name: str = "cifar10", timeout: float = 60.0) -> Path:
    """Fetch the official archive into `data_dir` (if absent) and check its md5; returns its path."""
    meta = cifar_meta(name)
    root = Path(data_dir)
    archive = root / meta.archive
    if archive.is_file() and file_digest(archive, "md5") == meta.md5:
        return archive

    def fetch(out: Any) -> None:
        md5 = hashlib.md5()
        with urllib.request.urlopen(meta.url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                md5.update(block)
                out.write(block)
        if md5.hexdigest() != meta.md5:
            raise CorruptArchiveError(f"download of {meta.url} has md5 {md5.hexdigest()}, expected {meta.md5}")

    # Written beside the target and renamed only once its md5 matches (atomic.py).
    atomic_write(archive, fetch)
    return archive


def _safe_members(tar: tarfile.TarFile, folder: str, archive: Path) -> list[tarfile.TarInfo]:
    """Members under `folder/` that are plain files or directories with no way out of the target."""
    members = []
    for m in tar.getmembers():
        name = m.name.removeprefix("./")
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise CorruptArchiveError(f"unsafe member {m.name!r} in CIFAR archive {archive}")
        if parts and parts[0] == folder:
            members.append(m)
    return members


def extract_cifar(data_dir: str | os.PathLike, name: str = "cifar10") -> Path:
    """Extract the archive's batch folder into `data_dir` safely and atomically; returns the folder.

    Absolute paths, `..`, links and device files are refused; extraction goes to a temporary folder
    that is renamed into place, so an interrupted run never leaves a half folder that looks complete.
    """
    meta = cifar_meta(name)
    root = Path(data_dir)
    archive, folder = root / meta.archive, root / meta.folder
    if _folder_complete(folder, meta):
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, meta.folder, archive)
                # The "data" filter (Python >= 3.11.4) re-checks paths and strips unsafe modes.
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise CorruptArchiveError(f"corrupt CIFAR archive {archive}: {_one_line(exc)}") from exc
        if not _folder_complete(tmp / meta.folder, meta):
            raise CorruptArchiveError(f"corrupt CIFAR archive {archive}: batch files missing")
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier extraction
        os.replace(tmp / meta.folder, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _resolve_dir(data_dir: str | os.PathLike) -> Path:
    """Relative paths are relative to the launch directory under Hydra (which chdirs), else to cwd."""
    path = Path(data_dir).expanduser()
    if path.is_absolute():
        return path
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import to_absolute_path

        if HydraConfig.initialized():
            return Path(to_absolute_path(str(path)))
    except ImportError:
        pass
    return path


class CIFARDataModule(TensorDataModule):
    """CIFAR-10 or CIFAR-100, float32 (3, 32, 32) in [0, 1], labels int64 (fine labels for CIFAR-100).

    Data come from `data_dir`: the official tarball or its extracted folder. `download=True` fetches
    the tarball from the Toronto site (md5-checked) in `prepare_data`; nothing is ever downloaded
    otherwise. `val_size=0` (default, as in the paper's setting) validates on the test split;
    `val_size>0` holds out a seeded, stratified part of train (`split_seed`). `augment=True` applies
    the standard random crop (4-pixel zero padding) and horizontal flip to training batches only.
    """

    in_channels = 3
    image_size = 32

    # The defaults serve the Python API; for runs, conf/data/cifar10.yaml / cifar100.yaml are their source.
    def __init__(
        self,
        name: str = "cifar10",
        data_dir: str | os.PathLike = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 0,
        split_seed: int = 0,
        seed: int = 0,
        augment: bool = True,
        device_resident: bool = False,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, device_resident, num_workers, eval_batch_size)
        self.meta = cifar_meta(name)
        self.name = name
        self.data_dir = _resolve_dir(data_dir)
        self.download = download
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        self.num_classes = self.meta.num_classes
        self.mean = self.meta.mean
        self.std = self.meta.std

    def prepare_data(self) -> None:
        """Download when asked and absent, then extract once (Lightning runs this on one process per node)."""
        folder, archive = self.data_dir / self.meta.folder, self.data_dir / self.meta.archive
        if _folder_complete(folder, self.meta):
            return
        if not archive.is_file():
            if not self.download:
                return  # setup() raises the one-line FileNotFoundError
            download_cifar(self.data_dir, self.name)
        try:
            extract_cifar(self.data_dir, self.name)
        except PermissionError:
            pass  # a read-only data_dir: setup() reads the tarball in memory instead

    def _load(self):
        x_train, y_train, x_test, y_test = load_cifar(self.data_dir, self.name)
        if self.val_size <= 0:
            return x_train, y_train, x_test, y_test, x_test, y_test
        if self.val_size >= len(y_train):
            raise ValueError(f"val_size={self.val_size} leaves no training data (train has {len(y_train)})")
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(y_train))
        labels = y_train.numpy()
        # Stratify only when every class can appear on both sides (always, for the real data).
        counts = np.bincount(labels)
        stratify = labels if counts[counts > 0].min() >= 2 and self.val_size >= len(counts[counts > 0]) else None
        train, val = train_test_split(idx, test_size=self.val_size, stratify=stratify, random_state=self.split_seed)
        train, val = torch.as_tensor(np.sort(train)), torch.as_tensor(np.sort(val))
        return x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test

    def _augment_fn(self) -> AugmentFn | None:
        return CropFlip(padding=4, flip=True) if self.augment else None
