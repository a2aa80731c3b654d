"""The one place that builds a classifier from a run's config and loads a trained one.

`build_network` turns the `model` and `quant` groups of a config into the network esq-train trains (the
architecture of esq_lightning.models, its weights quantized as `quant` says, the activation quantizers of
quant.act_bits < 32). `load_trained_model` gives back a trained classifier, from a checkpoint of esq-train
or from a packed file of esq-export, with the training config it carries and where it came from. Training,
every esq-eval mode, esq-export, the Python API and the config checks (phase 2) use these two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

from omegaconf import DictConfig
from torch import nn

from esq_lightning.artifacts.checkpoint import checkpoint_config, load_model_weights, read_checkpoint
from esq_lightning.compress.mixed import resolve_layer_bits
from esq_lightning.compress.pruning import add_pruning
from esq_lightning.errors import ESQUserError
from esq_lightning.models import build_model
from esq_lightning.quant import load_packed, quantize_activations, quantize_model

# The first bytes of a file written by esq-export, whatever its suffix.
PACKED_MAGIC = b"ESQPACK\x00"


def build_network(
    cfg_model: DictConfig | dict,
    cfg_quant: DictConfig | dict | None = None,
    *,
    weights: bool = True,
    activations: bool = True,
    cfg_prune: DictConfig | dict | None = None,
) -> nn.Module:
    """The classifier of a run: the architecture, quantized as `quant` says (nothing for quant=full), with the
    bits of each layer (quant.layer_bits, quant.first_last_bits) and the pruning structure of `cfg_prune`
    (all-keep masks, HYDRA's frozen scores: a checkpoint's masks load into them; a new run prunes with
    compress.pruning.init_pruning, docs/compression.md).

    weights=False leaves the weights in full precision (a packed file's dequantized weights);
    activations=False leaves out the activation quantizers (quant.act_bits), for loading a start
    (init_from) that has none before they are added with add_act_quant. Without `cfg_quant`, the plain
    architecture.
    """
    model = build_model(cfg_model)
    if cfg_quant is None:
        return model
    if weights:
        q = dict(cfg_quant)
        # Every key is set by conf/quant/*.yaml (the one place of their defaults) and checked by the schema.
        model = quantize_model(
            model,
            q["kind"],
            per_filter=q["per_filter"],
            keep_first_last=q["keep_first_last"],
            variant=q["variant"],
            f=q["f"],
            bits=q["bits"],
            layer_bits=resolve_layer_bits(model, q),
        )
        model = add_pruning(model, str((cfg_prune or {}).get("method") or "none"))
    return add_act_quant(model, cfg_quant) if activations else model


def add_act_quant(model: nn.Module, cfg_quant: DictConfig | dict) -> nn.Module:
    """quant.act_bits < 32: k-bit unsigned activations after the ReLUs (quant.modules.quantize_activations)."""
    q = dict(cfg_quant)
    return quantize_activations(model, int(q.get("act_bits", 32)), keep_first_last=q.get("keep_first_last", False))


def _build_from_meta(meta: dict[str, Any]) -> nn.Module:
    # The plain architecture, plus the activation quantizers when the run had them (quant.act_bits < 32).
    return build_network(meta["model"], meta.get("quant") or {}, weights=False)


def is_packed_file(path: str | Path) -> bool:
    """True for a file written by esq-export (its signature), whatever its suffix."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(PACKED_MAGIC)) == PACKED_MAGIC
    except OSError:
        return False


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A plain (unquantized-code) model holding the exact dequantized weights, and the run metadata."""
    model, meta = load_packed(path, _build_from_meta)
    model.eval()
    return model, meta


def load_packed_for_eval(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The rebuilt model of a packed file and the training config it carries (data, model, eval defaults)."""
    try:
        model, meta = load_exported(path)
    except ValueError as exc:
        raise ESQUserError(f"ckpt_path: {exc}") from None
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ESQUserError(
            f"ckpt_path: {path} carries no training config (written by an older esq-export); "
            f"export it again from its checkpoint: esq-export ckpt_path={meta.get('source_checkpoint')}"
        )
    return model, config


class TrainedModel(NamedTuple):
    """A trained classifier (eval mode), the training config of its run, and the file it was read from."""

    model: nn.Module
    config: dict[str, Any]
    source: str
    kind: Literal["checkpoint", "packed"]


def load_trained_model(path: str | Path) -> TrainedModel:
    """The classifier of a checkpoint written by esq-train (quantized layers and all), and its run config.

    A packed file of esq-export (model.esq) gives its rebuilt model (the dequantized weights, no quantization
    code) and the training config it carries, so every mode evaluates the file as shipped.
    """
    if is_packed_file(path):
        model, config = load_packed_for_eval(path)
        return TrainedModel(model, config, str(path), "packed")
    ckpt = read_checkpoint(path)
    train_config = checkpoint_config(ckpt, path)
    model = build_network(train_config["model"], train_config["quant"], cfg_prune=train_config.get("prune"))
    load_model_weights(model, path)
    model.eval()
    return TrainedModel(model, train_config, str(path), "checkpoint")
