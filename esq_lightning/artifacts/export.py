"""esq-export: pack a trained checkpoint and check that the file reloads (artifacts/loading.py) to identical logits."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from esq_lightning.artifacts.loading import load_exported, load_trained_model
from esq_lightning.errors import ESQUserError
from esq_lightning.quant import export_packed, full_quantization, quant_layers
from esq_lightning.quant.packing import HEADER_FREE_SIZES
from esq_lightning.utils import file_digest

# Sizes of the export report that do not depend on the header, so they are stored in it (meta["sizes"]).
SIZE_KEYS = HEADER_FREE_SIZES


def check_export_target(source: Path, out: Path, overwrite: bool) -> None:
    """One line, before any work, when `out` is the source itself, exists (without overwrite) or cannot be written."""
    if not source.is_file():
        raise ESQUserError(f"ckpt_path: checkpoint not found: {source}")
    if out.exists() and (out.resolve() == source.resolve() or out.samefile(source)):
        raise ESQUserError(
            f"out: {out} is the checkpoint being exported; esq-export never writes over its source "
            f"(default out: {source.with_suffix('.esq')})"
        )
    if out.is_dir():
        raise ESQUserError(f"out: {out} is a directory; give the packed file's path, e.g. out={out / 'model.esq'}")
    if out.exists() and not overwrite:
        raise ESQUserError(f"out: {out} exists; esq-export does not replace a file unless overwrite=true")
    check_writable(out, "out")


def check_writable(path: str | os.PathLike, key: str) -> None:
    """ESQUserError naming `key` when a file cannot be created at `path` (its folder cannot be made or written)."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise ESQUserError(f"{key}: cannot write {path}: {exc.strerror or exc}; choose a writable place") from None
    os.close(fd)
    os.unlink(tmp)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def export_checkpoint(
    ckpt_path: str | Path, out: str | Path | None = None, verify: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Pack the checkpoint's model; returns the size report (and the logits check when verify).

    The packed file never replaces its source, and an existing file only with overwrite=True; both are refused
    before the checkpoint is read. The file is written once, complete, with its checksum (quant/packing.py)."""
    out = Path(out) if out else Path(ckpt_path).with_suffix(".esq")
    check_export_target(Path(ckpt_path), out, overwrite)
    model, config, _, _ = load_trained_model(ckpt_path)
    if not quant_layers(model):
        raise ESQUserError(f"{ckpt_path}: the model is full precision (quant=full); nothing to pack")
    meta = {
        "model": config["model"],
        "quant": config["quant"],
        "data": {"name": config["data"]["name"]},
        "source_checkpoint": str(ckpt_path),
    }
    # Additive metadata: the source checkpoint's identity, the sizes, and the whole training config (what
    # esq-eval needs to rebuild the data and the model from this file alone).
    source = Path(ckpt_path)
    meta.update(
        source={"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": file_digest(source)},
        config=_json_safe(config),
    )
    # One write, complete: the sizes in the header do not depend on the header (packing.HEADER_FREE_SIZES).
    report = export_packed(model, out, meta, sizes_key="sizes")
    report["path"] = str(out)
    report["source"] = meta["source"]
    if verify:
        shape = (
            8,
            int(config["data"]["in_channels"]),
            int(config["data"]["image_size"]),
            int(config["data"]["image_size"]),
        )
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), full_quantization(model):
            expected = model.eval()(x)
        rebuilt, _ = load_exported(out)
        with torch.no_grad():
            got = rebuilt(x)
        report["identical_logits"] = bool(torch.equal(expected, got))
        if not report["identical_logits"]:
            raise RuntimeError(
                f"{out}: reloaded logits differ from the checkpoint's (max {(expected - got).abs().max():.3g})"
            )
    return report
