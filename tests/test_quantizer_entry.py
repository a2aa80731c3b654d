"""Adding a quantizer is one QuantizerSpec: a toy family registered here, with no other edit, passes the config
check, trains, exports to the packed format at its width and reloads to identical logits, gets its letter in the
setting label and its words in the RobustBench footnote and in esq-report's table (as tests/test_attack_spec.py
does for attacks)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from esq_lightning.config.labels import derive_setting
from esq_lightning.config.quantizers import QUANT_BITS, QUANTIZER_SPECS, quant_widths
from esq_lightning.errors import ESQUserError
from esq_lightning.quant import (
    QuantizerSpec,
    draw_selection,
    full_quantization,
    pack_codes,
    quant_layers,
    quantize_model,
    quantizers,
    register_quantizer,
    set_sq_ratio,
    unpack_codes,
    unregister_quantizer,
)
from esq_lightning.quant.registry import get as get_quantizer
from tests.hydra_utils import FAST, compose_config

TOY = "median_sign"


def median_sign_codes(w: Tensor, per_filter: bool = True, bits: int = 1) -> tuple[Tensor, Tensor]:
    """Sign codes (sign(0) = +1) and the median of |W| per row: BWN with a median instead of a mean."""
    rows = w.detach().reshape(w.shape[0], -1) if per_filter else w.detach().reshape(1, -1)
    return torch.where(rows >= 0, 1, -1).to(torch.int8), rows.abs().median(dim=1).values


def toy_spec(name: str = TOY, letter: str = "M", values: Any = lambda bits: (-1, 1)) -> QuantizerSpec:
    return QuantizerSpec(
        name=name,
        widths=(1,),
        letter=letter,
        text="sign weights with a median scale (toy, 1 bit)",
        codes=median_sign_codes,
        code_values=values,
        description="median |W_i| * sign(W_i) per output filter",
    )


@pytest.fixture
def toy() -> Any:
    spec = register_quantizer(toy_spec())
    yield spec
    unregister_quantizer(TOY)


TINY = [
    *FAST,
    "method=natural",
    f"quant.kind={TOY}",
    "quant.bits=1",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "callbacks.pgd.val_every_n_epochs=0",
    "callbacks.quant_ratio.start=1.0",
    "eval.attacks=[fgsm]",
    "eval.n_samples=16",
]


def _header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[8:16])
    return json.loads(zlib.decompress(data[16 : 16 + length]))


def test_a_registered_quantizer_trains_exports_labels_and_reports_without_other_edits(
    toy: QuantizerSpec, tmp_path: Path
) -> None:
    from esq_lightning.artifacts.export import export_checkpoint
    from esq_lightning.artifacts.loading import load_exported, load_trained_model
    from esq_lightning.commands.train import train
    from esq_lightning.evaluation.robustbench import model_info
    from esq_lightning.reporting.report import make_report

    # The config check, the kind resolver and the setting label read the entry.
    assert QUANT_BITS[TOY] == (1,) and derive_setting("esq", TOY, 1, "N") == "NEM"
    results, _ = train(compose_config("train", TINY, tmp_path / "train"))
    assert results["setting"] == "VM"

    # Trained with the toy's math: at ratio 1 every quantized weight is +-median |W_i| of its filter.
    model, config, _, _ = load_trained_model(results["checkpoint"])
    layers = quant_layers(model)
    assert layers and {layer.kind for _, layer in layers} == {TOY} and config["quant"]["kind"] == TOY
    for _, layer in layers:
        w = layer.weight.detach()
        q = layer.quantized_weight().detach().reshape(w.shape[0], -1)
        median = w.reshape(w.shape[0], -1).abs().median(dim=1).values
        torch.testing.assert_close(q.abs(), median.unsqueeze(1).expand_as(q), rtol=0, atol=0)

    # Packed at its width (1 bit a weight, one scale per filter); the reload gives the checkpoint's logits exactly.
    out = tmp_path / "model.esq"
    report = export_checkpoint(results["checkpoint"], out)
    assert report["identical_logits"] is True
    stored = _header(out)["quantized"]
    assert {q["kind"] for q in stored} == {TOY} and {q["bits"] for q in stored} == {1}
    for q in stored:
        numel = int(torch.Size(q["shape"]).numel())
        assert q["codes_bytes"] == -(-numel // 8) and q["alpha_numel"] == q["shape"][0]
    rebuilt, _ = load_exported(out)
    data = config["data"]
    shape = (8, data["in_channels"], data["image_size"], data["image_size"])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), full_quantization(model):
        expected = model.eval()(x)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)

    # The writers: RobustBench's footnote has the entry's words, esq-report's table the label.
    info = model_info({**results, "robust_acc": {"autoattack": 0.5}, "attacks": {"autoattack": {"eps": 0.1}}}, config)
    assert info["footnote"].startswith("sign weights with a median scale (toy, 1 bit): 1-bit weights;")
    table = make_report(tmp_path / "train", out=tmp_path / "report", fmt="md")["markdown"]
    assert "| VM | 1 |" in table


def test_the_toy_quantizer_packs_and_unpacks_its_codes(toy: QuantizerSpec) -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer(TOY, None)
    assert quantizer.name == TOY and quantizer.code_values == (-1, 1) and quantizer in quantizers()
    codes, scale = quantizer.codes(w)
    packed = pack_codes(codes, TOY)
    assert packed.numel() == -(-w.numel() // 8)
    assert torch.equal(unpack_codes(packed, TOY, w.numel()), codes.reshape(-1))
    with pytest.raises(ValueError, match=f"code 0 is not a 1-bit {TOY} code; allowed: -1, 1"):
        pack_codes(torch.zeros(4, dtype=torch.int8), TOY)
    # Per layer: one scale, the median of the whole weight.
    model = quantize_model(nn.Sequential(nn.Linear(4, 3)), TOY, per_filter=False)
    layer = model[0]
    torch.testing.assert_close(layer.quantized_weight().abs().unique(), layer.weight.abs().median().reshape(1))
    # Stochastic Quantization draws on the toy's relative errors: at ratio 0.5, some filters quantized, the rest not.
    model = quantize_model(nn.Sequential(nn.Linear(12, 8)), TOY)
    set_sq_ratio(model, 0.5)
    draw_selection(model, torch.Generator().manual_seed(0))
    layer = model[0]
    mask = layer.sq_mask
    assert mask is not None and 0 < int(mask.sum()) < 8
    torch.testing.assert_close(layer.effective_weight()[mask], layer.quantized_weight()[mask])
    torch.testing.assert_close(layer.effective_weight()[~mask], layer.weight[~mask])


def test_the_config_check_names_a_registered_quantizer_and_forgets_it_after(tmp_path: Path) -> None:
    from esq_lightning.commands.checks import validate_config

    overrides = [*FAST, f"quant.kind={TOY}", "quant.bits=1"]
    register_quantizer(toy_spec())
    try:
        validate_config(compose_config("train", overrides, tmp_path / "a"))
        with pytest.raises(ESQUserError) as err:
            validate_config(compose_config("train", [*FAST, f"quant.kind={TOY}", "quant.bits=2"], tmp_path / "b"))
        assert str(err.value).startswith(f"quant.bits: 2 does not match quant.kind={TOY}; allowed: 1 (")
    finally:
        unregister_quantizer(TOY)
    with pytest.raises(ESQUserError) as err:
        validate_config(compose_config("train", overrides, tmp_path / "c"))
    assert str(err.value) == (f"quant.kind: '{TOY}' is not allowed; allowed: 'bwn', 'twn', 'uniform', 'full'")


def test_registration_is_checked_and_undone() -> None:
    assert TOY not in QUANTIZER_SPECS
    spec = register_quantizer(toy_spec())
    try:
        assert QUANTIZER_SPECS[TOY] is spec and quant_widths() == (1, 2, 3, 4, 5, 6, 7, 8, 32)
        with pytest.raises(ValueError, match=f"quantizer '{TOY}' is already registered"):
            register_quantizer(toy_spec())
        with pytest.raises(ValueError, match="letter 'B' must be letters, not F .* and not taken"):
            register_quantizer(toy_spec("other", letter="B"))
        with pytest.raises(ValueError, match=r"code_values\(1\) must be at most 2 distinct"):
            register_quantizer(toy_spec("other", letter="O", values=lambda bits: (-1, 0, 1)))
        with pytest.raises(ValueError, match="the name must be an identifier other than full, auto"):
            register_quantizer(toy_spec("full", letter="O"))
        with pytest.raises(ValueError, match="'bwn' is built in"):
            unregister_quantizer("bwn")
    finally:
        unregister_quantizer(TOY)
    assert TOY not in QUANTIZER_SPECS and TOY not in QUANT_BITS and "other" not in QUANTIZER_SPECS
    assert derive_setting("esq", TOY, 1, "N") == "NEMEDIAN_SIGN1"  # an unknown kind: its name, as before
    with pytest.raises(ValueError, match=f"unknown quantizer kind '{TOY}'"):
        unregister_quantizer(TOY)
    with pytest.raises(ValueError, match=f"unknown quantizer kind '{TOY}'"):
        get_quantizer(TOY, 1)


def test_the_entries_are_read_without_torch() -> None:
    """Labels, the schema's choices and the writers' words come from the entries before torch is imported."""
    code = (
        "import sys; from esq_lightning.config import schema; from esq_lightning.config.labels import derive_setting; "
        "from esq_lightning.config.quantizers import QUANT_BITS, QUANTIZER_SPECS; "
        "print(derive_setting('esq', 'uniform', 4, 'N'), list(QUANT_BITS), QUANTIZER_SPECS['twn'].text, "
        "'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "NEU4 ['bwn', 'twn', 'uniform', 'full'] ternary weights (TWN, 2 bits) False"
