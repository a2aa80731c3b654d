"""Reading checkpoints: the run config they carry, and model weights from Lightning or plain state dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from esq_lightning.errors import ESQUserError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load a checkpoint with a one-line error naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ESQUserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the same thing to the user
        raise ESQUserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(ckpt, dict):
        raise ESQUserError(f"{path} is not a checkpoint (expected a dict with a state_dict)")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    if "esq_config" not in ckpt:
        raise ESQUserError(f"{path} was not written by esq-train (no esq_config inside)")
    return ckpt["esq_config"]


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The classifier's weights from a Lightning checkpoint ("model." prefix) or a plain state dict."""
    state = ckpt.get("state_dict", ckpt)
    prefix = "model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # torch.compile saves its wrapped module under _orig_mod.
    return {k.replace("_orig_mod.", ""): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights into model; a checkpoint of another architecture fails with one line naming the file."""
    state = model_state_dict(read_checkpoint(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = (f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected, "
                  f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})")
        raise ESQUserError(f"{path} holds weights of another model than {type(model).__name__}: {detail}")
    model.load_state_dict(state)
