"""Bit-packed export: real on-disk size, identical logits after reload, clear errors on bad files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from esq_lightning.quant import (
    QUANTIZERS,
    Quantizer,
    draw_selection,
    export_packed,
    full_quantization,
    load_packed,
    pack_codes,
    quant_layers,
    quantize_model,
    set_sq_ratio,
    sq_generator,
    unpack_codes,
)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-shaped (3x32x32) ResNet-like net: stem 64, a 64 block, a 128 block, linear head."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(meta: dict) -> nn.Module:
    return SmallResNet(meta["width"], meta["num_classes"])


META = {"width": 64, "num_classes": 10, "name": "small_resnet"}


def trained_like(seed: int) -> nn.Module:
    """A model with non-trivial BatchNorm statistics, so every stored tensor matters."""
    torch.manual_seed(seed)
    model = build(META)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(123)
    return model


def expected_packed_bytes(model: nn.Module) -> tuple[int, int]:
    """(float32 bytes, packed bytes) of the quantized layers from the bit counts alone."""
    f32 = packed = 0
    for _, layer in quant_layers(model):
        n = layer.weight.numel()
        bits = layer.bits
        alphas = layer.weight.shape[0] if layer.per_filter else 1
        f32 += 4 * n
        packed += math.ceil(n * bits / 8) + 4 * alphas
    return f32, packed


@pytest.mark.parametrize(
    ("kind", "per_filter", "keep_first_last", "min_ratio", "min_file_ratio"),
    [
        # 306,112 weights in 586 filters: BWN N/8 + 4F bytes -> 32 N / (N + 32 F) = 30.2; the
        # 3x3x3 stem (27 weights per filter, 14.6x alone) and the alphas keep it under 32.
        ("bwn", True, False, 28.0, 24.0),
        # TWN: 4N / (N/4 + 4F) = 16 N / (N + 16 F) = 15.5.
        ("twn", True, False, 14.0, 13.5),
        # One alpha per layer: almost exactly 16x.
        ("twn", False, False, 15.9, 14.0),
        # Without the stem and the head the quantized layers have 576+ weights per filter: 30.4x.
        ("bwn", True, True, 30.0, 19.0),
    ],
)
def test_export_size_and_identical_logits(
    tmp_path: Path,
    kind: str,
    per_filter: bool,
    keep_first_last: bool,
    min_ratio: float,
    min_file_ratio: float,
) -> None:
    model = quantize_model(trained_like(0), kind, per_filter=per_filter, keep_first_last=keep_first_last)
    model.eval()
    # Export ignores the training ratio and the drawn masks: it always writes ratio 1.
    set_sq_ratio(model, 0.4)
    draw_selection(model, sq_generator(0, 5))
    path = tmp_path / "model.esq"
    report = export_packed(model, path, META)
    print(f"\n{kind} per_filter={per_filter} keep_first_last={keep_first_last}: {report}")

    f32, packed = expected_packed_bytes(model)
    assert report["float32_quantized_bytes"] == f32
    assert report["packed_quantized_bytes"] == packed
    assert report["ratio"] == pytest.approx(f32 / packed)
    assert report["ratio"] > min_ratio
    assert report["packed_bytes"] == report["file_bytes"] == path.stat().st_size
    other = sum(
        t.numel() * t.element_size()
        for k, t in model.state_dict().items()
        if k not in {f"{n}.weight" for n, _ in quant_layers(model)}
    )
    assert report["other_bytes"] == other
    # Compressed header and alignment: about 16 bytes per stored tensor (41 here, 650 bytes in
    # all, measured), where torch.save spends a few hundred per tensor on its zip records.
    overhead = report["file_bytes"] - packed - other
    assert report["overhead_bytes"] == overhead
    assert 0 < overhead < 1500
    assert overhead < 0.02 * report["file_bytes"]
    # The whole file against a float32 state_dict: BatchNorm (9.3 kB raw) and, with
    # keep_first_last, the float stem and head (12 kB) weigh on a model this small.
    assert report["model_ratio"] == report["float32_model_bytes"] / report["file_bytes"] > min_file_ratio

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), full_quantization(model):
        expected = model(x)
    rebuilt, meta = load_packed(path, build)
    assert meta == META
    assert not rebuilt.training
    assert not any(type(m).__name__.startswith("Quant") for m in rebuilt.modules())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    # The rebuilt weights are the quantized values: at most 2 (BWN) or 3 (TWN) per filter.
    levels = 2 if kind == "bwn" else 3
    for name, _layer in quant_layers(model):
        w = rebuilt.get_submodule(name).weight
        assert all(row.unique().numel() <= levels for row in w.reshape(w.shape[0], -1))
    if keep_first_last:
        assert torch.equal(rebuilt.stem.weight, model.stem.weight)
        assert torch.equal(rebuilt.fc.weight, model.fc.weight)
    assert torch.equal(rebuilt.layer2.bn2.running_var, model.layer2.bn2.running_var)
    assert int(rebuilt.bn.num_batches_tracked) == 123


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: q.name)
def test_export_every_width_size_and_identical_logits(tmp_path: Path, quantizer: Quantizer) -> None:
    """b bits per weight plus one float32 scale per filter, for every registered quantizer."""
    model = quantize_model(trained_like(4), quantizer.kind, bits=quantizer.bits).eval()
    path = tmp_path / f"{quantizer.name}.esq"
    report = export_packed(model, path, META)
    f32, packed = expected_packed_bytes(model)
    assert report["float32_quantized_bytes"] == f32 and report["packed_quantized_bytes"] == packed
    # 306,112 weights in 586 filters: 32 N / (b N + 32 F) = 32/b less the scales' share (<= 6%).
    assert 0.94 * 32 / quantizer.bits < report["ratio"] <= 32 / quantizer.bits
    if quantizer.bits == 3:
        assert report["ratio"] >= 10
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), full_quantization(model):
        expected = model(x)
    rebuilt, _ = load_packed(path, build)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    for name, _ in quant_layers(model):
        w = rebuilt.get_submodule(name).weight
        assert all(row.unique().numel() <= len(quantizer.code_values) for row in w.reshape(w.shape[0], -1))


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: q.name)
def test_pack_roundtrip_every_width(quantizer: Quantizer) -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.tensor(quantizer.code_values, dtype=torch.int8)
    for n in (1, 3, 7, 8, 9, 1001):
        codes = values[torch.randint(0, values.numel(), (n,), generator=gen)]
        packed = pack_codes(codes, quantizer.kind, quantizer.bits)
        assert packed.numel() == math.ceil(n * quantizer.bits / 8)
        assert torch.equal(unpack_codes(packed, quantizer.kind, n, quantizer.bits), codes)
    if quantizer.kind == "uniform":
        # The one unsigned value no code maps to (2^b - 1) is refused.
        bad = torch.full((8,), 255, dtype=torch.uint8)
        with pytest.raises(ValueError, match="invalid"):
            unpack_codes(bad, quantizer.kind, 8 // quantizer.bits or 1, quantizer.bits)


def test_version_1_files_still_load(tmp_path: Path) -> None:
    """A version-1 file (no `bits` per layer) has the same layout; the loader takes the family's width."""
    import json
    import struct
    import zlib

    model = quantize_model(trained_like(6), "twn").eval()
    path = tmp_path / "v2.esq"
    export_packed(model, path, META)
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(zlib.decompress(raw[16 : 16 + hlen]))
    data = raw[16 + hlen + (-(16 + hlen)) % 8 :]
    header["version"] = 1
    for q in header["quantized"]:
        del q["bits"]
    h = zlib.compress(json.dumps(header).encode())
    old = tmp_path / "v1.esq"
    old.write_bytes(raw[:8] + struct.pack("<Q", len(h)) + h + b"\x00" * ((-(16 + len(h))) % 8) + data)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_packed(old, build)[0](x), load_packed(path, build)[0](x))


@pytest.mark.parametrize("kind", ["bwn", "twn"])
def test_pack_roundtrip(kind: str) -> None:
    gen = torch.Generator().manual_seed(2)
    for n in (1, 3, 4, 7, 8, 9, 1001):
        low = -1 if kind == "twn" else 0
        codes = torch.randint(low, 2, (n,), generator=gen).to(torch.int8)
        if kind == "bwn":
            codes = codes * 2 - 1
        packed = pack_codes(codes, kind)
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(n / (8 if kind == "bwn" else 4))
        assert torch.equal(unpack_codes(packed, kind, n), codes)


def test_full_precision_and_float64_models(tmp_path: Path) -> None:
    fp = trained_like(3).eval()
    report = export_packed(fp, tmp_path / "fp.esq", META)
    assert report["packed_quantized_bytes"] == 0 and math.isnan(report["ratio"])
    rebuilt, _ = load_packed(tmp_path / "fp.esq", build)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), fp(x))

    # Alphas are stored in the weight's dtype, so a float64 model also dequantizes exactly.
    lin = quantize_model(nn.Sequential(nn.Linear(20, 6)).double(), "twn")
    export_packed(lin, tmp_path / "lin.esq")
    plain, meta = load_packed(tmp_path / "lin.esq", lambda m: nn.Sequential(nn.Linear(20, 6)).double())
    assert meta == {}
    x = torch.randn(3, 20, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(plain(x), lin(x))


def test_bad_files_name_the_path(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"junk\.bin is not an esq packed model"):
        load_packed(junk, build)

    pickled = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), pickled)
    with pytest.raises(ValueError, match=r"state\.pt is not an esq packed model"):
        load_packed(pickled, build)

    good = tmp_path / "good.esq"
    export_packed(quantize_model(nn.Sequential(nn.Linear(64, 8)), "bwn"), good)
    truncated = tmp_path / "truncated.esq"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"truncated\.esq"):
        load_packed(truncated, lambda m: nn.Sequential(nn.Linear(64, 8)))

    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "missing.esq", build)

    with pytest.raises(ValueError, match="JSON"):
        export_packed(nn.Linear(2, 2), tmp_path / "x.esq", {"bad": object()})
