"""esq-export: write the packed (b-bit, b <= 8) file of a trained checkpoint and check that it reloads to identical
logits, or (format=onnx) an ONNX file checked in onnxruntime against PyTorch (docs/deployment.md)."""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import esq_lightning.config.resolvers  # noqa: F401  (registers resolvers)
from esq_lightning.cli._common import CONFIG_PATH, one_line, user_errors_as_one_line

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
        return export_checkpoint(cfg.ckpt_path, cfg.out, verify=bool(cfg.verify))
    from esq_lightning.commands.onnx_export import export_onnx, require_onnx
    from esq_lightning.utils import set_threads

    require_onnx("esq-export format=onnx")
    set_threads(cfg.get("threads"))
    o = cfg.onnx
    return export_onnx(cfg.ckpt_path, cfg.out, n_samples=o.n_samples, attack=o.attack, eps=o.eps,
                       attack_params=_plain(o.get("params")), data=_plain(cfg.get("data")),
                       batch_size=int(o.batch_size), rtol=float(o.rtol), threads=cfg.get("threads"))


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top: `esq-export --help` and Hydra's own errors need no torch.
    from esq_lightning.artifacts.checkpoint import with_checkpoint_trust
    from esq_lightning.commands.onnx_export import ONNXCheckFailed

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


if __name__ == "__main__":
    main()
