"""Test helpers: tiny fake CIFAR-10/100 archives in the official python format (pickled dicts, bytes keys)."""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LAYOUT = {
    # name: (archive, folder, train files, test files, label key, num classes)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


@dataclass
class FakeCifar:
    """What make_fake_cifar wrote: where, and the raw uint8 rows (N, 3072) and labels per split."""

    path: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def _batch_bytes(data: np.ndarray, labels: np.ndarray, label_key: bytes, batch_label: str) -> bytes:
    d = {
        b"batch_label": batch_label.encode(),
        label_key: [int(v) for v in labels],  # a plain list, as in the official pickles
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return pickle.dumps(d, protocol=2)


def make_fake_cifar(
    root: str | Path,
    name: str = "cifar10",
    n_train: int = 50,
    n_test: int = 20,
    as_tarball: bool = True,
    seed: int = 0,
) -> FakeCifar:
    """Write a small CIFAR archive (tarball) or extracted folder into `root`, in the real format.

    Pixels are random uint8 rows of 3072 values (channel-major); labels cycle over all classes so
    every class appears once n >= num_classes. Returns the written arrays for exact checks.
    """
    archive, folder, train_files, test_files, label_key, num_classes = _LAYOUT[name]
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    y_train = rng.permutation(np.arange(n_train) % num_classes).astype(np.int64)
    y_test = rng.permutation(np.arange(n_test) % num_classes).astype(np.int64)

    files: dict[str, bytes] = {}
    for i, idx in enumerate(np.array_split(np.arange(n_train), len(train_files))):
        files[train_files[i]] = _batch_bytes(x_train[idx], y_train[idx], label_key, f"training batch {i + 1}")
    files[test_files[0]] = _batch_bytes(x_test, y_test, label_key, "testing batch 1")
    meta_name = "batches.meta" if name == "cifar10" else "meta"
    files[meta_name] = pickle.dumps({b"num_cases_per_batch": n_train, b"label_names": []}, protocol=2)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if as_tarball:
        path = root / archive
        with tarfile.open(path, "w:gz") as tar:
            dir_info = tarfile.TarInfo(folder)
            dir_info.type = tarfile.DIRTYPE
            dir_info.mode = 0o755
            tar.addfile(dir_info)
            for fname, raw in files.items():
                info = tarfile.TarInfo(f"{folder}/{fname}")
                info.size = len(raw)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(raw))
    else:
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        for fname, raw in files.items():
            (path / fname).write_bytes(raw)
    return FakeCifar(path, x_train, y_train, x_test, y_test, num_classes)


def write_corrupt_cifar(root: str | Path, name: str = "cifar10", as_tarball: bool = True) -> Path:
    """A CIFAR archive (or one batch file of a folder) holding garbage bytes; returns the bad file."""
    archive, folder, train_files, test_files, _, _ = _LAYOUT[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if as_tarball:
        bad = root / archive
        bad.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream" * 10)
        return bad
    make_fake_cifar(root, name, n_train=10, n_test=10, as_tarball=False)
    bad = root / folder / test_files[0]
    bad.write_bytes(b"not a pickle at all")
    return bad


def train_tiny_digits_model(model, steps: int = 300, n_train: int = 1297):
    """(eval-mode model, held-out inputs, labels): `model` trained with Adam on a fixed shuffle of scikit-learn's
    digits (seed 0 order, seed 1 batches), the rest of the images held out. Takes about 2 s."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (64,), generator=batches)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, x[n_train:], y[n_train:]
