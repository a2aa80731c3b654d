"""Tests of the model zoo: shapes, named residual modules in forward order, normalization, configs."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from esq_lightning.models import (
    MODELS,
    Normalize,
    SmallCNN,
    WideResNet,
    build_model,
    residual_module_by_index,
)

EXPECTED_RESIDUAL_COUNTS = {
    "small_cnn": 3,
    "resnet20": 9,
    "resnet56": 27,
    "preact_resnet18": 8,
    "wrn28_10": 12,
    "resnet152": 50,
}


@pytest.fixture(scope="module")
def full_models() -> dict[str, nn.Module]:
    """Every registry model at its real size (construction is cheap; forwards use small inputs)."""
    torch.manual_seed(0)
    return {name: ctor().eval() for name, ctor in MODELS.items()}


def _input_for(model: nn.Module, n: int = 2, size: int = 8) -> torch.Tensor:
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return torch.rand(n, stem.in_channels, size, size)


@pytest.mark.parametrize(
    "builder, in_channels, size, num_classes",
    [
        (lambda: SmallCNN(num_classes=10), 1, 8, 10),
        (lambda: SmallCNN(num_classes=7, in_channels=3, mean=0.5, std=0.25, width=8), 3, 16, 7),
        (lambda: MODELS["resnet20"](num_classes=10), 3, 8, 10),
        (lambda: MODELS["resnet56"](num_classes=100), 3, 16, 100),
        (lambda: MODELS["preact_resnet18"](num_classes=10), 3, 8, 10),
        (lambda: WideResNet(depth=10, widen_factor=2, dropout=0.3, num_classes=10), 3, 8, 10),
        (lambda: MODELS["resnet152"](num_classes=100), 3, 8, 100),
        (lambda: MODELS["resnet20"](in_channels=1, mean=[0.3], std=[0.4]), 1, 8, 10),
    ],
    ids=[
        "small_cnn",
        "small_cnn_rgb16",
        "resnet20",
        "resnet56_c100",
        "preact18",
        "wrn10_2",
        "resnet152",
        "resnet20_grey",
    ],
)
def test_forward_gives_logits(builder, in_channels: int, size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = builder()
    x = torch.rand(3, in_channels, size, size)
    model.train()
    out_train = model(x)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == out_train.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_stem_conv_first_classifier_last(full_models, name: str) -> None:
    """Quantization keeps 'first conv / last linear' by registration order: they must be stem and fc."""
    model = full_models[name]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert convs[0][1].in_channels == (1 if name == "small_cnn" else 3)
    assert convs[0][0] in ("conv1", "block1.0")
    assert linears[-1][0] == "fc" and linears[-1][1] is model.fc
    assert type(model.fc) is nn.Linear and type(convs[0][1]) is nn.Conv2d
    assert next(iter(model.children())) is model.normalize


@pytest.mark.parametrize("name", list(MODELS))
def test_residual_modules_counted_named_and_in_forward_order(full_models, name: str) -> None:
    model = full_models[name]
    names = model.residual_module_names()
    assert len(names) == EXPECTED_RESIDUAL_COUNTS[name]
    modules = dict(model.named_modules())
    assert all(n in modules for n in names)

    calls: list[str] = []
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    snapshots: dict[str, torch.Tensor] = {}

    def record_output(name: str):
        def hook(module, args, output) -> None:
            calls.append(name)
            outputs[name] = output

        return hook

    def record_input(name: str):
        def hook(module, args) -> None:
            inputs[name] = args[0]

        return hook

    def snapshot(module, args, output) -> None:
        snapshots.update({k: v.clone() for k, v in outputs.items()})

    handles = [modules[n].register_forward_hook(record_output(n)) for n in names]
    handles += [modules[n].register_forward_pre_hook(record_input(n)) for n in names]
    handles.append(model.fc.register_forward_hook(snapshot))
    try:
        with torch.no_grad():
            model(_input_for(model))
    finally:
        for h in handles:
            h.remove()
    assert calls == names
    # Hooked outputs are not modified in place later in the forward (D_l reads them after it).
    for n in names:
        assert torch.equal(outputs[n], snapshots[n])
    # Consecutive residual modules are chained directly: the output measured is what the next one sees.
    for a, b in zip(names, names[1:]):
        if a.split(".")[0] == b.split(".")[0]:
            assert inputs[b] is outputs[a]


@pytest.mark.parametrize("name", ["resnet20", "resnet152"])
def test_post_activation_blocks_output_after_relu(full_models, name: str) -> None:
    """For post-activation ResNets the measured output is taken after add and ReLU."""
    model = full_models[name]
    modules = dict(model.named_modules())
    outs: list[torch.Tensor] = []
    hs = [modules[n].register_forward_hook(lambda m, i, o: outs.append(o)) for n in model.residual_module_names()]
    try:
        with torch.no_grad():
            model(_input_for(model))
    finally:
        for h in hs:
            h.remove()
    assert all((o >= 0).all() for o in outs)
    assert any((o == 0).any() for o in outs)


def test_residual_module_by_index_resnet152(full_models) -> None:
    model = full_models["resnet152"]
    # The paper's "ResNet modules 4, 12 and 48" of ResNet-152: first blocks of stages 2, 3 and 4.
    assert [residual_module_by_index(model, i) for i in (4, 12, 48)] == ["layer2.0", "layer3.0", "layer4.0"]
    assert residual_module_by_index(model, 3, one_based=False) == "layer2.0"
    assert residual_module_by_index(model, 1) == "layer1.0"
    assert residual_module_by_index(model, 50) == "layer4.2"
    with pytest.raises(IndexError, match="out of range"):
        residual_module_by_index(model, 0)
    with pytest.raises(IndexError):
        residual_module_by_index(model, 51)
    with pytest.raises(TypeError):
        residual_module_by_index(nn.Linear(2, 2), 1)


def test_normalize_module() -> None:
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25, x[:, 2] / 2.0], 1)
    torch.testing.assert_close(norm(x), expected)
    assert dict(norm.named_buffers()).keys() == {"mean", "std"}
    torch.testing.assert_close(Normalize(0.5, 2.0)(x), (x - 0.5) / 2.0)  # one value broadcasts
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.5], [0.0])


def test_normalization_is_applied_inside_the_model() -> None:
    torch.manual_seed(0)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]
    model = MODELS["resnet20"](mean=mean, std=std).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
        model.normalize = nn.Identity()
        out_pre = model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(out, out_pre)
    with pytest.raises(ValueError, match="in_channels=1"):
        MODELS["resnet20"](in_channels=1, mean=mean, std=std)


def test_input_gradients_flow(full_models) -> None:
    """Attacks need non-zero input gradients through normalization and every block."""
    model = full_models["resnet20"]
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def composed():
    """Compose `+data=<d> +model=<m>` from the installed config package (no primary config needed)."""
    with initialize_config_module(config_module="esq_lightning.conf", version_base="1.3"):
        yield lambda data, model: compose(overrides=[f"+data={data}", f"+model={model}"])


@pytest.mark.parametrize(
    "data, model, overrides",
    [
        ("digits", "small_cnn", {}),
        ("cifar10", "resnet20", {}),
        ("cifar10", "resnet56", {}),
        ("cifar10", "preact_resnet18", {}),
        ("cifar10", "wrn28_10", {"depth": 10, "widen_factor": 1}),
        ("cifar100", "resnet152", {"num_blocks": [1, 1, 1, 1], "width": 8}),
    ],
)
def test_model_configs_build(composed, data: str, model: str, overrides: dict) -> None:
    cfg = composed(data, model)
    assert cfg.model.name == model
    for k, v in overrides.items():  # shrink only the big ones; their full-size defaults are built above
        cfg.model[k] = v
    net = build_model(cfg.model)
    assert net.fc.out_features == cfg.data.num_classes
    torch.testing.assert_close(net.normalize.mean.flatten(), torch.tensor(list(cfg.data.mean)))
    torch.testing.assert_close(net.normalize.std.flatten(), torch.tensor(list(cfg.data.std)))
    x = torch.rand(2, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, cfg.data.num_classes)


def test_full_size_model_configs_match_registry(composed) -> None:
    """The config files describe the registry's architectures (compared by parameter names and counts)."""
    for data, model in [("cifar10", "wrn28_10"), ("cifar100", "resnet152"), ("cifar10", "preact_resnet18")]:
        cfg = composed(data, model)
        with torch.device("meta"):  # structure only: skip allocating and initializing 36-58 M weights
            built = build_model(cfg.model)
            ref = MODELS[model](
                num_classes=cfg.data.num_classes,
                in_channels=cfg.data.in_channels,
                mean=list(cfg.data.mean),
                std=list(cfg.data.std),
            )
        assert [n for n, _ in built.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in ref.parameters())


def test_build_model_from_plain_dict_and_by_name() -> None:
    net = build_model({"name": "small_cnn", "_target_": "esq_lightning.models.SmallCNN", "width": 4})
    assert isinstance(net, SmallCNN) and net.block1[0].out_channels == 4
    net = build_model({"name": "resnet20", "num_classes": 5})
    assert net.fc.out_features == 5 and len(net.residual_module_names()) == 9
    with pytest.raises(KeyError, match="not one of"):
        build_model({"name": "vgg"})


def test_parameter_counts_match_the_literature(full_models) -> None:
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in full_models.items()}
    assert 0.26e6 < counts["resnet20"] < 0.28e6
    assert 0.84e6 < counts["resnet56"] < 0.87e6
    assert 11.1e6 < counts["preact_resnet18"] < 11.3e6
    assert 36.4e6 < counts["wrn28_10"] < 36.6e6
    assert 58.1e6 < counts["resnet152"] < 58.5e6
