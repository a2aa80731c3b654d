"""Tests of the data layer: digits split, TensorBatchLoader, batched augmentation, CIFAR archives, configs."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fakes import make_fake_cifar, write_corrupt_cifar
from hydra import compose, initialize_config_module

import esq_lightning.data.cifar as cifar_mod
from esq_lightning.data import (
    CIFARDataModule,
    CorruptArchiveError,
    DigitsDataModule,
    TensorBatchLoader,
    build_datamodule,
    download_cifar,
    extract_cifar,
    load_cifar,
    random_crop_flip,
)
from esq_lightning.models import SmallCNN

# ---------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup()
    return dm


def test_digits_split_sizes_types_and_range(digits: DigitsDataModule) -> None:
    assert digits.x_train.shape == (1197, 1, 8, 8)
    assert digits.x_val.shape == (300, 1, 8, 8) and digits.x_test.shape == (300, 1, 8, 8)
    for x, y in (digits.train_tensors(), digits.val_tensors(), digits.test_tensors()):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
    assert digits.x_train.max() == 1.0  # 16/16: the scale is 0..16, not 0..255
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)


def test_digits_split_disjoint_stratified_deterministic(digits: DigitsDataModule) -> None:
    idx = digits.split_indices
    sets = [set(idx[k].tolist()) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == 1797
    for y in (digits.y_val, digits.y_test):
        counts = torch.bincount(y, minlength=10)
        assert counts.min() >= 28 and counts.max() <= 32  # 300 / 10 classes, stratified
    again = DigitsDataModule(split_seed=0, seed=5)
    again.setup()
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)
    other = DigitsDataModule(split_seed=1)
    other.setup()
    assert not torch.equal(other.split_indices["test"], idx["test"])


def test_digits_stats_match_config_constants(digits: DigitsDataModule) -> None:
    x = torch.cat([digits.x_train, digits.x_val, digits.x_test])
    assert abs(x.mean().item() - digits.mean[0]) < 1e-3
    assert abs(x.std(unbiased=False).item() - digits.std[0]) < 1e-3


def test_digits_val_size_zero_uses_test_split() -> None:
    dm = DigitsDataModule(val_size=0, test_size=200)
    dm.setup()
    assert dm.x_val is dm.x_test and len(dm.x_train) == 1597


def test_digits_loaders(digits: DigitsDataModule) -> None:
    train = digits.train_dataloader()
    assert len(train) == 19  # ceil(1197 / 64)
    assert sum(len(yb) for _, yb in train) == 1197
    xb, yb = next(iter(digits.test_dataloader()))
    assert torch.equal(xb, digits.x_test[:64]) and torch.equal(yb, digits.y_test[:64])


# ---------------------------------------------------------------------------------------------
# TensorBatchLoader


def _order(loader: TensorBatchLoader) -> torch.Tensor:
    return torch.cat([yb for _, yb in loader])


def test_loader_same_seed_and_epoch_same_order() -> None:
    x, y = torch.zeros(100, 1), torch.arange(100)
    a = TensorBatchLoader(x, y, 16, shuffle=True, seed=3, epoch_fn=lambda: 7)
    b = TensorBatchLoader(x, y, 16, shuffle=True, seed=3, epoch_fn=lambda: 7)
    assert torch.equal(_order(a), _order(b)) and torch.equal(_order(a), _order(a))
    c = TensorBatchLoader(x, y, 16, shuffle=True, seed=3, epoch_fn=lambda: 8)
    d = TensorBatchLoader(x, y, 16, shuffle=True, seed=4, epoch_fn=lambda: 7)
    assert not torch.equal(_order(a), _order(c)) and not torch.equal(_order(a), _order(d))


def test_loader_internal_epoch_counter() -> None:
    x, y = torch.zeros(50, 1), torch.arange(50)
    a = TensorBatchLoader(x, y, 8, shuffle=True, seed=0)
    first, second = _order(a), _order(a)
    assert not torch.equal(first, second)
    b = TensorBatchLoader(x, y, 8, shuffle=True, seed=0)
    assert torch.equal(_order(b), first) and torch.equal(_order(b), second)


@pytest.mark.parametrize("n, bs", [(100, 16), (64, 16), (7, 10), (1, 4)])
def test_loader_each_sample_once_per_epoch(n: int, bs: int) -> None:
    x, y = torch.arange(n).float().view(n, 1), torch.arange(n)
    loader = TensorBatchLoader(x, y, bs, shuffle=True, drop_last=False, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-n // bs)
    assert torch.equal(torch.sort(torch.cat([b[1] for b in batches])).values, y)
    assert all(torch.equal(xb.view(-1).long(), yb) for xb, yb in batches)  # x and y stay paired
    dropped = TensorBatchLoader(x, y, bs, shuffle=True, drop_last=True, seed=1)
    assert len(list(dropped)) == len(dropped) == n // bs
    assert all(len(yb) == bs for _, yb in dropped)


def test_loader_unshuffled_keeps_order() -> None:
    y = torch.arange(10)
    assert torch.equal(_order(TensorBatchLoader(y.float(), y, 3)), y)


@pytest.mark.parametrize("n, world, drop_last", [(100, 2, False), (101, 2, False), (101, 2, True), (10, 3, False)])
def test_loader_ddp_sharding(n: int, world: int, drop_last: bool) -> None:
    x, y = torch.zeros(n, 1), torch.arange(n)
    loaders = [
        TensorBatchLoader(
            x, y, 8, shuffle=True, drop_last=drop_last, seed=2, epoch_fn=lambda: 1, rank=r, world_size=world
        )
        for r in range(world)
    ]
    orders = [_order(ld) for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1 and len({len(o) for o in orders}) == 1
    covered = torch.cat(orders)
    if drop_last:
        # Truncated to n // world per rank, then to whole batches.
        assert len(covered) == len(loaders[0]) * 8 * world and len(set(covered.tolist())) == len(covered)
    else:
        assert set(covered.tolist()) == set(range(n))  # every sample seen by some rank
        assert len(covered) - len(set(covered.tolist())) == (-n) % world  # only the padding repeats
    # Shards are interleaved slices of the one permutation every rank draws.
    perm = TensorBatchLoader(x, y, 8, shuffle=True, seed=2).indices(1)
    assert torch.equal(orders[0][: len(orders[0]) - 1], perm[::world][: len(orders[0]) - 1])


def test_loader_augmentation_is_batched_and_reproducible() -> None:
    x = torch.rand(40, 3, 8, 8)
    y = torch.arange(40)
    calls = []

    def aug(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        calls.append(len(xb))
        return random_crop_flip(xb, 2, g)

    a = [xb for xb, _ in TensorBatchLoader(x, y, 16, shuffle=True, seed=0, augment_fn=aug, epoch_fn=lambda: 0)]
    b = [xb for xb, _ in TensorBatchLoader(x, y, 16, shuffle=True, seed=0, augment_fn=aug, epoch_fn=lambda: 0)]
    c = [xb for xb, _ in TensorBatchLoader(x, y, 16, shuffle=True, seed=0, augment_fn=aug, epoch_fn=lambda: 1)]
    assert calls == [16, 16, 8] * 3  # once per batch, on the whole batch
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


# ---------------------------------------------------------------------------------------------
# random_crop_flip


def _candidates(img: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Per-sample reference: every crop of the zero-padded image, and its mirror."""
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (padding,) * 4)
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_random_crop_flip_matches_per_sample_reference() -> None:
    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8) + 0.1  # strictly positive, so zero padding is recognizable
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    seen = Counter()
    for k in range(len(x)):
        matches = [i for i, c in enumerate(_candidates(x[k], 2)) if torch.equal(out[k], c)]
        assert len(matches) == 1
        seen[matches[0]] += 1
    assert len(seen) > 10  # offsets vary across the batch
    again = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_random_crop_flip_options() -> None:
    x = torch.rand(16, 1, 5, 5)
    assert torch.equal(random_crop_flip(x, 0, torch.Generator().manual_seed(0), flip=False), x)
    out = random_crop_flip(x, 1, torch.Generator().manual_seed(1), flip=False)
    for k in range(16):
        assert any(torch.equal(out[k], c) for c in _candidates(x[k], 1)[:9])  # never mirrored
    with pytest.raises(ValueError):
        random_crop_flip(x[0], 1)


def test_random_crop_flip_frequency_and_offsets() -> None:
    n = 4000
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(n, 1, 1, 4).contiguous()
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3).float().mean().item()
    assert abs(flipped - 0.5) < 0.04
    # With padding, every offset in [0, 2p] occurs: the first column shows the horizontal shift.
    img = torch.ones(n, 1, 6, 6)
    out = random_crop_flip(img, 2, torch.Generator().manual_seed(0), flip=False)
    row = out[:, 0, 2, :]  # row 2 is never padding for vertical shifts in [-2, 2]
    zeros_left = (row == 0).long().cumprod(dim=1).sum(dim=1)
    zeros_right = (row.flip(-1) == 0).long().cumprod(dim=1).sum(dim=1)
    shift = zeros_left - zeros_right
    counts = torch.bincount(shift + 2, minlength=5)
    assert len(counts) == 5 and counts.min() > n / 5 * 0.8  # uniform over the 5 offsets


# ---------------------------------------------------------------------------------------------
# CIFAR from fake archives


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_tarball", [True, False])
def test_cifar_from_fake_archive(tmp_path: Path, name: str, as_tarball: bool) -> None:
    fake = make_fake_cifar(tmp_path, name, n_train=30, n_test=12, as_tarball=as_tarball, seed=1)
    dm = CIFARDataModule(name=name, data_dir=tmp_path, batch_size=8)
    dm.setup()
    x, y = dm.train_tensors()
    xt, yt = dm.test_tensors()
    assert x.shape == (30, 3, 32, 32) and xt.shape == (12, 3, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(fake.y_train)) and torch.equal(yt, torch.from_numpy(fake.y_test))
    assert dm.num_classes == fake.num_classes and dm.in_channels == 3
    # Channel-major rows: pixel (c, i, j) of image n is raw[n, c*1024 + i*32 + j] / 255.
    for n, c, i, j in [(0, 0, 0, 0), (3, 1, 5, 7), (29, 2, 31, 30)]:
        assert x[n, c, i, j].item() == pytest.approx(fake.x_train[n, c * 1024 + i * 32 + j] / 255.0, abs=1e-7)
    assert torch.equal(xt, torch.from_numpy(fake.x_test).float().div(255).view(-1, 3, 32, 32))
    assert dm.x_val is dm.x_test  # val_size=0: validation uses the test split
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64


def test_cifar_prepare_data_extracts_and_folder_reads_the_same(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    from_tar = load_cifar(tmp_path, "cifar10")
    dm = CIFARDataModule(data_dir=str(tmp_path))
    dm.prepare_data()
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    dm.setup()
    assert all(torch.equal(a, b) for a, b in zip(from_tar, (dm.x_train, dm.y_train, dm.x_test, dm.y_test)))


def test_cifar_val_split_held_out_from_train(tmp_path: Path) -> None:
    fake = make_fake_cifar(tmp_path, "cifar10", n_train=60, n_test=10, as_tarball=False)
    dm = CIFARDataModule(data_dir=tmp_path, val_size=20, split_seed=3)
    dm.setup()
    assert len(dm.x_train) == 40 and len(dm.x_val) == 20 and len(dm.x_test) == 10
    rows = {tuple(r) for r in fake.x_train[:, :16].tolist()}
    got_train = {tuple((dm.x_train[k].flatten()[:16] * 255).round().long().tolist()) for k in range(40)}
    got_val = {tuple((dm.x_val[k].flatten()[:16] * 255).round().long().tolist()) for k in range(20)}
    assert got_train | got_val == rows and not got_train & got_val
    again = CIFARDataModule(data_dir=tmp_path, val_size=20, split_seed=3)
    again.setup()
    assert torch.equal(again.x_val, dm.x_val)


def test_cifar_augmentation_only_in_training(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path, "cifar10", n_train=16, n_test=16, as_tarball=False)

    def pixel_sums(x: torch.Tensor) -> torch.Tensor:  # order-free fingerprint of a batch
        return torch.sort(x.flatten(1).sum(1)).values

    dm = CIFARDataModule(data_dir=tmp_path, batch_size=16)
    dm.setup()
    xb, _ = next(iter(dm.train_dataloader()))
    assert not torch.allclose(pixel_sums(xb), pixel_sums(dm.x_train))  # crops lose border pixels
    xv, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(xv, dm.x_test)
    noaug = CIFARDataModule(data_dir=tmp_path, batch_size=16, augment=False)
    noaug.setup()
    xb2, _ = next(iter(noaug.train_dataloader()))
    assert torch.equal(pixel_sums(xb2), pixel_sums(noaug.x_train))


def test_cifar_missing_archive_one_line_error(tmp_path: Path) -> None:
    dm = CIFARDataModule(data_dir=tmp_path / "nowhere")
    dm.prepare_data()  # download=False: nothing to do, no network
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py/" in msg and "data.download=true" in msg
    with pytest.raises(FileNotFoundError, match="CIFAR-100 not found.*cifar-100-python.tar.gz"):
        load_cifar(tmp_path, "cifar100")


@pytest.mark.parametrize("as_tarball", [True, False])
def test_cifar_corrupt_archive_one_line_error_naming_file(tmp_path: Path, as_tarball: bool) -> None:
    bad = write_corrupt_cifar(tmp_path, "cifar10", as_tarball=as_tarball)
    with pytest.raises(CorruptArchiveError) as info:
        CIFARDataModule(data_dir=tmp_path).setup()
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    if as_tarball:
        with pytest.raises(CorruptArchiveError, match="cifar-10-python.tar.gz"):
            CIFARDataModule(data_dir=tmp_path).prepare_data()


def test_cifar_truncated_tarball(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path, "cifar100", n_train=20, n_test=10)
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(CorruptArchiveError, match="cifar-100-python.tar.gz"):
        load_cifar(tmp_path, "cifar100")


def test_cifar_extraction_refuses_path_traversal(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(CorruptArchiveError, match="unsafe member"):
        extract_cifar(root, "cifar10")
    assert not (tmp_path / "evil.txt").exists()


def test_cifar_pickle_with_foreign_globals_is_rejected(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5, as_tarball=False)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": Path("/x"), b"labels": [0]}, protocol=2))
    with pytest.raises(CorruptArchiveError, match="disallowed global"):
        load_cifar(tmp_path, "cifar10")


def test_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network here: urlopen is replaced by a fake serving a fake archive."""
    src = tmp_path / "src"
    make_fake_cifar(src, "cifar10", n_train=10, n_test=5)
    payload = (src / "cifar-10-python.tar.gz").read_bytes()
    monkeypatch.setattr(cifar_mod.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    dest = tmp_path / "dest"
    with pytest.raises(CorruptArchiveError, match="md5"):
        download_cifar(dest, "cifar10")
    assert list(dest.iterdir()) == []  # the bad download is removed
    import hashlib

    meta = replace(cifar_mod.CIFAR_META["cifar10"], md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(cifar_mod.CIFAR_META, "cifar10", meta)
    dm = CIFARDataModule(data_dir=dest, download=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.x_train) == 10


# ---------------------------------------------------------------------------------------------
# configs and Lightning


@pytest.fixture(scope="module")
def data_cfg():
    with initialize_config_module(config_module="esq_lightning.conf", version_base="1.3"):
        yield lambda name, *ov: compose(overrides=[f"+data={name}", *ov]).data


def test_build_datamodule_digits(data_cfg) -> None:
    cfg = data_cfg("digits")
    dm = build_datamodule(cfg, seed=11)
    assert isinstance(dm, DigitsDataModule) and dm.seed == 11 and dm.batch_size == cfg.batch_size
    for key in ("num_classes", "in_channels", "image_size"):
        assert getattr(dm, key) == cfg[key]
    assert list(dm.mean) == list(cfg.mean) and list(dm.std) == list(cfg.std)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_build_datamodule_cifar(data_cfg, tmp_path: Path, name: str) -> None:
    cfg = data_cfg(name, f"data.data_dir={tmp_path}")
    dm = build_datamodule(cfg, seed=3)
    assert isinstance(dm, CIFARDataModule) and dm.name == name and dm.seed == 3
    assert dm.data_dir == tmp_path and dm.download is False
    for key in ("num_classes", "in_channels", "image_size"):
        assert getattr(dm, key) == cfg[key]
    assert list(dm.mean) == pytest.approx(list(cfg.mean)) and list(dm.std) == pytest.approx(list(cfg.std))


def test_build_datamodule_plain_dict_by_name() -> None:
    dm = build_datamodule({"name": "digits", "num_classes": 10, "mean": [0.3], "batch_size": 5}, seed=2)
    assert isinstance(dm, DigitsDataModule) and dm.batch_size == 5 and dm.seed == 2


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN(width=4)
        self.first_labels: list[torch.Tensor] = []
        self.devices: set[str] = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.first_labels.append(y.clone())
        self.devices.add(str(x.device))
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("device_resident", [False, True])
def test_lightning_fit_uses_trainer_epoch(device_resident: bool) -> None:
    dm = DigitsDataModule(batch_size=32, seed=4, device_resident=device_resident)
    model = _Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.first_labels) == 2
    for epoch, labels in enumerate(model.first_labels):
        expected = dm.y_train[TensorBatchLoader(dm.x_train, dm.y_train, 32, shuffle=True, seed=4).indices(epoch)[:32]]
        assert torch.equal(labels, expected)
    assert not torch.equal(model.first_labels[0], model.first_labels[1])
    assert model.devices == {"cpu"}
