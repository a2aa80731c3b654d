"""esq-export: write the packed (b-bit, b <= 8) file of a trained checkpoint and check that it reloads to identical
logits, or (format=onnx) an ONNX file checked in onnxruntime against PyTorch (docs/deployment.md)."""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import esq_lightning.config.resolvers  # noqa: F401  (registers resolvers)
from esq_lightning.cli._common import CONFIG_PATH, composition_in_one_line, one_line, user_errors_as_one_line

FORMATS = ("packed", "onnx")


def _plain(node: object) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}  # type: ignore[return-value]


def _export(cfg: DictConfig) -> dict:
    from esq_lightning.artifacts.export import export_checkpoint
    from esq_lightning.errors import ESQUserError

    fmt = str(cfg.get("format") or "packed")
    if fmt not in FORMATS:
        raise ESQUserError(f"format={fmt}: unknown export format; allowed: {', '.join(FORMATS)}")
    if fmt == "packed":
        return export_checkpoint(cfg.ckpt_path, cfg.out, verify=bool(cfg.verify), overwrite=bool(cfg.overwrite))
    from pathlib import Path

    from esq_lightning.artifacts.export import check_export_target
    from esq_lightning.commands.onnx_export import export_onnx, require_onnx

    # Never over the source, an existing file only with overwrite=true (artifacts/export.py), before any work.
    check_export_target(
        Path(cfg.ckpt_path), Path(cfg.out) if cfg.out else Path(cfg.ckpt_path).with_suffix(".onnx"), bool(cfg.overwrite)
    )
    from esq_lightning.utils import set_threads

    require_onnx("esq-export format=onnx")
    set_threads(cfg.get("threads"))
    o = cfg.onnx
    return export_onnx(
        cfg.ckpt_path,
        cfg.out,
        n_samples=o.n_samples,
        attack=o.attack,
        eps=o.eps,
        attack_params=_plain(o.get("params")),
        data=_plain(cfg.get("data")),
        batch_size=int(o.batch_size),
        rtol=float(o.rtol),
        threads=cfg.get("threads"),
        progress=bool(cfg.get("progress", True)),
    )


@composition_in_one_line("export")
@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top: `esq-export --help` and Hydra's own errors need no torch.
    from esq_lightning.artifacts.checkpoint import with_checkpoint_trust
    from esq_lightning.commands.onnx_export import ONNXCheckFailed

    check_export_config(cfg)
    # trust_checkpoint=true: the checkpoint is unpickled in full (checkpoint.py); by default weights_only.
    try:
        report = with_checkpoint_trust(_export)(cfg)
    except ONNXCheckFailed as exc:
        # Nothing was written: the file would not compute what the checkpoint computes.
        print(f"error: {one_line(str(exc))}; nothing written", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    if report.get("format") == "onnx":
        report = {k: v for k, v in report.items() if k != "config"}
    print(json.dumps(report, indent=2))


EXPORT_KEYS = {
    "ckpt_path": "a checkpoint path",
    "format": "packed or onnx",
    "out": "a file path or null",
    "verify": "true or false",
    "overwrite": "true or false",
    "trust_checkpoint": "true or false",
    "progress": "true or false",
    "threads": "an integer or null",
    "data": "data overrides",
    "onnx": "the format=onnx options",
}


def check_export_config(cfg: DictConfig) -> None:
    """One line for a missing ckpt_path, an unknown key or a value of the wrong type, before anything is read."""
    from omegaconf import OmegaConf

    from esq_lightning.errors import ESQUserError, did_you_mean, show_value

    for key in cfg:
        if key not in EXPORT_KEYS:
            raise ESQUserError(
                f"{key}: unknown key of esq-export{did_you_mean(key, EXPORT_KEYS)}; allowed: {', '.join(EXPORT_KEYS)}"
            )
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise ESQUserError("ckpt_path: missing; esq-export needs ckpt_path=path/to/final.ckpt")
    for key in ("verify", "overwrite", "trust_checkpoint", "progress"):
        if not isinstance(cfg.get(key), bool):
            raise ESQUserError(f"{key}: {show_value(cfg.get(key))} is not a boolean; allowed: true, false")
    for key in ("ckpt_path", "out"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), str):
            raise ESQUserError(f"{key}: {show_value(cfg.get(key))} is not a path; allowed: {EXPORT_KEYS[key]}")


if __name__ == "__main__":
    main()
