"""esq-export: pack a trained checkpoint and check that the file reloads (artifacts/loading.py) to identical logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from esq_lightning.artifacts.loading import load_exported, load_trained_model
from esq_lightning.errors import ESQUserError
from esq_lightning.quant import export_packed, full_quantization, quant_layers
from esq_lightning.utils import file_digest


# Sizes of the export report that do not depend on the header, so they can be stored in it.
SIZE_KEYS = ("float32_model_bytes", "float32_quantized_bytes", "packed_quantized_bytes", "other_bytes", "ratio",
             "quantized_layers")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def export_checkpoint(ckpt_path: str | Path, out: str | Path | None = None, verify: bool = True) -> dict[str, Any]:
    """Pack the checkpoint's model; returns the size report (and the logits check when verify)."""
    model, config, _, _ = load_trained_model(ckpt_path)
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
