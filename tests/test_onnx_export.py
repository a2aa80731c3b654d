"""esq-export format=onnx and esq-eval ckpt_path=model.onnx: the ONNX file computes what the checkpoint computes in
onnxruntime (every model family, every weight width, activation quantization), a changed weight is caught and named,
the deployed model's robustness is measured in the runtime (replayed white-box examples, Square as a black box)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from esq_lightning.errors import ESQUserError
from esq_lightning.models import BottleneckResNet, CifarResNet, PreActResNet, SmallCNN, WideResNet
from esq_lightning.quant import calibrate_act_quant, quant_layers, quantize_activations, quantize_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from esq_lightning.commands.onnx_export import (
    ONNXCheckFailed,
    build_onnx,
    check_onnx,
    has_qdq_form,
    layout_record,
    require_onnx,
)
from tests.test_evaluation import ckpts, run_eval  # noqa: F401  (ckpts: the session fixture)

# Each family at a tiny size on 8x8 inputs (the real configs are conf/model/*.yaml).
FAMILIES = {
    "small_cnn": lambda: SmallCNN(width=4),
    "resnet_cifar": lambda: CifarResNet(depth=8, width=4),
    "preact_resnet": lambda: PreActResNet(num_blocks=(1, 1, 1, 1), width=4),
    "wide_resnet": lambda: WideResNet(depth=10, widen_factor=1, width=4),
    "resnet_bottleneck": lambda: BottleneckResNet(num_blocks=(1, 1, 1, 1), width=4),
}
# (weight bits, activation bits): every width, and activation quantization (4-bit weights and activations; BWN
# with 2-bit activations).
WIDTHS = [(1, 32), (2, 32), (4, 32), (8, 32), (32, 32), (4, 4), (1, 2)]


def tiny_model(family: str, bits: int, act_bits: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model of `family` with trained-looking BatchNorm statistics (random affine and running statistics, as
    after training: an untrained BatchNorm maps the integer grid of quantized products onto rounding ties), its
    activation ranges calibrated, and 32 inputs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    in_channels = 1 if family == "small_cnn" else 3
    model = FAMILIES[family]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean = 0.2 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
    if bits < 32:
        quantize_model(model, "auto", bits=bits)
    quantize_activations(model, act_bits)
    x = torch.rand(32, in_channels, 8, 8, generator=g)
    calibrate_act_quant(model, x)
    return model.eval(), x


def initializers(model_bytes: bytes) -> dict[str, np.ndarray]:
    proto = onnx.load_from_string(model_bytes)
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("bits,act_bits", WIDTHS, ids=[f"w{b}a{a}" for b, a in WIDTHS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnxruntime_agrees_with_pytorch(family, bits, act_bits):
    model, x = tiny_model(family, bits, act_bits)
    model_bytes, layout = build_onnx(model, tuple(x.shape))
    report = check_onnx(model_bytes, model, {"test": x}, threads=1)["test"]
    assert report["passed"] and report["predictions_equal"] == len(x)
    inits = initializers(model_bytes)
    records = layout_record(layout)
    assert len(records) == len(quant_layers(model))
    for rec in records:
        if bits == 1:
            # BWN: folded float32 weights, no integer form
            assert rec["form"] == "float32" and f"{rec['layer']}.weight_quantized" not in inits
            assert inits[f"{rec['layer']}.weight"].dtype == np.float32
        else:
            codes = inits[f"{rec['layer']}.weight_quantized"]
            levels = 1 if bits == 2 else 2 ** (bits - 1) - 1
            assert rec["form"] == "qdq_int8" and codes.dtype == np.int8 and rec["range"] == [-levels, levels]
            assert np.abs(codes).max() <= levels and f"{rec['layer']}.weight" not in inits
            assert inits[f"{rec['layer']}.weight_max"] == levels
    act_nodes = [n for n in onnx.load_from_string(model_bytes).graph.node if n.op_type == "QuantizeLinear"]
    assert len(act_nodes) == (
        0 if act_bits == 32 else sum(1 for m in model.modules() if type(m).__name__ == "ActQuant")
    )


def test_the_weight_form_follows_the_code_values():
    from esq_lightning.quant import QUANTIZERS

    forms = {q.name: has_qdq_form(q.code_values) for q in QUANTIZERS}
    assert forms["bwn"] is False and forms["twn"] is True
    assert all(forms[f"uniform{b}"] for b in range(2, 9))
    assert not has_qdq_form((-2, -1, 1, 2)) and not has_qdq_form(tuple(range(-128, 129)))


def test_the_file_is_smaller_where_qdq_holds_the_weights():
    sizes = {}
    for bits in (1, 4, 32):
        model = CifarResNet(depth=8, width=16)  # 78k weights: the graph's own bytes no longer dominate
        if bits < 32:
            quantize_model(model, "auto", bits=bits)
        sizes[bits] = len(build_onnx(model.eval(), (1, 3, 8, 8))[0])
    # int8 codes: about a quarter of the float32 file; BWN's folded float weights: the float32 size
    assert sizes[4] < 0.5 * sizes[32] and abs(sizes[1] - sizes[32]) < 0.05 * sizes[32]


@pytest.mark.parametrize("bits", [1, 4])
def test_a_changed_weight_is_caught_and_its_layer_named(bits):
    model, x = tiny_model("small_cnn", bits, 32)
    model_bytes, _ = build_onnx(model, tuple(x.shape))
    proto = onnx.load_from_string(model_bytes)
    name = "block2.0.weight" if bits == 1 else "block2.0.weight_quantized"
    init = next(t for t in proto.graph.initializer if t.name == name)
    value = onnx.numpy_helper.to_array(init).copy()
    flat = value.reshape(-1)
    i = int(np.flatnonzero(flat)[0])
    flat[i] = -flat[i]  # one weight changed
    init.CopyFrom(onnx.numpy_helper.from_array(value, name))
    with pytest.raises(ONNXCheckFailed, match=r"first diverging layer block2\.0 \(relative L2 error"):
        check_onnx(proto.SerializeToString(), model, {"test": x}, threads=1)


def test_without_the_extra_the_commands_name_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ESQUserError, match=r"pip install 'esq-lightning\[onnx\]'") as err:
        require_onnx("esq-export format=onnx")
    assert "\n" not in str(err.value)
    from esq_lightning.commands.onnx_export import export_onnx

    with pytest.raises(ESQUserError, match=r"esq-export format=onnx needs the packages onnx and onnxruntime"):
        export_onnx(tmp_path / "missing.ckpt")
    with pytest.raises(ESQUserError, match=r"esq-eval ckpt_path=\*\.onnx needs .*esq-lightning\[onnx\]"):
        run_eval(tmp_path / "eval", [f"ckpt_path={tmp_path / 'model.onnx'}"])


# --- end to end on a trained digits checkpoint ------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    """The natural full-precision digits checkpoint exported with its PGD examples (eps 0.2, the digits default)."""
    from esq_lightning.commands.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    record = export_onnx(ckpts["full"], out, n_samples=48, attack="pgd20", attack_params={"steps": 5}, threads=1)
    return out, record


def test_export_record_states_the_file_and_the_check(exported, ckpts):
    out, record = exported
    on_disk = json.loads(out.with_name("model.onnx.json").read_text())
    assert on_disk["sha256"] == record["sha256"] and record["bytes"] == out.stat().st_size
    assert record["sizes"]["packed_bytes"] is None  # full precision has no packed form
    assert record["check"]["test"]["passed"] and record["check"]["adversarial"]["passed"]
    assert record["check"]["test"]["n_inputs"] == 48 and record["adversarial"]["path"] == "model.onnx.adv.npz"
    assert record["source"]["sha256"] and record["config"]["data"]["name"] == "digits"


def test_replayed_examples_and_square_in_onnxruntime(exported, tmp_path):
    out, record = exported
    res = run_eval(
        tmp_path, [f"ckpt_path={out}", "eval.n_samples=32", "++eval.params.square.n_queries=60", "eval.batch_size=16"]
    )
    replay = res["attacks"]["replay_pgd20"]
    # the deployed file gives PyTorch's prediction on every white-box example of the source checkpoint
    assert replay["differences"] == [] and replay["same_predictions_as_torch"] == 32
    assert res["robust_acc"]["replay_pgd20"] == pytest.approx(replay["torch_robust_acc"])
    # Square on the session lowers a natural model's accuracy; the headline is the per-input worst case of both
    assert res["robust_acc"]["square"] < res["clean_acc"]
    assert res["robust_acc"]["worst_case"] <= min(res["robust_acc"]["square"], res["robust_acc"]["replay_pgd20"])
    assert list(res["robust_acc"])[0] == "worst_case" and res["worst_case"]["attacks"] == ["replay_pgd20", "square"]
    assert res["attacks"]["square"]["queries_total"] > 32 and res["mode"] == "onnx"
    assert res["threat_model"]["norm"] == "linf" and res["deployment"]["sha256"] == record["sha256"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["robust_acc"] == res["robust_acc"]


def test_a_file_not_matching_its_record_is_refused(exported, tmp_path):
    out, _ = exported
    copy = tmp_path / "model.onnx"
    copy.write_bytes(out.read_bytes() + b"\x00")
    copy.with_name("model.onnx.json").write_text(out.with_name("model.onnx.json").read_text())
    with pytest.raises(ESQUserError, match=r"is not the file its record .* describes"):
        run_eval(tmp_path / "eval", [f"ckpt_path={copy}"])
