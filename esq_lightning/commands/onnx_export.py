"""ONNX export of a trained model, checked in onnxruntime against PyTorch (esq-export format=onnx).

What the file holds (docs/deployment.md):
- weights of 2-8 bits (TWN, uniform b): QDQ with integer initializers, the codes as int8 narrowed to the
  quantizer's range by a Clip (ternary [-1, 1], uniform b [-L, L], L = 2^(b-1) - 1), then DequantizeLinear
  with one scale per output channel (per_filter) or one per tensor; zero point 0. ONNX computes
  code * scale in float32, the same product PyTorch's forward uses, so these weights are exact.
- 1-bit weights (BWN): float32 weights alpha * sign(W). QDQ has no 1-bit form (a Clip range of [-1, 1]
  states a ternary quantizer, and a 1-bit signed range is {-1, 0}), so the binary weights are folded.
- activation quantization (quant.act_bits = k < 32): QuantizeLinear (uint8, scale alpha / (2^k - 1), zero
  point 0), Clip to [0, 2^k - 1], DequantizeLinear, at the input of every layer the model quantizes.
- everything else (BatchNorm, the input normalization, full-precision layers) in float32, as exported by
  the TorchScript exporter (torch.onnx.export(dynamo=False): it needs the onnx package alone).

The check: the PyTorch model (eval mode, full quantization) and onnxruntime on the same inputs give the same
predictions and logits within LOGIT_RTOL; a mismatch raises ONNXCheckFailed naming the first conv/linear
layer whose outputs diverge.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from esq_lightning.artifacts.export import export_checkpoint
from esq_lightning.artifacts.loading import load_trained_model
from esq_lightning.atomic import atomic_write, atomic_write_json
from esq_lightning.commands.evaluate import load_test_split
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.whitebox import attack_budget, attack_in_batches
from esq_lightning.quant import act_quant_layers, dequantize, full_quantization, quant_layers
from esq_lightning.quant.modules import _to_plain
from esq_lightning.utils import file_digest
from esq_lightning.versions import __version__

# ONNX operator set of the written files (per-axis DequantizeLinear needs 13; 17 is read by every current runtime).
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Logits agree when max_k |z_onnx - z_torch| <= LOGIT_RTOL * max(1, max_k |z_torch|) for every input: float32
# convolutions summed in another order differ by about 1e-6 relative; an activation code that rounds the other
# way at a rounding boundary moves the logits by far less than 1e-3 of their scale; a changed weight by more.
LOGIT_RTOL = 1e-3
# A layer output diverges when ||y_onnx - y_torch||_2 > LAYER_RTOL * ||y_torch||_2 (the search for the first
# layer of a failed check; the relative L2 error stays near 1e-6 for float32 reordering and for single codes
# that round the other way).
LAYER_RTOL = 1e-3
EXTRA_HINT = "pip install 'esq-lightning[onnx]' (make setup installs it)"
# metadata_props keys of the written file.
META_CONFIG = "esq_lightning.config"
META_SOURCE = "esq_lightning.source"
META_VERSION = "esq_lightning.version"


class ONNXCheckFailed(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's beyond the stated tolerance (the message names the layer)."""


def require_onnx(what: str) -> tuple[Any, Any]:
    """(onnx, onnxruntime), or ESQUserError in one line naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ESQUserError(
            f"{what} needs the packages onnx and onnxruntime ({exc.name} is missing): {EXTRA_HINT}"
        ) from None
    return onnx, onnxruntime


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the graph ---------------------------------------------------------------------------------------------
class _ActQDQ(torch.autograd.Function):
    """k-bit activation quantization exported as QuantizeLinear -> Clip -> DequantizeLinear (uint8)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, levels: int) -> Tensor:
        return torch.clamp(torch.round(x / scale), 0, levels) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, levels: int) -> Any:
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
        top = g.op("Constant", value_t=torch.tensor(levels, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, s, zero)
        return g.op("DequantizeLinear", g.op("Clip", q, zero, top), s, zero)


def act_scale(alpha: Tensor, bits: int) -> float:
    """The step of act_quantize: alpha / (2^bits - 1) in float32, as the PyTorch forward computes it."""
    return float(alpha.detach().float() / (2 ** int(bits) - 1))


def has_qdq_form(code_values: tuple[int, ...]) -> bool:
    """A quantizer's codes have an exact QDQ form when they are every integer of [-L, L], L <= 127: int8 storage,
    Clip(-L, L) states the set. TWN {-1, 0, 1} and uniform b-bit codes do; BWN {-1, +1} does not (the range
    [-1, 1] also holds 0, and a 1-bit signed range is {-1, 0})."""
    levels = max(abs(c) for c in code_values)
    return levels <= 127 and tuple(code_values) == tuple(range(-levels, levels + 1))


def weight_layout(model: nn.Module) -> list[dict[str, Any]]:
    """Per quantized layer: name, kind, bits, per_filter, the int8 codes (weight shape), the scales, the form."""

    out = []
    with torch.no_grad():
        for name, layer in quant_layers(model):
            codes, scale = layer.quantizer.codes(layer.weight.detach(), layer.per_filter)
            values = tuple(sorted(int(c) for c in layer.quantizer.code_values))
            levels = max(abs(c) for c in values)
            out.append(
                {
                    "layer": name,
                    "kind": layer.kind,
                    "bits": int(layer.bits),
                    "per_filter": bool(layer.per_filter),
                    "quantizer_per_filter": bool(layer.per_filter),
                    "codes": codes.reshape(layer.weight.shape),
                    "scale": scale.reshape(-1),
                    "range": [-levels, levels],
                    "form": "qdq_int8" if has_qdq_form(values) else "float32",
                }
            )
    return out


def _plain_copy(model: nn.Module, layout: list[dict[str, Any]]) -> nn.Module:
    """A copy with the quantized layers turned into plain layers holding the dequantized weights, and the
    activation quantizers exporting as QDQ. Its forward equals the model's at full quantization."""

    plain = copy.deepcopy(model).eval()
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for item in layout:
            layer = modules[item["layer"]]
            rows = item["codes"].shape[0] if item["per_filter"] else 1
            weight = dequantize(item["codes"].reshape(rows, -1), item["scale"], layer.weight.shape)
            _to_plain(layer)
            layer.weight.copy_(weight)
    for _, aq in act_quant_layers(plain):
        scale, levels = act_scale(aq.alpha, aq.bits), 2**aq.bits - 1
        aq.forward = lambda x, scale=scale, levels=levels: _ActQDQ.apply(x, scale, levels)  # type: ignore[method-assign]
    return plain


def _initializer(onnx: Any, name: str, value: np.ndarray) -> Any:
    return onnx.numpy_helper.from_array(value, name)


def _check_float_weights(onnx: Any, inits: dict[str, Any], layout: list[dict[str, Any]]) -> None:
    """The exporter wrote every quantized layer's weight as exactly scale * code (what the forward computes)."""
    for item in layout:
        key = f"{item['layer']}.weight"
        if key not in inits:
            raise RuntimeError(f"the exported graph has no initializer {key!r} (the weight of {item['layer']})")
        codes = item["codes"].numpy().astype(np.float32)
        scale = item["scale"].numpy().astype(np.float32).reshape(-1, *([1] * (codes.ndim - 1)))
        if not np.array_equal(onnx.numpy_helper.to_array(inits[key]), scale * codes):
            raise RuntimeError(f"{key}: the exported float weight is not scale * code")


def _fold_batchnorm(onnx: Any, proto: Any, layout: list[dict[str, Any]]) -> None:
    """Fold every BatchNorm that reads a Conv's output alone into that Conv: out-channel factor
    gamma / sqrt(var + eps) into the weight (the per-channel scales of a QDQ weight, whose codes stay as they are;
    a per-tensor scale becomes per channel) and beta - mean * factor into a float32 bias.

    Runtimes fold it anyway, and onnxruntime's own fusion of a Conv with a DequantizeLinear input re-quantizes
    the fused weights to int8 (another model); folded here, the file states the weights every runtime uses.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    # The exporter shares equal initializers through Identity nodes (an untrained BatchNorm's zero mean and bias):
    # read through them.
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = node.input[0]
        graph.node.remove(node)
    by_weight = {f"{item['layer']}.weight": item for item in layout}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}
    removed = []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0]) != 1:
            continue
        if any(name not in inits for name in [conv.input[1], *bn.input[1:5]]):
            continue
        gamma, beta, mean, var = (onnx.numpy_helper.to_array(inits[n]).astype(np.float32) for n in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = (gamma / np.sqrt(var + np.float32(eps))).astype(np.float32)
        shift = (beta - mean * factor).astype(np.float32)
        if len(conv.input) > 2 and conv.input[2]:
            shift = (shift + onnx.numpy_helper.to_array(inits[conv.input[2]]) * factor).astype(np.float32)
        weight_name = conv.input[1]
        weight = onnx.numpy_helper.to_array(inits[weight_name])
        item = by_weight.get(weight_name)
        bn_module = bn.input[1][: -len(".weight")] if bn.input[1].endswith(".weight") else bn.name
        if item is not None and item["form"] == "qdq_int8":
            scale = item["scale"].numpy().astype(np.float32)
            scale = np.broadcast_to(scale, factor.shape) if scale.size == 1 else scale
            item["scale"] = torch.from_numpy((scale * factor).astype(np.float32))
            item["per_filter"] = True
        folded = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        inits[weight_name].CopyFrom(onnx.numpy_helper.from_array(folded, weight_name))
        bias_name = f"{weight_name[: -len('.weight')]}.bias_folded"
        graph.initializer.append(onnx.numpy_helper.from_array(shift, bias_name))
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        conv.doc_string = f"esq_lightning: BatchNorm {bn_module} folded; output of {bn_module}"
        if item is not None:
            item["batchnorm_folded"] = bn_module
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
        for name in bn.input[1:5]:
            if sum(name in n.input for n in graph.node) == 0 and name in inits:
                graph.initializer.remove(inits.pop(name))


def _weights_as_qdq(onnx: Any, proto: Any, layout: list[dict[str, Any]]) -> None:
    """Replace the float initializer of every 2-8-bit layer by int8 codes -> Clip -> DequantizeLinear."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for item in layout:
        key = f"{item['layer']}.weight"
        if item["form"] != "qdq_int8":
            continue
        codes = item["codes"].numpy().astype(np.int8)
        scale = item["scale"].numpy().astype(np.float32)
        graph.initializer.remove(inits[key])
        per_channel = item["per_filter"]
        zero = np.zeros(scale.shape if per_channel else (), dtype=np.int8)
        lo, hi = item["range"]
        graph.initializer.extend(
            [
                _initializer(onnx, f"{key}_quantized", codes),
                _initializer(onnx, f"{key}_scale", scale if per_channel else scale.reshape(())),
                _initializer(onnx, f"{key}_zero_point", zero),
                _initializer(onnx, f"{key}_min", np.array(lo, dtype=np.int8)),
                _initializer(onnx, f"{key}_max", np.array(hi, dtype=np.int8)),
            ]
        )
        nodes.append(
            onnx.helper.make_node(
                "Clip", [f"{key}_quantized", f"{key}_min", f"{key}_max"], [f"{key}_clipped"], name=f"{key}/Clip"
            )
        )
        attrs = {"axis": 0} if per_channel else {}
        nodes.append(
            onnx.helper.make_node(
                "DequantizeLinear",
                [f"{key}_clipped", f"{key}_scale", f"{key}_zero_point"],
                [key],
                name=f"{key}/DequantizeLinear",
                **attrs,
            )
        )
    # Constants first: the graph stays topologically sorted.
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)


def build_onnx(
    model: nn.Module, input_shape: tuple[int, ...], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[dict[str, Any]]]:
    """The serialized ONNX model of `model` at full quantization, and the per-layer weight layout."""
    onnx, _ = require_onnx("esq-export format=onnx")
    layout = weight_layout(model)
    plain = _plain_copy(model, layout)
    buffer = io.BytesIO()
    dummy = torch.zeros((1, *input_shape[1:]))
    torch.onnx.export(
        plain,
        (dummy,),
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=False,
    )
    proto = onnx.load_from_string(buffer.getvalue())
    _check_float_weights(onnx, {t.name: t for t in proto.graph.initializer}, layout)
    _fold_batchnorm(onnx, proto, layout)
    _weights_as_qdq(onnx, proto, layout)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "esq-lightning"
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), layout


def layout_record(layout: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The json-able part of weight_layout: per layer what was written and its bytes in the file."""
    out = []
    for item in layout:
        n = item["codes"].numel()
        stored = n if item["form"] == "qdq_int8" else 4 * n
        scales = 4 * item["scale"].numel() if item["form"] == "qdq_int8" else 0
        out.append(
            {
                "layer": item["layer"],
                "kind": item["kind"],
                "bits": item["bits"],
                "quantizer_per_filter": item["quantizer_per_filter"],
                "per_channel_scales": item["per_filter"] if item["form"] == "qdq_int8" else None,
                "batchnorm_folded": item.get("batchnorm_folded"),
                "form": item["form"],
                "range": item["range"] if item["form"] == "qdq_int8" else None,
                "weights": n,
                "bytes": stored + scales,
            }
        )
    return out


# ---- running the file --------------------------------------------------------------------------------------
# onnxruntime's session option that keeps QuantizeLinear/DequantizeLinear as the float operations the ONNX spec
# defines. Without it onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into integer kernels
# (QLinearConv) and rounds the bias to int32 on the way: faster, but another model (docs/deployment.md has the
# measured difference).
EXACT_QDQ_OPTION = ("session.disable_quant_qdq", "1")


def session(model: bytes | str | Path, threads: int | None = None, int8_fusion: bool = False) -> Any:
    """An onnxruntime CPU session (intra-op threads: `threads`, else torch's thread count) that runs the QDQ
    graph as the spec defines it, or with onnxruntime's integer fusions (int8_fusion=True, its default)."""
    _, ort = require_onnx("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not int8_fusion:
        options.add_session_config_entry(*EXACT_QDQ_OPTION)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, x: Tensor, batch_size: int = 500, outputs: list[str] | None = None) -> list[np.ndarray]:
    """The session's outputs on x (float32, NCHW), concatenated over batches."""
    name = sess.get_inputs()[0].name
    chunks: list[list[np.ndarray]] = []
    data = x.detach().cpu().float().numpy()
    for i in range(0, len(data), batch_size):
        chunks.append(sess.run(outputs, {name: data[i : i + batch_size]}))
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))] if chunks else []


class OnnxRuntimeClassifier(nn.Module):
    """An onnxruntime session as a black-box classifier: logits as a tensor, no gradients (attacks that need
    them find zero input gradients and are refused by the registry's gradient check)."""

    def __init__(self, sess: Any) -> None:
        super().__init__()
        self.session = sess
        self.input_name = sess.get_inputs()[0].name
        self.queries = 0

    def forward(self, x: Tensor) -> Tensor:
        self.queries += len(x)
        out = self.session.run([OUTPUT_NAME], {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


# ---- the check -------------------------------------------------------------------------------------------
@torch.no_grad()
def torch_logits(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:

    model.eval()
    with full_quantization(model):
        out = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def compare_logits(expected: Tensor, got: np.ndarray, rtol: float = LOGIT_RTOL) -> dict[str, Any]:
    """The numbers of the check: predictions, max abs difference, the tolerance per input, the worst input."""
    got_t = torch.from_numpy(got)
    diff = (got_t - expected).abs().amax(dim=1)
    allowed = rtol * expected.abs().amax(dim=1).clamp_min(1.0)
    same = got_t.argmax(1) == expected.argmax(1)
    worst = int((diff / allowed).argmax()) if len(diff) else -1
    return {
        "n_inputs": len(expected),
        "predictions_equal": int(same.sum()),
        "prediction_differences": int((~same).sum()),
        "max_abs_logit_diff": float(diff.max()) if len(diff) else 0.0,
        "max_relative_logit_diff": float((diff / expected.abs().amax(dim=1).clamp_min(1.0)).max())
        if len(diff)
        else 0.0,
        "within_tolerance": int((diff <= allowed).sum()),
        "worst_input": worst,
        "tolerance": f"max_k |z_onnx - z_torch| <= {rtol:g} * max(1, max_k |z_torch|) per input",
        "passed": bool(same.all() and (diff <= allowed).all()),
    }


def _layer_of(node: Any) -> tuple[str, str]:
    """(the layer, the module whose PyTorch output the node's output equals: the layer, or its folded BatchNorm)."""
    # Conv/Gemm read their weight as input 1: `<module>.weight` (an initializer or a DequantizeLinear output).
    weight = node.input[1] if len(node.input) > 1 else ""
    layer = weight[: -len(".weight")] if weight.endswith(".weight") else node.name
    marker = "; output of "
    return layer, node.doc_string.split(marker, 1)[1] if marker in node.doc_string else layer


@torch.no_grad()
def first_divergence(
    model_bytes: bytes, model: nn.Module, x: Tensor, rtol: float = LAYER_RTOL
) -> dict[str, Any] | None:
    """The first conv/linear layer (in graph order) whose onnxruntime output differs from PyTorch's by more than
    rtol in relative L2, with its error; None when every layer agrees (the difference is after the last one)."""
    onnx, _ = require_onnx("the ONNX check")

    proto = onnx.load_from_string(model_bytes)
    nodes = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for n in nodes:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    sess = session(proto.SerializeToString(), threads=1)
    names = [n.output[0] for n in nodes]
    got = dict(zip(names, run_session(sess, x, outputs=names)))
    seen: dict[str, Tensor] = {}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.detach()))
        for name, m in modules.items()
    ]
    try:
        with full_quantization(model):
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    for node in nodes:
        layer, compared = _layer_of(node)
        if compared not in seen:
            continue
        ref = seen[compared]
        out = torch.from_numpy(got[node.output[0]]).reshape(ref.shape)
        err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
        if err > rtol:
            return {"layer": layer, "relative_l2": err, "onnx_node": node.name}
    return None


def check_onnx(
    model_bytes: bytes,
    model: nn.Module,
    inputs: dict[str, Tensor],
    batch_size: int = 500,
    threads: int | None = None,
    rtol: float = LOGIT_RTOL,
) -> dict[str, Any]:
    """Run the file in onnxruntime and the model in PyTorch on each named input set; {name: compare_logits}.

    The session runs QDQ as the spec defines it (EXACT_QDQ_OPTION). ONNXCheckFailed (one line) on the first set
    that fails, naming the first layer whose outputs diverge. Where onnxruntime's default session fuses QDQ into
    integer kernels, {name}_int8_fusion holds its agreement too (reported, not required).
    """
    sess = session(model_bytes, threads)
    fused = session(model_bytes, threads, int8_fusion=True)
    report = {}
    for name, x in inputs.items():
        expected = torch_logits(model, x, batch_size)
        (got,) = run_session(sess, x, batch_size, [OUTPUT_NAME])
        result = compare_logits(expected, got, rtol)
        report[name] = result
        (got_fused,) = run_session(fused, x, batch_size, [OUTPUT_NAME])
        if not np.array_equal(got_fused, got):
            report[f"{name}_int8_fusion"] = {
                k: v for k, v in compare_logits(expected, got_fused, rtol).items() if k not in ("worst_input", "passed")
            }
        if not result["passed"]:
            i = result["worst_input"]
            where = first_divergence(model_bytes, model, x[i : i + 1])
            at = (
                f"first diverging layer {where['layer']} (relative L2 error {where['relative_l2']:.3g} > {LAYER_RTOL:g})"
                if where
                else "every conv/linear layer agrees: the difference is after the last one"
            )
            raise ONNXCheckFailed(
                f"the ONNX model disagrees with PyTorch on the {name} inputs: {result['prediction_differences']} of "
                f"{result['n_inputs']} predictions differ, max logit difference {result['max_abs_logit_diff']:.3g} "
                f"({result['n_inputs'] - result['within_tolerance']} inputs outside {result['tolerance']}); "
                f"input {i}: {at}"
            )
    return report


# ---- the export record ---------------------------------------------------------------------------------------
def record_path(path: str | Path) -> Path:
    """The export record next to the file: model.onnx -> model.onnx.json."""
    return Path(f"{path}.json")


def adversarial_path(path: str | Path) -> Path:
    """The white-box adversarial examples of the source checkpoint: model.onnx -> model.onnx.adv.npz."""
    return Path(f"{path}.adv.npz")


def read_record(path: str | Path) -> dict[str, Any]:
    """The export record of an ONNX file written by esq-export, checked against the file's digest."""
    rec = record_path(path)
    if not Path(path).is_file():
        raise ESQUserError(f"ckpt_path: {path} does not exist")
    if not rec.is_file():
        raise ESQUserError(
            f"ckpt_path: {path} has no export record {rec}; write the file with "
            "esq-export ckpt_path=<checkpoint> format=onnx"
        )
    record = json.loads(rec.read_text())
    digest = file_sha256(Path(path).read_bytes())
    if record.get("sha256") != digest:
        raise ESQUserError(
            f"ckpt_path: {path} is not the file its record {rec} describes (sha256 {digest[:12]}... "
            f"!= {str(record.get('sha256'))[:12]}...); export it again"
        )
    return record


def save_adversarial(path: Path, x_adv: Tensor, y: Tensor, torch_pred: Tensor, writer: Callable[..., None]) -> str:
    """Write the adversarial examples (npz, no pickle) through `writer`; returns their sha256."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        x_adv=x_adv.numpy().astype(np.float32),
        y=y.numpy().astype(np.int64),
        torch_pred=torch_pred.numpy().astype(np.int64),
    )
    data = buffer.getvalue()
    writer(path, lambda fh: fh.write(data))
    return file_sha256(data)


def load_adversarial(path: Path, sha256: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ESQUserError(f"ckpt_path: the adversarial examples {path} named by the export record are missing")
    data = path.read_bytes()
    if file_sha256(data) != sha256:
        raise ESQUserError(f"ckpt_path: {path} is not the file the export record names (sha256 differs)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- esq-export format=onnx --------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _packed_bytes(ckpt_path: str | Path) -> dict[str, Any]:
    """The size of the packed file esq-export format=packed writes for the same checkpoint (written to a temporary
    folder and measured); None for a full-precision model, which has no packed form."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = export_checkpoint(ckpt_path, Path(tmp) / "model.esq", verify=False)
        except ESQUserError as exc:
            return {"packed_bytes": None, "packed_note": str(exc)}
    return {"packed_bytes": int(report["file_bytes"])}


def export_onnx(
    ckpt_path: str | Path,
    out: str | Path | None = None,
    *,
    n_samples: int | None = 1000,
    attack: str | None = "pgd20",
    eps: float | None = None,
    attack_params: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    batch_size: int = 500,
    rtol: float = LOGIT_RTOL,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the checkpoint's model as ONNX (out, default next to the checkpoint with the suffix .onnx) after
    checking it in onnxruntime on the first n_samples test inputs and on the white-box adversarial examples of
    `attack` (at eps, default the checkpoint's eval.eps) made on the PyTorch model; those are written next to
    it (model.onnx.adv.npz) for esq-eval to replay. The record (model.onnx.json) says what was written, its
    size next to the packed size, and the check's numbers. Returns the record."""
    from omegaconf import OmegaConf

    onnx, ort = require_onnx("esq-export format=onnx")
    loaded = load_trained_model(ckpt_path)
    model, config = loaded.model, loaded.config
    model.eval()
    out = Path(out) if out else Path(ckpt_path).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    source = Path(ckpt_path)
    source_rec = {"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": file_digest(source)}
    run_cfg = OmegaConf.merge(OmegaConf.create(config), {"data": data or {}})
    x, y = load_test_split(run_cfg, int(config.get("seed", 0)), n_samples)
    model_bytes, layout = build_onnx(
        model,
        tuple(x.shape),
        {META_CONFIG: json.dumps(_json_safe(config)), META_SOURCE: json.dumps(source_rec), META_VERSION: __version__},
    )
    inputs = {"test": x}
    adv_rec: dict[str, Any] | None = None
    if attack:
        if eps is None:
            eps = float(OmegaConf.select(run_cfg, "eval.eps", default=None) or run_cfg.data.attack.eps)
        attack_eps, extra = attack_budget(attack, float(eps), attack_params or {})
        torch.manual_seed(0)
        with full_quantization(model):
            correct, x_adv, used = attack_in_batches(
                attack, model, x, y, attack_eps, extra, batch_size, progress=progress, keep_adv=True
            )
        assert x_adv is not None
        inputs["adversarial"] = x_adv
        adv_rec = {
            "attack": attack,
            "params": used,
            "n_inputs": len(y),
            "norm": used.get("norm", "linf"),
            "eps": attack_eps,
            "torch_robust_acc": float(correct.float().mean()) if len(y) else None,
        }
    check = check_onnx(model_bytes, model, inputs, batch_size, threads, rtol)
    atomic_write(out, lambda fh: fh.write(model_bytes))
    if adv_rec is not None:
        torch_pred = torch_logits(model, inputs["adversarial"], batch_size).argmax(1)
        adv_path = adversarial_path(out)
        adv_rec.update(
            path=adv_path.name, sha256=save_adversarial(adv_path, inputs["adversarial"], y, torch_pred, atomic_write)
        )
    layers = layout_record(layout)
    act = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "ActQuant"]
    float32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())
    sizes = {"onnx_bytes": len(model_bytes), **_packed_bytes(ckpt_path), "float32_model_bytes": float32}
    record = {
        "format": "onnx",
        "path": str(out),
        "bytes": len(model_bytes),
        "sha256": file_sha256(model_bytes),
        "opset": OPSET,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
        "source": source_rec,
        "quant": {
            "kind": config["quant"].get("kind"),
            "bits": int(config["quant"].get("bits", 32)),
            "act_bits": int(config["quant"].get("act_bits", 32)),
        },
        "sizes": sizes,
        "weights": {
            "qdq_int8_layers": sum(1 for r in layers if r["form"] == "qdq_int8"),
            "float32_folded_layers": sum(1 for r in layers if r["form"] == "float32"),
            "quantized_weight_bytes": sum(r["bytes"] for r in layers),
            "layers": layers,
        },
        "activations": {
            "bits": int(config["quant"].get("act_bits", 32)),
            "qdq_layers": len(act),
            "form": "QuantizeLinear(uint8) -> Clip(0, 2^k - 1) -> DequantizeLinear" if act else None,
        },
        "check": {
            "inputs": f"the first {len(y)} test inputs"
            + (f" and their {attack} adversarial examples" if attack else ""),
            "threads": int(threads or torch.get_num_threads()),
            "layer_rtol": LAYER_RTOL,
            **check,
        },
        "adversarial": adv_rec,
        "data": {"name": config["data"]["name"], "n_samples": len(y), "seed": int(config.get("seed", 0))},
        "config": _json_safe(config),
    }
    atomic_write_json(record_path(out), record)
    return record
