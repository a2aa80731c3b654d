"""Export a trained checkpoint to the packed format and load it back as a plain PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esq_lightning.errors import ESQUserError
from esq_lightning.models import build_model
from esq_lightning.quant import export_packed, full_quantization, load_packed, quant_layers
from esq_lightning.utils import file_digest


def _build_from_meta(meta: dict[str, Any]) -> nn.Module:
    # The plain architecture, plus the activation quantizers when the run had them (quant.act_bits < 32).
    from esq_lightning.quant import quantize_activations

    model = build_model(meta["model"])
    quant = meta.get("quant") or {}
    return quantize_activations(model, int(quant.get("act_bits", 32)), keep_first_last=quant.get("keep_first_last", False))


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A plain (unquantized-code) model holding the exact dequantized weights, and the run metadata."""
    model, meta = load_packed(path, _build_from_meta)
    model.eval()
    return model, meta


# ---- evaluating the packed file (esq-eval ckpt_path=model.esq) ------------------------------------------------
PACKED_MAGIC = b"ESQPACK\x00"
# Sizes of the export report that do not depend on the header, so they can be stored in it.
SIZE_KEYS = ("float32_model_bytes", "float32_quantized_bytes", "packed_quantized_bytes", "other_bytes", "ratio",
             "quantized_layers")


def is_packed_file(path: str | Path) -> bool:
    """True for a file written by esq-export (its signature), whatever its suffix."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(PACKED_MAGIC)) == PACKED_MAGIC
    except OSError:
        return False


def load_packed_for_eval(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The rebuilt model of a packed file and the training config it carries (data, model, eval defaults)."""
    try:
        model, meta = load_exported(path)
    except ValueError as exc:
        raise ESQUserError(f"ckpt_path: {exc}") from None
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ESQUserError(f"ckpt_path: {path} carries no training config (written by an older esq-export); "
                           f"export it again from its checkpoint: esq-export ckpt_path={meta.get('source_checkpoint')}")
    return model, config


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def export_checkpoint(ckpt_path: str | Path, out: str | Path | None = None, verify: bool = True) -> dict[str, Any]:
    """Pack the checkpoint's model; returns the size report (and the logits check when verify)."""
    from esq_lightning.evaluation.modes import load_trained_model

    model, config = load_trained_model(ckpt_path)
    if not quant_layers(model):
        raise ESQUserError(f"{ckpt_path}: the model is full precision (quant=full); nothing to pack")
    out = Path(out) if out else Path(ckpt_path).with_suffix(".esq")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": config["model"], "quant": config["quant"], "data": {"name": config["data"]["name"]},
            "source_checkpoint": str(ckpt_path)}
    # Additive metadata: the source checkpoint's identity, the sizes, and the whole training config (what
    # esq-eval needs to rebuild the data and the model from this file alone).
    source = Path(ckpt_path)
    meta.update(source={"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": file_digest(source)},
                config=_json_safe(config))
    first = export_packed(model, out, meta)
    meta["sizes"] = {k: first[k] for k in SIZE_KEYS if k in first}
    # Written again with the sizes in its header (the sizes of the packed tensors do not depend on the header).
    report = export_packed(model, out, meta)
    report["path"] = str(out)
    report["source"] = meta["source"]
    if verify:
        shape = (8, int(config["data"]["in_channels"]), int(config["data"]["image_size"]), int(config["data"]["image_size"]))
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), full_quantization(model):
            expected = model.eval()(x)
        rebuilt, _ = load_exported(out)
        with torch.no_grad():
            got = rebuilt(x)
        report["identical_logits"] = bool(torch.equal(expected, got))
        if not report["identical_logits"]:
            raise RuntimeError(f"{out}: reloaded logits differ from the checkpoint's (max {(expected - got).abs().max():.3g})")
    return report
