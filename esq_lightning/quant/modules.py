"""Quantized Conv2d/Linear layers with Stochastic Quantization, and model-level helpers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import act_quantize, relative_error
from .masks import pruned_weight
from .registry import Quantizer, get, resolve_kind
from .selection import SELECTION_FUNCTIONS, VARIANTS, sample_selection

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "QuantMixin",
    "StraightThroughQuantize",
    "quantize_model",
    "quant_layers",
    "set_sq_ratio",
    "get_sq_ratio",
    "draw_selection",
    "clear_selection",
    "full_quantization",
    "frozen_quant_weights",
    "selection_state",
    "ActQuant",
    "ACT_ALPHA_INIT",
    "quantize_activations",
    "act_quant_layers",
    "calibrate_act_quant",
    "ACT_CALIBRATION_QUANTILE",
]


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


class StraightThroughQuantize(torch.autograd.Function):
    """Forward: exactly quantizer(w, per_filter, mask); backward: the gradient at Q, unchanged, to W."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, quantizer: Quantizer, per_filter: bool, mask: Tensor | None = None) -> Tensor:
        return quantizer(w, per_filter, mask)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


class QuantMixin:
    """State and weight selection shared by QuantConv2d and QuantLinear."""

    weight: nn.Parameter
    sq_mask: Tensor | None

    def __init__(
        self,
        *args: Any,
        kind: str = "bwn",
        per_filter: bool = True,
        sq_variant: str = "paper",
        sq_f: str = "linear",
        bits: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Cooperative: the next class in the MRO is the torch layer (nn.Conv2d or nn.Linear).
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._init_quant(kind, per_filter, sq_variant, sq_f, bits=bits)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_repr()  # type: ignore[misc]

    def _init_quant(
        self,
        kind: str = "bwn",
        per_filter: bool = True,
        sq_variant: str = "paper",
        sq_f: str = "linear",
        sq_name: str = "",
        bits: int | None = None,
    ) -> None:
        quantizer = get(kind, bits)
        _check_choice("SQ variant", sq_variant, VARIANTS)
        _check_choice("SQ selection function f", sq_f, SELECTION_FUNCTIONS)
        # The registry's quantizer does the math; kind and bits are kept for export and repr.
        self.quantizer = quantizer
        self.kind = quantizer.kind
        self.bits = quantizer.bits
        self.per_filter = bool(per_filter)
        self.sq_variant = sq_variant
        self.sq_f = sq_f
        self.sq_name = sq_name
        self._sq_ratio = 1.0
        # Set only inside frozen_quant_weights(): the effective weight computed once for many forwards.
        self._frozen_weight: Tensor | None = None
        # Non-persistent buffer: follows .to(device) but never enters the state_dict, so
        # checkpoints of quantized and full-precision models share their keys.
        self.register_buffer("sq_mask", None, persistent=False)

    @property
    def sq_ratio(self) -> float:
        """Fraction of output filters that use the quantized weights (1 = whole layer)."""
        return self._sq_ratio

    @sq_ratio.setter
    def sq_ratio(self, ratio: float) -> None:
        ratio = float(ratio)
        if math.isnan(ratio):
            raise ValueError("SQ ratio is NaN")
        # A mask drawn for another ratio has the wrong number of quantized filters.
        if ratio != self._sq_ratio:
            self.sq_mask = None
        self._sq_ratio = ratio

    def quantized_weight(self, source: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """Q (all filters), differentiable with the straight-through estimator.

        A pruned layer (quant/masks.py) quantizes its pruned weight over the kept entries only.
        """
        w, keep = pruned_weight(self) if source is None else source
        if keep is None:
            return StraightThroughQuantize.apply(w, self.quantizer, self.per_filter)
        return StraightThroughQuantize.apply(w, self.quantizer, self.per_filter, keep)

    def effective_weight(self) -> Tensor:
        """The weight this forward uses: Q, W, or Q on the drawn filters and W elsewhere."""
        frozen = self.__dict__.get("_frozen_weight")
        # The cache carries no graph: it only serves forwards that need no weight gradient.
        if frozen is not None and not (self.weight.requires_grad and torch.is_grad_enabled()):
            return frozen
        ratio = self._sq_ratio
        source = pruned_weight(self)
        if ratio >= 1:
            return self.quantized_weight(source)
        if ratio <= 0:
            return source[0]
        mask = self.sq_mask
        if mask is None:
            name = self.sq_name or type(self).__name__
            raise RuntimeError(
                f"SQ ratio r < 1 but no selection drawn for layer {name}: "
                f"call draw_selection(model, generator) once per training step (r = {ratio:g})"
            )
        mask = mask.reshape((-1,) + (1,) * (self.weight.dim() - 1))
        return torch.where(mask, self.quantized_weight(source), source[0])

    @torch.no_grad()
    def relative_error(self) -> Tensor:
        """Per-filter relative error of the current weights (a pruned layer: of its kept weights only)."""
        w, keep = pruned_weight(self)
        return relative_error(w, self.quantizer(w, self.per_filter, keep))

    def _quant_repr(self) -> str:
        return (
            f"kind={self.kind}, bits={self.bits}, per_filter={self.per_filter}, sq_ratio={self._sq_ratio:g}, "
            f"sq_variant={self.sq_variant}, sq_f={self.sq_f}"
        )


class QuantConv2d(QuantMixin, nn.Conv2d):
    """nn.Conv2d whose forward uses quantized (BWN/TWN/k-bit) weights (state_dict identical to nn.Conv2d)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.effective_weight(), self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    """nn.Linear whose forward uses quantized (BWN/TWN/k-bit) weights (state_dict identical to nn.Linear)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.effective_weight(), self.bias)


_QUANT_OF: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
_PLAIN_OF: dict[type, type] = {QuantConv2d: nn.Conv2d, QuantLinear: nn.Linear}
_QUANT_ATTRS = (
    "quantizer",
    "kind",
    "bits",
    "per_filter",
    "sq_variant",
    "sq_f",
    "sq_name",
    "_sq_ratio",
    "_frozen_weight",
)


def _to_plain(layer: nn.Module) -> None:
    layer.__class__ = _PLAIN_OF[type(layer)]
    for attr in _QUANT_ATTRS:
        layer.__dict__.pop(attr, None)
    layer._buffers.pop("sq_mask", None)
    layer._non_persistent_buffers_set.discard("sq_mask")


# The defaults serve the Python API; for runs, conf/quant/*.yaml is their source (artifacts/loading.py passes every key).
def quantize_model(
    model: nn.Module,
    kind: str,
    per_filter: bool = True,
    keep_first_last: bool = False,
    variant: str = "paper",
    f: str = "linear",
    bits: int | None = None,
    layer_bits: dict[str, int] | None = None,
) -> nn.Module:
    """Turn every nn.Conv2d / nn.Linear of ``model`` into its Quant version, in place.

    ``layer_bits`` (mixed precision): {qualified layer name: bits} overrides ``bits`` for those layers, each
    with the default family of its width (1 bwn, 2 twn, 3-8 uniform, 32 full precision); a name that is not
    a Conv2d / Linear of the model is a ValueError.

    ``kind`` and ``bits`` name the quantizer (registry.resolve_kind: kind "auto" takes the
    default family of ``bits``; bits None the family's only width).

    The layer object keeps its identity (its class is swapped), so parameters, hooks, device,
    dtype, other attributes and any optimizer holding the parameters stay valid. kind "full"
    returns the model unchanged. keep_first_last keeps the first Conv2d and the last Linear (in
    registration order) in full precision. Calling it again reconfigures every layer (ratio 1).
    """
    kind, bits = resolve_kind(kind, bits)
    _check_choice("SQ variant", variant, VARIANTS)
    _check_choice("SQ selection function f", f, SELECTION_FUNCTIONS)
    named = list(model.named_modules())
    per_layer = {str(k): resolve_kind("auto", int(v)) for k, v in (layer_bits or {}).items()}
    layers = {name for name, m in named if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = sorted(set(per_layer) - layers)
    if unknown:
        raise ValueError(
            f"layer_bits names {', '.join(unknown)}: not a Conv2d/Linear of the model; "
            f"allowed: {', '.join(n for n, m in named if n in layers)}"
        )
    if kind == "full" and not per_layer:
        return model
    keep: set[int] = set()
    if keep_first_last:
        convs = [m for _, m in named if isinstance(m, nn.Conv2d)]
        linears = [m for _, m in named if isinstance(m, nn.Linear)]
        keep = {id(m) for m in convs[:1] + linears[-1:]}
    for name, module in named:
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        layer_kind, layer_b = per_layer.get(name, (kind, bits))
        if layer_kind == "full" or (id(module) in keep and name not in per_layer):
            if type(module) in _PLAIN_OF:
                _to_plain(module)
            continue
        if type(module) in _QUANT_OF:
            module.__class__ = _QUANT_OF[type(module)]
        if type(module) in _PLAIN_OF:
            # A re-quantized layer starts afresh: ratio 1, no mask.
            module._init_quant(layer_kind, per_filter, variant, f, name, bits=layer_b)
    return model


def quant_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """(qualified name, layer) of every quantized layer (QuantConv2d/QuantLinear), in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantMixin)]


def set_sq_ratio(model: nn.Module, ratio: float) -> None:
    """Set the SQ ratio of every quantized layer (a changed ratio clears the drawn masks)."""
    for _, layer in quant_layers(model):
        layer.sq_ratio = ratio


def get_sq_ratio(model: nn.Module) -> float | None:
    """The common SQ ratio of the quantized layers; None without any; ValueError if they differ."""
    ratios = {layer.sq_ratio for _, layer in quant_layers(model)}
    if not ratios:
        return None
    if len(ratios) > 1:
        raise ValueError(f"quantized layers have different SQ ratios: {sorted(ratios)}")
    return ratios.pop()


@torch.no_grad()
def draw_selection(model: nn.Module, generator: torch.Generator | None) -> None:
    """Draw this step's filter selection of every layer with 0 < ratio < 1, in quant_layers order.

    Each draw uses the layer's current relative errors; layers at ratio 1 or 0 draw nothing, so
    they consume no random numbers. All layers' errors travel to the generator's device in one
    copy and all masks come back in one copy: with the training step's CPU generator and CUDA
    weights that is two host syncs per step instead of two per layer, with the same draws as
    layer by layer.
    """
    drawing = []
    for _, layer in quant_layers(model):
        ratio = layer.sq_ratio
        if ratio >= 1 or ratio <= 0:
            layer.sq_mask = None
        else:
            drawing.append(layer)
    if not drawing:
        return
    errs = [layer.relative_error() for layer in drawing]
    if len({e.device for e in errs}) > 1:  # a model spread over devices: layer by layer
        for layer, err in zip(drawing, errs):
            layer.sq_mask = sample_selection(err, layer.sq_ratio, generator, layer.sq_variant, layer.sq_f)
        return
    draw_device = generator.device if generator is not None else errs[0].device
    # float64 holds every float32/16 value exactly, so the concatenation changes no error and no draw.
    flat = torch.cat([e.reshape(-1).to(torch.float64) for e in errs]).to(draw_device)
    sizes = [e.numel() for e in errs]
    masks = [
        sample_selection(err, layer.sq_ratio, generator, layer.sq_variant, layer.sq_f)
        for layer, err in zip(drawing, flat.split(sizes))
    ]
    target = errs[0].device
    packed = torch.cat(masks)
    if target.type == "cuda":
        # Pinned memory lets the copy run without waiting for the device (the allocator keeps it alive).
        packed = packed.pin_memory()
    for layer, mask in zip(drawing, packed.to(target, non_blocking=target.type == "cuda").split(sizes)):
        layer.sq_mask = mask


@contextmanager
def frozen_quant_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every quantized layer reuses its effective weight, computed once on entry.

    For attacks: many forward passes on weights that cannot change (frozen parameters, fixed
    selection) and no weight gradient, so quantizing on every pass is wasted work. The cached
    weight is exactly what effective_weight() returns, so results are identical. Do not update the
    weights, the ratio or the selection inside the block.
    """
    layers = [layer for _, layer in quant_layers(model)]
    saved = [layer.__dict__.get("_frozen_weight") for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer._frozen_weight = None
                layer._frozen_weight = layer.effective_weight()
        yield model
    finally:
        for layer, previous in zip(layers, saved):
            layer._frozen_weight = previous


def clear_selection(model: nn.Module) -> None:
    """Forget the drawn masks of every quantized layer."""
    for _, layer in quant_layers(model):
        layer.sq_mask = None


def selection_state(model: nn.Module) -> dict[str, Tensor | None]:
    """Drawn mask (or None) per quantized layer name, for debugging and logging."""
    return {name: layer.sq_mask for name, layer in quant_layers(model)}


@contextmanager
def full_quantization(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block at ratio 1 (evaluation, export); restores ratios and drawn masks after."""
    saved = [(layer, layer.sq_ratio, layer.sq_mask) for _, layer in quant_layers(model)]
    try:
        for layer, _, _ in saved:
            layer.sq_ratio = 1.0
        yield model
    finally:
        for layer, ratio, mask in saved:
            layer.sq_ratio = ratio
            layer.sq_mask = mask


# PACT's clipping range: 6 (ReLU6's range) until calibrate_act_quant sets it from data; then it is learned.
ACT_ALPHA_INIT = 6.0
# Calibration clips the top 0.1% of a layer's inputs: the max would spend the few levels of 2-4 bits on outliers.
ACT_CALIBRATION_QUANTILE = 0.999


class ActQuant(nn.Module):
    """k-bit unsigned activations with a learned clipping range alpha (PACT, Choi et al. 2018): see act_quantize."""

    def __init__(self, bits: int, alpha: float = ACT_ALPHA_INIT) -> None:
        super().__init__()
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"activation bits {bits!r}; allowed: 1..8 (32 = no activation quantization)")
        self.bits = int(bits)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return act_quantize(x, self.alpha.to(x.dtype), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Forward pre-hook: the layer's input (a ReLU output) is quantized before the layer sees it.
    return (module.act_quant(args[0]), *args[1:])


def quantize_activations(model: nn.Module, bits: int, keep_first_last: bool = False) -> nn.Module:
    """Quantize the input of every nn.Conv2d / nn.Linear except the first conv to ``bits`` unsigned bits, in place.

    In every model of esq_lightning.models the input of each conv and linear layer but the stem is
    a ReLU output (directly, or through pooling / dropout / an identity shortcut), whether the ReLU
    is an nn.ReLU module (SmallCNN) or F.relu in a forward (the ResNets): quantizing at the layer's
    input is therefore "after the ReLU" for all of them, with no change to the model code. The stem
    sees the normalized image (signed) and stays unquantized; keep_first_last also leaves the last
    linear layer's input in full precision. Each layer gets a child `act_quant` (an ActQuant with its
    own alpha, so the state_dict gains `<layer>.act_quant.alpha`) and a forward pre-hook. bits >= 32
    changes nothing.
    """
    if int(bits) >= 32:
        return model
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    skip = {id(m) for m in convs[:1]}
    if keep_first_last:
        skip |= {id(m) for m in linears[-1:]}
    for layer in layers:
        if id(layer) in skip or "act_quant" in layer._modules:
            continue
        layer.act_quant = ActQuant(bits)
        layer.register_forward_pre_hook(_quantize_input)
    return model


def act_quant_layers(model: nn.Module) -> list[tuple[str, ActQuant]]:
    """(qualified name, ActQuant) of every activation quantizer, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate_act_quant(model: nn.Module, x: Tensor, quantile: float = ACT_CALIBRATION_QUANTILE) -> dict[str, float]:
    """Set every ActQuant's alpha to the ``quantile`` of its (unquantized) input on the batch ``x``; returns them.

    Without it a fixed alpha can round a whole layer's small activations to 0 at 2 bits (a dead
    network at the first step). The forward runs in eval mode (BatchNorm running statistics, no
    statistic update) at the layers' current SQ state, and the layers are calibrated in order, each
    seeing the quantized activations of the ones before it. Use the same batch on every rank (e.g. the
    first samples of the unshuffled training split), so data-parallel replicas start identical.
    """
    found = act_quant_layers(model)
    if not found:
        return {}
    was_training = model.training
    model.eval()
    alphas: dict[str, float] = {}
    try:
        for name, aq in found:
            seen: list[Tensor] = []
            handle = aq.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0].detach()))
            try:
                with full_quantization(model):
                    model(x)
            finally:
                handle.remove()
            flat = seen[0].reshape(-1).float()
            k = max(1, min(flat.numel(), math.ceil(quantile * flat.numel())))
            value = float(flat.kthvalue(k).values)
            # An all-zero input (a dead layer) keeps a positive range, so the scale stays finite.
            aq.alpha.fill_(value if value > 0 else float(flat.max().clamp_min(1e-3)))
            alphas[name] = float(aq.alpha)
    finally:
        model.train(was_training)
    return alphas
