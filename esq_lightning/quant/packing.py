"""Bit-packed export of a compressed model (b bits/weight for every b <= 8: BWN 1, TWN 2, uniform 2-8, any
registered family at its widths, per layer; pruned layers as a keep bitmask plus the kept weights only) and its
reload; a code is stored as its index among its family's code values."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.atomic import atomic_write
from esq_lightning.config.quantizers import quantizer_spec

from .functional import dequantize
from .masks import MASK, SCORES
from .modules import QuantMixin
from .registry import resolve_kind

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "pack_codes",
    "unpack_codes",
    "export_packed",
    "load_packed",
    "packed_size",
    "pack_mask",
    "unpack_mask",
]

FORMAT_NAME = "esq-packed"
# Version 2 adds `bits` per quantized layer and the uniform family; version 1 files (BWN/TWN, no
# `bits`) have the same layout and still load. Version 3 adds pruned layers: an entry may carry `mask`
# (a keep bitmask, 1 bit per weight) and then stores the codes / values of its kept weights only
# (`kept` of them); versions 1 and 2 have no such entries and still load. The one constant that names the
# version written: every change of this release's format lands in the same new version. Version 3 also ends the
# file with the SHA-256 of everything before it (header and payload; CHECKSUM_SINCE), checked on every load.
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
CHECKSUM_SINCE = 3
CHECKSUM_BYTES = 32
# File layout: MAGIC | u64 little-endian header length | zlib-compressed UTF-8 JSON header |
# padding | data | (version >= 3) SHA-256 of all the bytes before it. Raw bytes plus one compressed header keep the overhead to a few dozen bytes per
# tensor (no pickle, so loading a file cannot run code) and make the on-disk size easy to account
# for.
_MAGIC = b"ESQPACK\x00"
_ALIGN = 8  # every blob starts on an 8-byte boundary, so frombuffer gives aligned tensors


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _code_table(kind: str, bits: int) -> Tensor:
    # The family's code values, ascending (its entry in config/quantizers.py): a code is stored as its index
    # here, in `bits` bits. BWN {-1,+1} -> 0, 1; TWN {-1,0,+1} -> 0..2 (3 never occurs and is rejected on load);
    # uniform -L..L -> code + L in 0..2^b - 2 (2^b - 1 never occurs).
    return torch.tensor(quantizer_spec(kind).values(bits), dtype=torch.int16)


def pack_codes(codes: Tensor, kind: str, bits: int | None = None) -> Tensor:
    """Pack int8 codes into a uint8 bit stream, ``bits`` bits per code, LSB first.

    Each code is stored as its index among the family's code values (ascending): BWN {-1,+1} (1 bit), TWN
    {-1,0,+1} (2 bits), uniform -L..L (b bits, stored as code + L). Code i occupies stream bits
    [i*b, (i+1)*b); for b = 1, 2, 4, 8 that is 8/b whole codes per byte. ValueError for a code that is not
    one of the values.
    """
    kind, bits = resolve_kind(kind, bits)
    table = _code_table(kind, bits).to(codes.device)
    flat = codes.reshape(-1).to(torch.int16)
    index = torch.searchsorted(table, flat).clamp_max(table.numel() - 1)
    if not bool((table[index] == flat).all()):
        bad = flat[table[index] != flat][0]
        raise ValueError(
            f"code {int(bad)} is not a {bits}-bit {kind} code; allowed: {', '.join(map(str, table.tolist()))}"
        )
    vals = index.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=vals.device)
    stream = ((vals.reshape(-1, 1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32, device=vals.device)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: Tensor, kind: str, numel: int, bits: int | None = None) -> Tensor:
    """Inverse of pack_codes: the first ``numel`` codes as int8 (ValueError for a code no quantizer emits)."""
    kind, bits = resolve_kind(kind, bits)
    table = _code_table(kind, bits).to(packed.device)
    largest = table.numel() - 1
    if packed.numel() * 8 < numel * bits:
        raise ValueError(f"{packed.numel()} bytes hold fewer than {numel} {bits}-bit codes")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    vals = (stream.to(torch.int32) * weights).sum(dim=1)
    if bool((vals > largest).any()):
        raise ValueError(f"invalid {bits}-bit {kind} code {int(vals.max())} in packed data (largest {largest})")
    return table[vals].to(torch.int8)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool keep mask as a bit stream, 1 bit per weight (LSB first; bit 1 = kept)."""
    return pack_codes(torch.where(mask.reshape(-1), 1, -1).to(torch.int8), "bwn", 1)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of pack_mask: the first ``numel`` bits as a bool tensor."""
    return unpack_codes(packed, "bwn", numel, 1) > 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _raw(t: Tensor) -> memoryview:
    # Viewed as bytes, so bfloat16 and bool need no numpy dtype of their own.
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # Every layer the format codes specially: quantized (QuantMixin) or pruned (a `prune_mask` buffer).
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, QuantMixin) or m._buffers.get(MASK) is not None
    ]


def _encode(model: nn.Module) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Tensor], dict[str, int]]:
    """(quantized entries, raw tensor entries, blobs in file order, byte counts) of ``model``.

    export_packed writes exactly these blobs, each padded to 8 bytes, after the header; packed_size sums them.
    A quantized layer: packed codes plus one scale per filter (per layer); a pruned one: also its keep
    bitmask, and codes of its kept weights only. A pruned full-precision layer: bitmask plus kept values.
    The masks and scores of pruning are not stored as tensors of their own: the weights carry them.
    """
    state = model.state_dict()
    blobs: list[Tensor] = []
    offset = 0

    def add(t: Tensor) -> int:
        nonlocal offset
        start = offset
        blobs.append(t)
        offset += _nbytes(t) + _pad(_nbytes(t))
        return start

    quantized: list[dict[str, Any]] = []
    sparse: dict[str, dict[str, Any]] = {}
    counts = {"float32_quantized_bytes": 0, "packed_quantized_bytes": 0, "mask_bytes": 0}
    with torch.no_grad():
        for name, layer in _layers(model):
            key = f"{name}.weight" if name else "weight"
            if key not in state:
                raise ValueError(f"layer {name!r} has no state_dict entry {key!r}")
            w = layer.weight.detach()
            keep = layer._buffers.get(MASK)
            keep = None if keep is None else keep.detach().reshape(w.shape).to(torch.bool)
            entry: dict[str, Any] = {"key": key, "shape": list(w.shape), "dtype": _dtype_name(w.dtype)}
            if keep is not None:
                bitmask = pack_mask(keep)
                entry.update(mask=add(bitmask), mask_bytes=_nbytes(bitmask), kept=int(keep.sum()))
                counts["mask_bytes"] += _nbytes(bitmask)
            if not isinstance(layer, QuantMixin):
                values = w.reshape(-1)[keep.reshape(-1)].contiguous()
                entry.update(values=add(values))
                sparse[key] = entry
                continue
            codes, alpha = layer.quantizer.codes(w, layer.per_filter, keep)
            if keep is not None:
                codes = codes.reshape(-1)[keep.reshape(-1)]
            packed = pack_codes(codes, layer.kind, layer.bits)
            alpha = alpha.contiguous()
            entry.update(
                kind=layer.kind,
                bits=layer.bits,
                per_filter=layer.per_filter,
                codes=add(packed),
                codes_bytes=_nbytes(packed),
                alpha=add(alpha),
                alpha_numel=alpha.numel(),
            )
            quantized.append(entry)
            counts["float32_quantized_bytes"] += 4 * w.numel()
            counts["packed_quantized_bytes"] += _nbytes(packed) + _nbytes(alpha)

    qkeys = {q["key"] for q in quantized}
    tensors: list[dict[str, Any]] = []
    other_bytes = float32_model = 0
    for key, t in state.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"state_dict entry {key!r} is not a tensor ({type(t).__name__}); cannot pack it")
        leaf = key.rsplit(".", 1)[-1]
        if leaf in (MASK, SCORES):
            continue
        float32_model += t.numel() * (4 if t.is_floating_point() else t.element_size())
        if key in qkeys:
            continue
        if key in sparse:
            tensors.append(sparse[key])
            other_bytes += sparse[key]["kept"] * t.element_size()
            continue
        tensors.append({"key": key, "dtype": _dtype_name(t.dtype), "shape": list(t.shape), "offset": add(t)})
        other_bytes += _nbytes(t)
    counts.update(other_bytes=other_bytes, float32_model_bytes=float32_model, payload_bytes=offset)
    return quantized, tensors, blobs, counts


def packed_size(model: nn.Module) -> dict[str, int]:
    """The payload export_packed writes for ``model`` (every blob after the header, 8-byte padding included).

    {"model_bytes": that payload: quantized weights at bits/8 per weight plus their scales, pruned layers'
    bitmasks and kept weights, every other state_dict tensor raw; "float32_model_bytes": the same model dense
    in float32}: the x axis "model bytes" of the compression curves. The exported file is this plus its
    header (the run's config, a few kB, the same for every method).
    """
    _, _, _, counts = _encode(model)
    return {"model_bytes": counts["payload_bytes"], "float32_model_bytes": counts["float32_model_bytes"]}


# The sizes of the report that do not depend on the header, so they can be stored in it (esq-export's `sizes`).
HEADER_FREE_SIZES = (
    "float32_model_bytes",
    "float32_quantized_bytes",
    "packed_quantized_bytes",
    "other_bytes",
    "ratio",
    "quantized_layers",
)


def export_packed(
    model: nn.Module, path: str | os.PathLike[str], meta: dict | None = None, sizes_key: str | None = None
) -> dict[str, Any]:
    """Write ``model`` to ``path`` with its quantized layers bit-packed and its pruned layers sparse; return a size report.

    Quantized layers (at ratio 1, whatever their SQ ratio) are stored as packed codes plus one
    alpha per filter (per layer for per_filter=False) in the weight's dtype; pruned layers as a keep
    bitmask plus the codes (or float values) of their kept weights; every other state_dict tensor is
    stored raw. ``meta`` (JSON-able, e.g. the model's construction config) is stored for load_packed to
    rebuild the architecture. ``payload_bytes`` of the report is packed_size(model)["model_bytes"]. With
    ``sizes_key``, meta[sizes_key] also holds the HEADER_FREE_SIZES of the report: the file is written once,
    complete, with its checksum.
    """
    if sys.byteorder != "little":
        raise RuntimeError("export_packed writes little-endian data and needs a little-endian host")
    meta = {} if meta is None else meta
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON-serializable (OmegaConf: use to_container): {exc}") from exc

    quantized, tensors, blobs, counts = _encode(model)
    if sizes_key is not None:
        pq = counts["packed_quantized_bytes"]
        sizes = {
            "float32_quantized_bytes": counts["float32_quantized_bytes"],
            "packed_quantized_bytes": pq,
            "ratio": counts["float32_quantized_bytes"] / pq if pq else float("nan"),
            "other_bytes": counts["other_bytes"],
            "float32_model_bytes": counts["float32_model_bytes"],
            "quantized_layers": len(quantized),
        }
        meta = {**meta, sizes_key: {k: sizes[k] for k in HEADER_FREE_SIZES}}
    header = zlib.compress(
        json.dumps(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "meta": meta,
                "quantized": quantized,
                "tensors": tensors,
            },
            separators=(",", ":"),
        ).encode("utf-8"),
        level=9,
    )
    prefix = len(_MAGIC) + 8 + len(header)

    path = Path(path)

    def write(fh: Any) -> None:
        digest = hashlib.sha256()

        def put(chunk: bytes | memoryview) -> None:
            digest.update(chunk)
            fh.write(chunk)

        put(_MAGIC)
        put(struct.pack("<Q", len(header)))
        put(header)
        put(b"\x00" * _pad(prefix))
        for t in blobs:
            put(_raw(t))
            put(b"\x00" * _pad(_nbytes(t)))
        fh.write(digest.digest())

    # The one atomic writer: an interrupted export never leaves a half file.
    atomic_write(path, write)

    file_bytes = path.stat().st_size
    packed_quantized = counts["packed_quantized_bytes"]
    float32_model = counts["float32_model_bytes"]
    return {
        "packed_bytes": file_bytes,
        "file_bytes": file_bytes,
        "payload_bytes": file_bytes - prefix - _pad(prefix) - CHECKSUM_BYTES,
        "float32_quantized_bytes": counts["float32_quantized_bytes"],
        "packed_quantized_bytes": packed_quantized,
        "mask_bytes": counts["mask_bytes"],
        "ratio": counts["float32_quantized_bytes"] / packed_quantized if packed_quantized else float("nan"),
        "other_bytes": counts["other_bytes"],
        "overhead_bytes": file_bytes - packed_quantized - counts["other_bytes"] - counts["mask_bytes"],
        "float32_model_bytes": float32_model,
        "model_ratio": float32_model / file_bytes,
        "quantized_layers": len(quantized),
    }


def _read(path: Path) -> tuple[dict[str, Any], bytearray, int]:
    data = bytearray(path.read_bytes())
    if len(data) < len(_MAGIC) + 8 or bytes(data[: len(_MAGIC)]) != _MAGIC:
        raise ValueError(f"{path} is not an esq packed model (missing {_MAGIC!r} signature)")
    (hlen,) = struct.unpack("<Q", bytes(data[len(_MAGIC) : len(_MAGIC) + 8]))
    start = len(_MAGIC) + 8
    try:
        header = json.loads(zlib.decompress(bytes(data[start : start + hlen])).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not an esq packed model (unreadable header: {exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an esq packed model (header names no {FORMAT_NAME!r} format)")
    version = header.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{path}: esq packed format version {version} unsupported "
            f"(need one of {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    if version >= CHECKSUM_SINCE:
        body, stored = bytes(data[:-CHECKSUM_BYTES]), bytes(data[-CHECKSUM_BYTES:])
        if len(data) < start + hlen + CHECKSUM_BYTES or hashlib.sha256(body).digest() != stored:
            raise PackedChecksumError(
                f"{path}: checksum mismatch: the packed model is corrupt or was modified "
                "after esq-export wrote it; export it again from its checkpoint"
            )
        del data[-CHECKSUM_BYTES:]
    else:
        warnings.warn(
            UnverifiedPackedFile(
                f"{path}: esq packed format version {version} carries no checksum, so "
                "its contents cannot be verified; export it again to get one"
            ),
            stacklevel=3,
        )
    base = start + hlen
    return header, data, base + _pad(base)


class PackedChecksumError(ValueError):
    """The packed file's bytes do not match the checksum it was written with."""


class UnverifiedPackedFile(UserWarning):
    """A packed file of a format version without a checksum (older than CHECKSUM_SINCE) was read."""


def load_packed(path: str | os.PathLike[str], build_model: Callable[[dict], nn.Module]) -> tuple[nn.Module, dict]:
    """Rebuild a model written by export_packed: ``build_model(meta)`` gives the plain architecture.

    Quantized weights are dequantized with the same operation as bwn()/twn()/uniform(), so the returned
    model (in eval mode, no quantization code needed) reproduces the quantized model's logits at
    ratio 1 exactly.
    """
    if sys.byteorder != "little":
        raise RuntimeError("load_packed reads little-endian data and needs a little-endian host")
    path = Path(path)
    header, data, base = _read(path)

    def view(offset: int, dtype: torch.dtype, count: int) -> Tensor:
        start = base + offset
        if count and start + count * torch.empty(0, dtype=dtype).element_size() > len(data):
            raise ValueError("truncated: the header points past the end of the file")
        if not count:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype, count=count, offset=start)

    def keep_of(entry: dict[str, Any], numel: int) -> Tensor | None:
        # A pruned layer's keep mask (version 3), checked against the number of kept weights.
        if "mask" not in entry:
            return None
        keep = unpack_mask(view(entry["mask"], torch.uint8, entry["mask_bytes"]), numel)
        if int(keep.sum()) != int(entry["kept"]):
            raise ValueError(
                f"{entry['key']}: the mask keeps {int(keep.sum())} weights, the header says {entry['kept']}"
            )
        return keep

    def scatter(values: Tensor, keep: Tensor) -> Tensor:
        dense = torch.zeros(keep.numel(), dtype=values.dtype)
        dense[keep] = values
        return dense

    state: dict[str, Tensor] = {}
    try:
        for q in header["quantized"]:
            shape = torch.Size(q["shape"])
            dtype = _dtype_of(q["dtype"])
            numel = shape.numel()
            keep = keep_of(q, numel)
            count = numel if keep is None else int(q["kept"])
            codes = unpack_codes(view(q["codes"], torch.uint8, q["codes_bytes"]), q["kind"], count, q.get("bits"))
            if keep is not None:
                codes = scatter(codes, keep)
            rows = shape[0] if q["per_filter"] else 1
            alpha = view(q["alpha"], dtype, q["alpha_numel"])
            state[q["key"]] = dequantize(codes.reshape(rows, -1), alpha, shape)
        for t in header["tensors"]:
            shape = torch.Size(t["shape"])
            dtype = _dtype_of(t["dtype"])
            keep = keep_of(t, shape.numel())
            if keep is not None:
                state[t["key"]] = scatter(view(t["values"], dtype, int(t["kept"])), keep).reshape(shape)
                continue
            state[t["key"]] = view(t["offset"], dtype, shape.numel()).reshape(shape).clone()
        meta = header["meta"]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: corrupt esq packed model ({exc})") from exc

    model = build_model(meta)
    model.load_state_dict(state, strict=True)
    return model.eval(), meta
