"""BWN/TWN quantizers against the written-out formulas, straight-through gradients, Quant layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.quant import (
    QUANTIZERS,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    bwn,
    bwn_codes,
    clear_selection,
    draw_selection,
    full_quantization,
    get_sq_ratio,
    quant_layers,
    quantize_model,
    quantize_weight,
    relative_error,
    selection_state,
    set_sq_ratio,
    sq_generator,
    twn,
    twn_codes,
)

SHAPES = [(8, 5), (6, 3, 3, 3), (4, 16, 1, 1), (5, 2, 5, 5)]


# ---------------------------------------------------------------- reference formulas (numpy loops)
def ref_bwn(w: torch.Tensor, per_filter: bool = True) -> np.ndarray:
    a = w.double().numpy()
    rows = a.reshape(a.shape[0], -1) if per_filter else a.reshape(1, -1)
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        alpha = np.mean(np.abs(row))
        for j, x in enumerate(row):
            out[i, j] = alpha * (1.0 if x >= 0 else -1.0)
    return out.reshape(a.shape)


def ref_twn(w: torch.Tensor, per_filter: bool = True) -> np.ndarray:
    a = w.double().numpy()
    rows = a.reshape(a.shape[0], -1) if per_filter else a.reshape(1, -1)
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        delta = 0.7 * np.mean(np.abs(row))
        big = [abs(x) for x in row if abs(x) > delta]
        alpha = sum(big) / len(big) if big else 0.0
        for j, x in enumerate(row):
            out[i, j] = alpha if x > delta else (-alpha if x < -delta else 0.0)
    return out.reshape(a.shape)


def ref_rel_err(w: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    a, b = w.double().numpy(), q.double().numpy()
    out = []
    for i in range(a.shape[0]):
        den = np.abs(a[i]).sum()
        out.append(0.0 if den == 0 else np.abs(a[i] - b[i]).sum() / den)
    return np.array(out)


def special_weight(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random weight whose first filters are all-zero, all-equal, and random with exact zeros."""
    w = torch.randn(shape, generator=gen, dtype=dtype)
    w[0] = 0.0
    w[1] = -0.3
    flat = w[2].reshape(-1)
    flat[::2] = 0.0
    return w


# ---------------------------------------------------------------- quantizers
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_filter", [True, False])
def test_bwn_matches_formula(shape: tuple[int, ...], per_filter: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    # float64 makes the reference and torch agree bit for bit on which side of 0 / Delta a weight is.
    w = special_weight(shape, gen, torch.float64)
    q = bwn(w, per_filter)
    np.testing.assert_allclose(q.numpy(), ref_bwn(w, per_filter), rtol=1e-12, atol=0)
    assert q.shape == w.shape and q.dtype == w.dtype
    # float32 gives the same signs and alphas to rounding.
    w32 = w.float()
    np.testing.assert_allclose(bwn(w32, per_filter).numpy(), ref_bwn(w32, per_filter), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_filter", [True, False])
def test_twn_matches_formula(shape: tuple[int, ...], per_filter: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    w = special_weight(shape, gen, torch.float64)
    q = twn(w, per_filter)
    np.testing.assert_allclose(q.numpy(), ref_twn(w, per_filter), rtol=1e-12, atol=0)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.equal(quantize_weight(w, "twn", per_filter), q)


def test_special_filters() -> None:
    w = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # all zero: Q = 0, alpha = 0, no NaN
            [0.5, 0.5, 0.5, 0.5],  # all equal: Q = W for both
            [-0.25, -0.25, -0.25, -0.25],
            [0.0, 1.0, 0.0, -2.0],  # exact zeros: sign(0) = +1
        ]
    )
    b = bwn(w)
    assert torch.equal(b[0], torch.zeros(4))
    assert torch.equal(b[1], w[1]) and torch.equal(b[2], w[2])
    assert torch.equal(b[3], torch.tensor([0.75, 0.75, 0.75, -0.75]))
    codes, alpha = bwn_codes(w)
    assert torch.equal(codes[0], torch.ones(4, dtype=torch.int8))
    assert torch.equal(alpha, torch.tensor([0.0, 0.5, 0.25, 0.75]))
    t = twn(w)
    assert torch.equal(t[0], torch.zeros(4))
    assert torch.equal(t[1], w[1]) and torch.equal(t[2], w[2])
    # Delta = 0.7 * 0.75 = 0.525: the zeros map to 0, alpha = mean(1, 2) = 1.5
    assert torch.equal(t[3], torch.tensor([0.0, 1.5, 0.0, -1.5]))
    tcodes, talpha = twn_codes(w)
    assert torch.equal(tcodes[3], torch.tensor([0, 1, 0, -1], dtype=torch.int8))
    assert torch.equal(talpha, torch.tensor([0.0, 0.5, 0.25, 1.5]))
    assert not torch.isnan(relative_error(w, b)).any()


def test_twn_per_layer_uses_one_delta_and_alpha() -> None:
    # Filter 0 is small, filter 1 large: a layer-wide Delta zeroes all of filter 0.
    w = torch.tensor([[0.1, -0.1, 0.05], [2.0, -3.0, 1.0]])
    t = twn(w, per_filter=False)
    delta = 0.7 * w.abs().mean()
    assert delta > 0.1
    assert torch.equal(t[0], torch.zeros(3))
    alpha = w.abs()[w.abs() > delta].mean()
    torch.testing.assert_close(t[1], torch.stack([alpha, -alpha, alpha]), rtol=0, atol=0)
    codes, a = twn_codes(w, per_filter=False)
    assert a.shape == (1,) and codes.shape == (1, 6)


def test_relative_error_matches_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    w = special_weight((7, 3, 3, 3), gen, torch.float64)
    for q in (bwn(w), twn(w), twn(w, False)):
        e = relative_error(w, q)
        assert e.shape == (7,)
        np.testing.assert_allclose(e.numpy(), ref_rel_err(w, q), rtol=1e-12)
    assert relative_error(w, bwn(w))[0] == 0  # the all-zero filter
    assert relative_error(w, bwn(w))[1] == 0  # already binary
    assert relative_error(w, bwn(w))[3] > 0


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="bwn, twn"):
        quantize_weight(torch.ones(2, 2), "xnor")


# ---------------------------------------------------------------- straight-through estimator
# Parametrized over the registry: a newly registered quantizer is tested by being registered.
ALL_Q = pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: q.name)


@ALL_Q
def test_straight_through_gradient(quantizer: Quantizer) -> None:
    torch.manual_seed(0)
    qlin = QuantLinear(12, 5, kind=quantizer.kind, bits=quantizer.bits)
    lin = nn.Linear(12, 5)
    with torch.no_grad():
        lin.weight.copy_(quantizer(qlin.weight))
        lin.bias.copy_(qlin.bias)
    x1 = torch.randn(9, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(9, 5)
    y1, y2 = qlin(x1), lin(x2)
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    # The gradient at Q reaches the full-precision weight unchanged.
    assert torch.equal(qlin.weight.grad, lin.weight.grad)
    assert torch.equal(qlin.bias.grad, lin.bias.grad)
    assert torch.equal(x1.grad, x2.grad)
    assert x1.grad.abs().sum() > 0


def test_straight_through_gradient_mixed() -> None:
    torch.manual_seed(1)
    qconv = QuantConv2d(3, 6, 3, padding=1, kind="bwn")
    qconv.sq_ratio = 0.5
    mask = torch.tensor([True, False, True, False, False, True])
    qconv.sq_mask = mask
    mixed = torch.where(mask[:, None, None, None], bwn(qconv.weight.detach()), qconv.weight.detach())
    mixed.requires_grad_(True)
    x = torch.randn(2, 3, 8, 8)
    g = torch.randn(2, 6, 8, 8)
    y = qconv(x)
    y_ref = F.conv2d(x, mixed, qconv.bias.detach(), padding=1)
    assert torch.equal(y, y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(qconv.weight.grad, mixed.grad)


# ---------------------------------------------------------------- Quant layers
def test_conv_forward_at_ratio_1_equals_bwn_conv() -> None:
    torch.manual_seed(2)
    conv = QuantConv2d(4, 8, 3, stride=2, padding=1, kind="bwn")
    x = torch.randn(2, 4, 9, 9)
    ref = F.conv2d(x, bwn(conv.weight.detach()), conv.bias, stride=2, padding=1)
    assert torch.equal(conv(x), ref)
    conv.sq_ratio = 0.0
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1))


def test_linear_forward_twn_per_layer() -> None:
    torch.manual_seed(3)
    lin = QuantLinear(6, 4, kind="twn", per_filter=False)
    x = torch.randn(3, 6)
    assert torch.equal(lin(x), F.linear(x, twn(lin.weight.detach(), per_filter=False), lin.bias))


@ALL_Q
def test_mixed_forward_uses_q_on_masked_filters_only(quantizer: Quantizer) -> None:
    torch.manual_seed(4)
    conv = QuantConv2d(3, 10, 3, kind=quantizer.kind, bits=quantizer.bits)
    conv.sq_ratio = 0.4
    draw_selection(conv, sq_generator(0, 0))
    mask = conv.sq_mask
    assert mask is not None and mask.dtype == torch.bool and int(mask.sum()) == 4
    w = conv.weight.detach()
    x = torch.randn(2, 3, 7, 7)
    y = conv(x)
    assert torch.equal(y, F.conv2d(x, torch.where(mask[:, None, None, None], quantizer(w), w), conv.bias))
    y_q = F.conv2d(x, quantizer(w), conv.bias)
    y_w = F.conv2d(x, w, conv.bias)
    torch.testing.assert_close(y[:, mask], y_q[:, mask])
    torch.testing.assert_close(y[:, ~mask], y_w[:, ~mask])
    assert not torch.allclose(y[:, ~mask], y_q[:, ~mask])


def test_missing_selection_raises() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    quantize_model(model, "bwn")
    set_sq_ratio(model, 0.5)
    msg = r"SQ ratio r < 1 but no selection drawn for layer 0: call draw_selection\(model, generator\)"
    with pytest.raises(RuntimeError, match=msg):
        model(torch.randn(1, 3, 3, 3))


def test_sq_ratio_changes_clear_masks() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6))
    quantize_model(model, "bwn")
    assert get_sq_ratio(model) == 1.0
    set_sq_ratio(model, 0.5)
    draw_selection(model, sq_generator(1, 2))
    assert all(m is not None for m in selection_state(model).values())
    set_sq_ratio(model, 0.5)  # unchanged ratio keeps this step's draw
    assert all(m is not None for m in selection_state(model).values())
    set_sq_ratio(model, 0.6)
    assert all(m is None for m in selection_state(model).values())
    draw_selection(model, sq_generator(1, 2))
    clear_selection(model)
    assert all(m is None for m in selection_state(model).values())
    model[0].sq_ratio = 0.2
    with pytest.raises(ValueError, match="different SQ ratios"):
        get_sq_ratio(model)
    assert get_sq_ratio(nn.Linear(2, 2)) is None


@ALL_Q
def test_draw_selection_counts_and_determinism(quantizer: Quantizer) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 10))
    quantize_model(model, quantizer.kind, bits=quantizer.bits)
    set_sq_ratio(model, 0.4)
    draw_selection(model, sq_generator(7, 100))
    first = {k: v.clone() for k, v in selection_state(model).items()}
    assert {k: int(v.sum()) for k, v in first.items()} == {"0": round(0.4 * 16), "1": round(0.4 * 32), "3": 4}
    draw_selection(model, sq_generator(7, 100))
    assert all(torch.equal(first[k], v) for k, v in selection_state(model).items())
    draw_selection(model, sq_generator(7, 101))
    assert not all(torch.equal(first[k], v) for k, v in selection_state(model).items())


def test_draw_selection_at_ratio_1_draws_nothing() -> None:
    model = quantize_model(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "twn")
    gen = sq_generator(0, 0)
    state = gen.get_state()
    draw_selection(model, gen)
    assert torch.equal(gen.get_state(), state)
    assert all(m is None for m in selection_state(model).values())


def _net() -> nn.Module:
    class Odd(nn.Conv2d):  # a subclass is not an exact nn.Conv2d and stays as it is
        pass

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), Odd(8, 8, 1)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.Linear(16, 10),
    )


def test_quantize_model_swaps_the_right_layers() -> None:
    torch.manual_seed(6)
    model = _net()
    model[0].note = "kept"
    weight = model[0].weight
    keys = list(model.state_dict().keys())
    assert quantize_model(model, "bwn") is model
    assert [n for n, _ in quant_layers(model)] == ["0", "3.0", "6", "7"]
    assert type(model[3][1]).__name__ == "Odd"
    assert model[0].weight is weight and model[0].note == "kept"  # optimizers stay valid
    assert model[0].sq_name == "0" and model[3][0].sq_name == "3.0"
    assert list(model.state_dict().keys()) == keys

    kept = _net()
    quantize_model(kept, "twn", keep_first_last=True)
    assert [n for n, _ in quant_layers(kept)] == ["3.0", "6"]
    assert type(kept[0]) is nn.Conv2d and type(kept[7]) is nn.Linear
    # Re-quantizing an already quantized model reconfigures it, first/last back to plain.
    quantize_model(model, "twn", keep_first_last=True)
    assert type(model[0]) is nn.Conv2d and "sq_mask" not in model[0]._buffers
    assert [(n, m.kind) for n, m in quant_layers(model)] == [("3.0", "twn"), ("6", "twn")]

    full = _net()
    assert quantize_model(full, "full") is full and not quant_layers(full)


def test_quantize_model_validates_choices() -> None:
    with pytest.raises(ValueError, match="bwn, twn, uniform, full"):
        quantize_model(_net(), "xnor")
    with pytest.raises(ValueError, match="paper, reference"):
        quantize_model(_net(), "bwn", variant="dong")
    with pytest.raises(ValueError, match="constant, linear, softmax, sigmoid"):
        quantize_model(_net(), "bwn", f="relu")


def test_full_precision_checkpoint_loads_into_quantized_model() -> None:
    torch.manual_seed(7)
    fp = _net()
    q = quantize_model(_net(), "bwn")
    missing, unexpected = q.load_state_dict(fp.state_dict(), strict=True)
    assert not missing and not unexpected
    assert torch.equal(q[0].weight, fp[0].weight)
    # And back: the quantized model's checkpoint loads into a plain one (the mask is not saved).
    set_sq_ratio(q, 0.5)
    draw_selection(q, sq_generator(0, 0))
    assert not any("sq_mask" in k for k in q.state_dict())
    _net().load_state_dict(q.state_dict(), strict=True)
    # deepcopy keeps the quantized layers working.
    q2 = copy.deepcopy(q)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(q2.eval()(x), q.eval()(x))


def test_quantize_keeps_dtype() -> None:
    model = quantize_model(_net().double(), "twn")
    assert model[0].weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_full_quantization_restores_ratio_and_masks() -> None:
    torch.manual_seed(8)
    model = quantize_model(_net(), "bwn").eval()
    x = torch.randn(2, 3, 8, 8)
    at_one = model(x)
    set_sq_ratio(model, 0.4)
    draw_selection(model, sq_generator(3, 4))
    masks = selection_state(model)
    mixed = model(x)
    assert not torch.equal(mixed, at_one)
    with full_quantization(model):
        assert get_sq_ratio(model) == 1.0
        assert torch.equal(model(x), at_one)
    assert get_sq_ratio(model) == 0.4
    assert all(selection_state(model)[k] is v for k, v in masks.items())
    assert torch.equal(model(x), mixed)
    with pytest.raises(KeyError), full_quantization(model):
        raise KeyError("boom")
    assert get_sq_ratio(model) == 0.4 and all(selection_state(model)[k] is v for k, v in masks.items())
