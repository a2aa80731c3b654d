"""Bit widths: the uniform k-bit quantizer against its formulas, the registry, activation quantization and its
straight-through (BPDA) gradient, the width knob of every model, and `quant.bits` through esq-train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from esq_lightning.models import SmallCNN, WideResNet, build_model
from esq_lightning.quant import (
    QUANTIZERS,
    UNIFORM_BITS,
    UNIFORM_SCALE_ITERS,
    ActQuant,
    act_quant_layers,
    act_quantize,
    calibrate_act_quant,
    default_kind,
    export_packed,
    full_quantization,
    load_packed,
    quant_layers,
    quantize_activations,
    quantize_model,
    resolve_kind,
    uniform,
    uniform_codes,
)
from esq_lightning.quant.registry import get
from tests.hydra_utils import TINY_RUN

SHAPES = [(8, 5), (6, 3, 3, 3), (4, 16, 1, 1)]


def ref_uniform(w: torch.Tensor, bits: int, per_filter: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, Q) of the documented algorithm, written out row by row in float64."""
    a = w.double().numpy()
    rows = a.reshape(a.shape[0], -1) if per_filter else a.reshape(1, -1)
    n = 2 ** (bits - 1) - 1
    codes, scales = np.zeros_like(rows), np.zeros(rows.shape[0])
    for i, row in enumerate(rows):
        s = np.max(np.abs(row)) / n
        c = np.zeros_like(row)
        for _ in range(UNIFORM_SCALE_ITERS):
            c = np.clip(np.round(row / s), -n, n) if s > 0 else np.zeros_like(row)
            s = float(row @ c / (c @ c)) if c @ c > 0 else 0.0
        codes[i], scales[i] = c, s
    return codes, scales, (codes * scales[:, None]).reshape(a.shape)


# ---------------------------------------------------------------- the uniform quantizer
@pytest.mark.parametrize("bits", UNIFORM_BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_filter", [True, False])
def test_uniform_matches_formula(bits: int, shape: tuple[int, ...], per_filter: bool) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    codes, scale = uniform_codes(w, bits, per_filter)
    ref_c, ref_s, ref_q = ref_uniform(w, bits, per_filter)
    n = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= n
    assert scale.shape == ((shape[0],) if per_filter else (1,))
    np.testing.assert_array_equal(codes.numpy(), ref_c)
    np.testing.assert_allclose(scale.numpy(), ref_s, rtol=1e-12)
    np.testing.assert_allclose(uniform(w, bits, per_filter).numpy(), ref_q, rtol=1e-12)
    # The scale is the least-squares scale of the returned codes: the residual is orthogonal to them.
    rows = w.reshape(codes.shape[0], -1)
    resid = rows - scale[:, None] * codes.double()
    assert torch.allclose((resid * codes).sum(dim=1), torch.zeros(codes.shape[0], dtype=w.dtype), atol=1e-10)
    # Every row uses at most 2L + 1 distinct values, symmetric about 0.
    q = uniform(w, bits, per_filter).reshape(codes.shape[0], -1)
    assert all(row.unique().numel() <= 2 * n + 1 for row in q)


@pytest.mark.parametrize("bits", UNIFORM_BITS)
def test_uniform_error_never_above_max_abs_and_falls_with_bits(bits: int) -> None:
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[0, 0, 0, 0] = 8.0  # an outlier: max-abs scaling spends the levels on it
    n = 2 ** (bits - 1) - 1
    rows = w.reshape(16, -1)
    s_max = rows.abs().amax(dim=1, keepdim=True) / n
    q_max = torch.clamp(torch.round(rows / s_max), -n, n) * s_max
    q = uniform(w, bits).reshape(16, -1)
    assert bool(((rows - q) ** 2).sum(dim=1).le(((rows - q_max) ** 2).sum(dim=1) * (1 + 1e-6)).all())
    if bits < 8:
        q_more = uniform(w, bits + 1).reshape(16, -1)
        assert float(((rows - q_more) ** 2).sum()) < float(((rows - q) ** 2).sum())


def test_uniform_special_rows() -> None:
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    w[0] = 0.0
    w[1] = 0.5
    codes, scale = uniform_codes(w, 4)
    assert int(codes[0].abs().sum()) == 0 and float(scale[0]) == 0.0
    # An all-equal row is exact: code L everywhere and s = value / L.
    assert torch.equal(codes[1], torch.full((10,), 7, dtype=torch.int8))
    torch.testing.assert_close(uniform(w, 4)[1], w[1])
    assert not torch.isnan(uniform(w, 4)).any()


def test_registry_kinds_and_widths() -> None:
    assert [default_kind(b) for b in (1, 2, 3, 4, 8, 32)] == ["bwn", "twn", "uniform", "uniform", "uniform", "full"]
    assert resolve_kind("auto", 4) == ("uniform", 4) and resolve_kind("bwn", None) == ("bwn", 1)
    assert resolve_kind("uniform", 2) == ("uniform", 2)  # another family at 2 bits
    for kind, bits in (("bwn", 3), ("twn", 1), ("uniform", 1), ("full", 4)):
        with pytest.raises(ValueError):
            resolve_kind(kind, bits)
    with pytest.raises(ValueError, match="no quantizer for 9 bits"):
        default_kind(9)
    names = [q.name for q in QUANTIZERS]
    assert len(set(names)) == len(names) and {"bwn", "twn", "uniform2", "uniform3", "uniform8"} <= set(names)
    assert get("uniform", 3).code_values == (-3, -2, -1, 0, 1, 2, 3)
    # uniform at 2 bits is not TWN: same levels, another threshold and scale.
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(get("uniform", 2)(w), get("twn")(w))


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: q.name)
def test_quantized_layer_forward_uses_the_registry_quantizer(quantizer) -> None:
    torch.manual_seed(3)
    model = quantize_model(
        nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6 * 4, 5)), quantizer.kind, bits=quantizer.bits
    )
    conv = model[0]
    assert conv.kind == quantizer.kind and conv.bits == quantizer.bits and f"bits={quantizer.bits}" in repr(conv)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(x), nn.functional.conv2d(x, quantizer(conv.weight.detach()), conv.bias))
    err = conv.relative_error()
    w = conv.weight.detach().reshape(6, -1)
    q = quantizer(conv.weight.detach()).reshape(6, -1)
    torch.testing.assert_close(err, (w - q).abs().sum(1) / w.abs().sum(1))


# ---------------------------------------------------------------- activation quantization
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_act_quantize_forward_values(bits: int) -> None:
    x = torch.linspace(-1.0, 3.0, 4001, dtype=torch.float64)
    alpha = torch.tensor(2.0, dtype=torch.float64)
    q = act_quantize(x, alpha, bits)
    n = 2**bits - 1
    ref = np.round(np.clip(x.numpy(), 0, 2.0) * n / 2.0) * 2.0 / n
    np.testing.assert_allclose(q.numpy(), ref, rtol=0, atol=1e-12)
    assert q.unique().numel() == n + 1 and float(q.min()) == 0.0 and float(q.max()) == 2.0


def test_act_quantize_straight_through_gradient() -> None:
    x = torch.tensor([-0.5, 0.1, 0.37, 1.2, 1.9, 2.5, 4.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    act_quantize(x, alpha, 3).backward(torch.arange(1.0, 8.0))
    # Inside (0, alpha): the upstream gradient passes unchanged (not the zero gradient of rounding).
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]))
    # PACT: alpha collects the gradient where the input is clipped at alpha.
    assert float(alpha.grad) == 6.0 + 7.0


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "preact_resnet18", "wrn28_10"])
def test_activation_quantization_in_every_model_family_keeps_input_gradients(name: str) -> None:
    """BPDA: the attack's input gradient flows through the straight-through path; it is not masked."""
    cfg = {"name": name, "num_classes": 10}
    if name == "small_cnn":
        cfg.update(in_channels=1, mean=[0.3], std=[0.4], width=8)
        x = torch.rand(4, 1, 8, 8)
    else:
        cfg.update({"width": 8} if name != "wrn28_10" else {"depth": 10, "widen_factor": 1, "width": 8})
        x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    model = quantize_model(build_model(cfg), "uniform", bits=4)
    quantize_activations(model, 2)
    alphas = calibrate_act_quant(model, torch.rand(16, *x.shape[1:], generator=torch.Generator().manual_seed(1)))
    assert len(alphas) == len(act_quant_layers(model)) and all(a > 0 for a in alphas.values())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    aq = act_quant_layers(model)
    # Every conv but the stem (it sees the signed, normalized image) and every linear get one.
    assert len(aq) == len(convs) - 1 + sum(isinstance(m, nn.Linear) for m in model.modules())
    assert not hasattr(convs[0], "act_quant")
    # Each quantized input is on the 2-bit grid of its alpha.
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((o / mod.alpha * 3).detach())) for _, m in aq]
    model.eval()
    x.requires_grad_(True)
    with full_quantization(model):
        loss = nn.functional.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    for h in hooks:
        h.remove()
    assert all(torch.allclose(v, v.round(), atol=1e-4) for v in seen)
    grad = x.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert float((grad != 0).float().mean()) > 0.5, "input gradients masked by activation quantization"


def test_calibration_sets_alpha_to_the_quantile_of_each_input() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    quantize_activations(model, 3)
    x = torch.randn(32, 1, 6, 6)
    alphas = calibrate_act_quant(model, x, quantile=0.9)
    torch.set_grad_enabled(False)
    relu1 = torch.relu(model[0](x)).reshape(-1)
    k = int(np.ceil(0.9 * relu1.numel()))
    assert alphas["2.act_quant"] == pytest.approx(float(relu1.kthvalue(k).values))
    # The next layer is calibrated on the quantized activations of the first.
    relu2 = torch.relu(model[2](model[2].act_quant(torch.relu(model[0](x))))).reshape(-1)
    assert alphas["5.act_quant"] == pytest.approx(float(relu2.kthvalue(int(np.ceil(0.9 * relu2.numel()))).values))
    torch.set_grad_enabled(True)
    assert model.training


def test_activation_quantization_keep_first_last_and_state_dict() -> None:
    model = SmallCNN(num_classes=10, in_channels=1, mean=[0.3], std=[0.4], width=4)
    quantize_activations(model, 4, keep_first_last=True)
    names = [n for n, _ in act_quant_layers(model)]
    assert names == ["block2.0.act_quant", "block3.0.act_quant"]
    assert "block2.0.act_quant.alpha" in model.state_dict()
    assert isinstance(model.block2[0].act_quant, ActQuant) and model.block2[0].act_quant.bits == 4
    assert quantize_activations(SmallCNN(), 32) is not None and not act_quant_layers(SmallCNN())


@pytest.mark.parametrize("act_bits", [4, 8])
def test_export_with_activation_quantization_gives_identical_logits(tmp_path: Path, act_bits: int) -> None:
    from esq_lightning.artifacts.loading import _build_from_meta

    model_cfg = {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "mean": [0.3], "std": [0.4], "width": 8}
    meta = {"model": model_cfg, "quant": {"kind": "uniform", "bits": 4, "act_bits": act_bits}}
    torch.manual_seed(1)
    model = quantize_activations(quantize_model(build_model(model_cfg), "uniform", bits=4), act_bits)
    with torch.no_grad():
        for _, m in act_quant_layers(model):
            m.alpha.fill_(1.7)
    model.eval()
    export_packed(model, tmp_path / "m.esq", meta)
    rebuilt, _ = load_packed(tmp_path / "m.esq", _build_from_meta)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad(), full_quantization(model):
        assert torch.equal(rebuilt(x), model(x))
    assert float(rebuilt.block2[0].act_quant.alpha) == pytest.approx(1.7)


# ---------------------------------------------------------------- capacity
def test_width_knob_of_every_model_family() -> None:
    def params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    for name, extra in (
        ("small_cnn", {"in_channels": 1, "mean": [0.3], "std": [0.4]}),
        ("resnet20", {}),
        ("preact_resnet18", {}),
        ("wrn28_10", {"depth": 10, "widen_factor": 1}),
    ):
        narrow = build_model({"name": name, "width": 8, **extra})
        wide = build_model({"name": name, "width": 16, **extra})
        # Twice the channels: about four times the conv weights.
        assert 3.0 < params(wide) / params(narrow) < 4.5, name
    wrn = WideResNet(depth=10, widen_factor=2, width=8)
    assert wrn.conv1.out_channels == 8 and wrn.fc.in_features == 4 * 8 * 2


# ---------------------------------------------------------------- esq-train
TINY = [*TINY_RUN, "eval.attacks=[fgsm]", "logger=none"]


def _multirun(tmp_path: Path, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "esq_lightning.cli.train",
            "-m",
            *overrides,
            *TINY,
            f"paths.runs_root={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = sorted((tmp_path / "sweep").rglob("results.json"), key=lambda p: int(p.parent.name))
    return [json.loads(p.read_text()) for p in paths]


def _check_widths(results: list[dict], bits: list[int]) -> None:
    assert [r["bits"] for r in results] == bits
    kinds = {1: "bwn", 2: "twn", 32: "full"}
    assert [r["quant"] for r in results] == [kinds.get(b, "uniform") for b in bits]
    tags = {1: "B", 2: "T", 32: "F"}
    assert [r["setting"] for r in results] == [f"E{tags.get(b, f'U{b}')}" for b in bits]
    for r in results:
        assert r["model_width"] == {"width": 32}
        config = torch.load(r["checkpoint"], map_location="cpu", weights_only=False)["esq_config"]
        assert config["quant"]["bits"] == r["bits"]


def test_quant_bits_multirun_and_activation_bits(tmp_path: Path) -> None:
    """`esq-train -m quant.bits=...` with the default config: one key picks the quantizer (W3A4 and W32A8 here)."""
    results = _multirun(tmp_path, ["quant.bits=3,32", "quant.act_bits=4"])
    _check_widths(results, [3, 32])
    assert [r["act_bits"] for r in results] == [4, 4]
    from esq_lightning.artifacts.loading import load_trained_model

    model = load_trained_model(results[0]["checkpoint"]).model
    assert {layer.bits for _, layer in quant_layers(model)} == {3} and act_quant_layers(model)


@pytest.mark.slow
def test_quant_bits_sweep_1_2_3_4_8_32(tmp_path: Path) -> None:
    _check_widths(_multirun(tmp_path, ["quant.bits=1,2,3,4,8,32"]), [1, 2, 3, 4, 8, 32])
