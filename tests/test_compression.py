"""Robust pruning, mixed precision per layer and the packed bytes of every method (docs/compression.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.commands.checks import validate_config
from esq_lightning.compress.mixed import allocate_bits, resolve_layer_bits
from esq_lightning.compress.pruning import add_pruning, init_pruning, prunable_layers, set_score_phase, sparsity_report
from esq_lightning.errors import ESQUserError
from esq_lightning.models.small_cnn import SmallCNN
from esq_lightning.quant import (
    draw_selection,
    export_packed,
    full_quantization,
    load_packed,
    quant_layers,
    quantize_model,
    sample_selection,
    set_sq_ratio,
)
from esq_lightning.quant.masks import MASK, SCORES, pruned_weight
from esq_lightning.quant.packing import packed_size
from esq_lightning.training.objectives import Objective
from tests.hydra_utils import compose_config

WIDTH = 8


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(width=WIDTH)


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def fgsm_attack(model: nn.Module, eps: float = 0.2):
    def attack(x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> torch.Tensor:
        xa = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        return (x + eps * g.sign()).clamp(0, 1).detach()

    return attack


def pruned(
    kind: str | None,
    method: str,
    sparsity: float = 0.7,
    scope: str = "layer",
    bits: int | None = None,
    layer_bits: dict[str, int] | None = None,
) -> nn.Module:
    model = net()
    if kind is not None:
        quantize_model(model, kind, bits=bits, layer_bits=layer_bits)
    add_pruning(model, method)
    if method != "none":
        init_pruning(
            model, {"method": method, "sparsity": sparsity, "scope": scope, "score_epochs": 1, "budget_bytes": None}
        )
    return model


def train_steps(model: nn.Module, method: str = "adversarial", steps: int = 3) -> None:
    objective = Objective(name=method)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = batch()
    model.train()
    for step in range(steps):
        draw_selection(model, torch.Generator().manual_seed(step))
        opt.zero_grad()
        objective(model, x, y, fgsm_attack(model)).loss.backward()
        opt.step()


def pruned_entries_zero(model: nn.Module) -> bool:
    return all(bool((layer.weight[~layer._buffers[MASK]] == 0).all()) for _, layer in prunable_layers(model))


@pytest.mark.parametrize(
    ("kind", "bits", "method"), [(None, None, "magnitude"), ("bwn", None, "hydra"), ("uniform", 4, "magnitude")]
)
def test_pruned_weights_stay_zero_through_training_export_and_reload(tmp_path: Path, kind, bits, method) -> None:
    model = pruned(kind, method, bits=bits)
    if method == "hydra":
        set_score_phase(model, True)
        train_steps(model)
        set_score_phase(model, False)
    assert pruned_entries_zero(model)
    set_sq_ratio(model, 0.5)
    train_steps(model, "esq")
    assert pruned_entries_zero(model)
    for _, layer in prunable_layers(model):
        assert bool((pruned_weight(layer)[0][~layer._buffers[MASK]] == 0).all())
    report = export_packed(model, tmp_path / "m.esq")
    rebuilt, _ = load_packed(tmp_path / "m.esq", lambda meta: SmallCNN(width=WIDTH))
    x, _ = batch(8, seed=5)
    with torch.no_grad(), full_quantization(model):
        expected = model.eval()(x)
    assert torch.equal(rebuilt(x), expected)
    for (_, layer), (_, plain) in zip(prunable_layers(model), prunable_layers(rebuilt)):
        assert bool((plain.weight[~layer._buffers[MASK]] == 0).all())
    assert report["payload_bytes"] == packed_size(model)["model_bytes"]


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparsity_is_what_was_asked_per_layer_or_globally(sparsity: float) -> None:
    model = pruned(None, "magnitude", sparsity)
    rep = sparsity_report(model)
    for name, layer in prunable_layers(model):
        n = layer.weight.numel()
        assert rep["layers"][name]["kept"] == n - round(sparsity * n)
        # magnitude: what is kept are the largest |W| of the start
        kept = layer.weight[layer._buffers[MASK]].abs()
        if kept.numel() < n:
            assert float(kept.detach().min()) >= float(
                net().state_dict()[f"{name}.weight"].abs()[~layer._buffers[MASK]].max()
            )
    glob = sparsity_report(pruned(None, "magnitude", sparsity, scope="global"))
    # one ranking over all layers; a layer it would empty keeps its single largest weight
    extra = glob["kept"] - (glob["total"] - round(sparsity * glob["total"]))
    assert 0 <= extra <= sum(1 for v in glob["layers"].values() if v["kept"] == 1)
    per = [v["sparsity"] for v in glob["layers"].values()]
    assert max(per) - min(per) > 0.01  # one global ranking: layers differ


@pytest.mark.parametrize("method", ["adversarial", "esq", "trades"])
def test_hydra_scores_receive_gradients_from_the_robust_objective_with_weights_frozen(method: str) -> None:
    model = pruned("bwn", "hydra", 0.8)
    set_score_phase(model, True)
    set_sq_ratio(model, 1.0)
    objective = Objective(name=method, trades_beta=6.0 if method == "trades" else None)
    x, y = batch()
    objective(model, x, y, fgsm_attack(model)).loss.backward()
    for name, layer in prunable_layers(model):
        grad = layer._parameters[SCORES].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
        assert layer.weight.grad is None
    before = {n: layer._buffers[MASK].clone() for n, layer in prunable_layers(model)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    opt.step()
    set_score_phase(model, False)
    changed = sum(int((layer._buffers[MASK] != before[n]).sum()) for n, layer in prunable_layers(model))
    kept = {n: int(layer._buffers[MASK].sum()) for n, layer in prunable_layers(model)}
    assert changed > 0 and kept == {n: int(m.sum()) for n, m in before.items()}


def test_sq_on_a_pruned_layer_never_selects_by_pruned_weights() -> None:
    model = pruned("twn", "magnitude", 0.6)
    layer = dict(quant_layers(model))["block2.0"]
    mask = layer._buffers[MASK]
    err = layer.relative_error()
    codes, alpha = layer.quantizer.codes(layer.weight, True, mask)
    with torch.no_grad():  # garbage where the weights are pruned: nothing may depend on it
        layer.weight[~mask] = torch.randn(int((~mask).sum())) * 100
    assert torch.equal(layer.relative_error(), err)
    codes2, alpha2 = layer.quantizer.codes(layer.weight, True, mask)
    assert torch.equal(codes, codes2) and torch.equal(alpha, alpha2)
    assert bool((codes.reshape(layer.weight.shape)[~mask] == 0).all())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_selection(err, 0.5, g1), sample_selection(layer.relative_error(), 0.5, g2))
    # the scale is the kept weights' alone: BWN alpha = mean |W| over kept
    bwn = pruned("bwn", "magnitude", 0.6)
    lay = dict(quant_layers(bwn))["block2.0"]
    m = lay._buffers[MASK]
    _, a = lay.quantizer.codes(lay.weight, True, m)
    rows, keep = lay.weight.detach().reshape(lay.weight.shape[0], -1), m.reshape(m.shape[0], -1)
    assert torch.allclose(a, (rows.abs() * keep).sum(1) / keep.sum(1))


def test_mixed_precision_allocation_respects_the_budget_and_is_reproducible() -> None:
    model = net()
    x, y = batch(64, seed=2)
    full = packed_size(quantize_model(net(), "full", layer_bits={n: 1 for n, _ in prunable_layers(net())}))
    budget = full["model_bytes"] + 1500
    a = allocate_bits(model, x, y, 0.2, [1, 2, 4, 8], budget)
    b = allocate_bits(net(), x, y, 0.2, [1, 2, 4, 8], budget)
    assert a == b
    assert a["model_bytes"] <= budget and set(a["layer_bits"]) == {n for n, _ in prunable_layers(model)}
    built = quantize_model(net(), "bwn", layer_bits=a["layer_bits"])
    assert packed_size(built)["model_bytes"] == a["model_bytes"] <= budget
    assert max(a["layer_bits"].values()) > 1  # the budget above all-1-bit was spent
    with pytest.raises(ValueError, match="budget_bytes=100 "):
        allocate_bits(net(), x, y, 0.2, [1, 2], 100)


def test_layer_bits_mapping_and_first_last_rule() -> None:
    model = net()
    bits = resolve_layer_bits(model, {"first_last_bits": 8, "layer_bits": {"block2.0": 2}})
    assert bits == {"block1.0": 8, "fc": 8, "block2.0": 2}
    quantize_model(model, "bwn", layer_bits=bits)
    assert {n: layer.bits for n, layer in quant_layers(model)} == {"block1.0": 8, "block2.0": 2, "block3.0": 1, "fc": 8}
    with pytest.raises(ValueError, match="block9: not a Conv2d/Linear"):
        resolve_layer_bits(model, {"layer_bits": {"block9": 4}})


@pytest.mark.parametrize(
    "case", ["uniform1", "uniform4", "mixed", "magnitude_fp", "hydra_bwn", "twn_global", "full_first_last8"]
)
def test_model_bytes_equals_the_exported_payload_for_every_method(tmp_path: Path, case: str) -> None:
    model = {
        "uniform1": lambda: pruned("bwn", "none"),
        "uniform4": lambda: pruned("uniform", "none", bits=4),
        "mixed": lambda: pruned("bwn", "none", layer_bits={"block1.0": 8, "fc": 32, "block3.0": 2}),
        "magnitude_fp": lambda: pruned(None, "magnitude", 0.9),
        "hydra_bwn": lambda: pruned("bwn", "hydra", 0.8),
        "twn_global": lambda: pruned("twn", "magnitude", 0.5, scope="global"),
        "full_first_last8": lambda: pruned("full", "none", layer_bits={"block1.0": 8, "fc": 8}),
    }[case]()
    report = export_packed(model, tmp_path / "m.esq", {"note": "x" * 100})
    assert packed_size(model)["model_bytes"] == report["payload_bytes"]
    assert report["file_bytes"] - report["payload_bytes"] < 1200  # the header only
    rebuilt, _ = load_packed(tmp_path / "m.esq", lambda meta: SmallCNN(width=WIDTH))
    x, _ = batch(4)
    with torch.no_grad(), full_quantization(model):
        assert torch.equal(rebuilt(x), model.eval()(x))


def test_pruning_shrinks_the_payload_honestly() -> None:
    dense = packed_size(net())["model_bytes"]
    sparse = packed_size(pruned(None, "magnitude", 0.9))["model_bytes"]
    weights = sum(layer.weight.numel() for _, layer in prunable_layers(net()))
    # float32 kept weights plus one bit per weight for the mask
    assert sparse < dense - 4 * weights * 0.9 + weights / 8 + 8 * 8


def test_older_format_versions_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from esq_lightning.quant import packing

    model = pruned("bwn", "none")
    monkeypatch.setattr(packing, "FORMAT_VERSION", 2)
    export_packed(model, tmp_path / "v2.esq")
    monkeypatch.undo()
    rebuilt, _ = load_packed(tmp_path / "v2.esq", lambda meta: SmallCNN(width=WIDTH))
    x, _ = batch(4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["prune=magnitude", "prune.sparsity=1.5"], "prune.sparsity: 1.5 is out of range"),
        (["prune=magnitude", "prune.budget_bytes=20000"], "prune.sparsity: 0.8 with budget_bytes=20000"),
        (["prune=hydra", "prune.score_epochs=30"], "prune.score_epochs: 30 leaves no epoch"),
        (
            ["quant.layer_bits={block9: 4}"],
            "quant.layer_bits names block9: not a Conv2d/Linear of the model; allowed: "
            "block1.0, block2.0, block3.0, fc",
        ),
        (["quant.layer_bits={fc: 9}"], "quant.layer_bits.fc: 9 is not allowed"),
        (["quant.budget_bytes=20000", "quant.first_last_bits=8"], "quant.budget_bytes: 20000 allocates"),
        (["prune=magnitude", "quant.budget_bytes=20000"], "quant.budget_bytes: 20000 with prune.method=magnitude"),
        (
            ["experiment=digits/compress", "compress=mixed", "budget=5"],
            "budget: 5 has no value in this compression preset; allowed: 0..2",
        ),
    ],
)
def test_compression_config_errors_are_one_line(tmp_path: Path, overrides: list[str], expected: str) -> None:
    cfg = compose_config("train", overrides, tmp_path)
    with pytest.raises(ESQUserError) as info:
        validate_config(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_esq_train_hydra_with_sq_from_a_start_then_export_reloads(tmp_path: Path) -> None:
    """A tiny front preset from a full-precision start (init_from): scores then fine-tune in one run, results.json
    as asked, the export's payload = model_bytes, the checkpoint rebuilds with its masks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = [
        "threads=1",
        "trainer.limit_train_batches=2",
        "eval.n_samples=16",
        "callbacks.pgd.steps=1",
        "callbacks.pgd.val_n_samples=16",
        "trainer.enable_progress_bar=false",
        "eval.attacks=[fgsm]",
        "logger=none",
        f"paths.runs_root={tmp_path}",
    ]

    def train(args: list[str], run: Path) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "esq_lightning.cli.train", *args, *tiny, f"hydra.run.dir={run}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((run / "results.json").read_text())

    start = train(["quant=full", "method=natural", "trainer.max_epochs=1"], tmp_path / "start")
    res = train(
        [
            "experiment=digits/compress",
            "compress=hydra_u4",
            "budget=1",
            f"init_from={start['checkpoint']}",
            "prune.score_epochs=1",
            "trainer.max_epochs=2",
        ],
        tmp_path / "run",
    )
    comp = res["compression"]
    assert res["setting"] == "NEU4-PH" and comp["preset"] == "hydra_u4" and comp["budget"] == 1
    assert comp["prune"]["budget_bytes"] == 30000 and res["model_bytes"] <= 30000
    assert set(comp["sparsity"]["layers"]) == {"block1.0", "block2.0", "block3.0", "fc"}
    assert all(abs(v["sparsity"] - comp["prune"]["sparsity"]) < 0.01 for v in comp["sparsity"]["layers"].values())
    from esq_lightning.artifacts.export import export_checkpoint
    from esq_lightning.artifacts.loading import load_trained_model

    report = export_checkpoint(res["checkpoint"], tmp_path / "m.esq")
    assert report["identical_logits"] and report["payload_bytes"] == res["model_bytes"]
    model = load_trained_model(res["checkpoint"]).model
    assert sparsity_report(model)["kept"] == comp["sparsity"]["kept"]
