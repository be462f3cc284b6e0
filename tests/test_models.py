"""Tests for the CIFAR networks registered with timm."""

from __future__ import annotations

import importlib
import warnings

import pytest
import timm
import torch
from torch import nn

import graftopt.models
import graftopt.models.cifar

NAMES = [
    "cifar_mobilenetv2",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet56",
    "cifar_resnet110",
]

# Exact counts with 10 classes; the published figures are 2.24M and 0.27M / 0.46M / 0.85M /
# 1.7M for the ResNets (the MobileNetV2's first block keeps its 32x32 expansion conv, 1 088
# parameters more than torchvision's).
PARAM_COUNTS = {
    "cifar_mobilenetv2": 2_237_770,
    "cifar_resnet20": 269_722,
    "cifar_resnet32": 464_154,
    "cifar_resnet56": 853_018,
    "cifar_resnet110": 1_727_962,
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered() -> None:
    assert timm.list_models("cifar_*") == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_shapes(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, in_chans=in_chans).eval()
    assert model.num_classes == 10
    with torch.no_grad():
        for size in (28, 32):
            out = model(torch.randn(2, in_chans, size, size))
            assert out.shape == (2, 10)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_param_counts(name: str) -> None:
    model = timm.create_model(name, num_classes=10)
    assert _num_params(model) == PARAM_COUNTS[name]


def test_resnet32_filter_count() -> None:
    model = timm.create_model("cifar_resnet32", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.out_channels for m in convs) == 1136
    # Option A shortcuts are parameter-free: 1 stem conv + 2 per block.
    assert len(convs) == 1 + 2 * 15


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_mobilenetv2"])
def test_conv_bn_pairing(name: str) -> None:
    model = timm.create_model(name)
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    for conv, bn in zip(mods[::2], mods[1::2], strict=True):
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert bn.num_features == conv.out_channels
    # Only conv weights carry "conv" in their names (the reference grafting code relies on it).
    conv_keys = {k for k in model.state_dict() if "conv" in k}
    conv_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert conv_keys == conv_weights


def test_resnet_layout() -> None:
    model = timm.create_model("cifar_resnet20")
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2)
    assert _num_params(block.shortcut) == 0
    assert model.fc.in_features == 64


def test_mobilenetv2_has_the_papers_filter_count() -> None:
    with torch.device("meta"):
        model = timm.create_model("cifar_mobilenetv2", num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.out_channels for m in convs) == 17_088  # the paper's invalid-filter table
    assert len(convs) == 53


def test_mobilenetv2_layout() -> None:
    model = timm.create_model("cifar_mobilenetv2")
    assert model.conv_stem.stride == (1, 1)
    assert model.conv_stem.out_channels == 32
    # The 24-channel stage keeps stride 1 on CIFAR.
    assert model.blocks[1][0].conv_dw.stride == (1, 1)
    assert model.blocks[2][0].conv_dw.stride == (2, 2)
    assert model.conv_head.out_channels == 1280
    # t = 1 keeps its expansion conv, as in the authors' network.
    assert isinstance(model.blocks[0][0].conv_pw, nn.Conv2d)
    assert model.blocks[0][0].conv_pw.out_channels == 32
    feats = model.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 1280, 4, 4)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_mobilenetv2"])
def test_head_interface(name: str) -> None:
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.get_classifier() is getattr(model, model.get_classifier(name_only=True))
    assert model.default_cfg is model.pretrained_cfg
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["num_classes"] == 10
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert feats.shape == (2, model.num_features)

        model.reset_classifier(7)
        assert model.num_classes == 7
        assert model.get_classifier().out_features == 7
        assert model(x).shape == (2, 7)

        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


def test_features_only() -> None:
    model = timm.create_model("cifar_resnet20", features_only=True, in_chans=1)
    outs = model(torch.randn(1, 1, 28, 28))
    assert [o.shape[1:] for o in outs] == [(16, 28, 28), (16, 28, 28), (32, 14, 14), (64, 7, 7)]


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_raises(name: str) -> None:
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_pretrained_from_local_state_dict() -> None:
    src = timm.create_model("cifar_resnet20")
    model = timm.create_model(
        "cifar_resnet20", pretrained=True, pretrained_cfg_overlay=dict(state_dict=src.state_dict())
    )
    assert torch.equal(model.conv1.weight, src.conv1.weight)


def test_repeat_registration_is_noop() -> None:
    # What a module reload would do; timm itself warns when a name is overwritten.
    importlib.import_module("graftopt.models")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn = graftopt.models.cifar._register(graftopt.models.cifar_resnet20)
    assert fn is graftopt.models.cifar_resnet20
    assert timm.list_models("cifar_*") == NAMES
    assert timm.create_model("cifar_resnet20").num_classes == 10


def test_package_exports() -> None:
    for name in graftopt.models.__all__:
        assert hasattr(graftopt.models, name)
    assert set(NAMES) <= set(graftopt.models.__all__)
