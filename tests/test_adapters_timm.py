"""timm families, built small on CPU: units, norm pairing, riding tensors, and a graft round."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)
from graftopt import GraftOptimizer
from graftopt.adapters import Unit, get_adapter
from graftopt.adapters.base import tensor_table
from graftopt.adapters.coverage import check_units
from graftopt.adapters.registry import _timm_family

SWIN = dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2))
# model, small kwargs, {unit name: {member: its filter axis}}; one model per family.
CASES: list[tuple[str, dict, dict[str, dict[str, int | None]]]] = [
    ("resnet18", {}, {
        "conv1": {"bn1.weight": 0, "bn1.running_var": 0},
        "layer2.0.downsample.0": {"layer2.0.downsample.1.weight": 0},
    }),
    ("efficientnet_b0", {}, {
        "blocks.1.0.conv_pw": {
            "blocks.1.0.bn1.weight": 0, "blocks.1.0.conv_dw.weight": 0, "blocks.1.0.bn2.bias": 0,
        },
        "blocks.1.0.conv_pwl": {"blocks.1.0.bn3.weight": 0},
    }),
    ("mobilenetv3_small_050", {}, {"blocks.1.0.conv_pw": {"blocks.1.0.conv_dw.weight": 0}}),
    ("convnext_atto", {}, {
        "stages.0.blocks.0.conv_dw": {"stages.0.blocks.0.norm.weight": 0},
        "stages.0.blocks.0.mlp.fc2": {"stages.0.blocks.0.gamma": 0},
        "stages.1.downsample.1": {"stages.1.downsample.0.weight": None},
    }),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, init_values=1e-5), {
        "patch_embed.proj": {"pos_embed": 2, "cls_token": 2},
        "blocks.0.attn.qkv": {"blocks.0.norm1.weight": None},
        "blocks.0.attn.proj": {"blocks.0.ls1.gamma": 0},
        "blocks.0.mlp.fc1": {"blocks.0.norm2.bias": None},
        "head": {"norm.weight": None},
    }),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=1), {
        "patch_embed.proj": {"dist_token": 2, "pos_embed": 2},
    }),
    ("swin_tiny_patch4_window7_224", SWIN, {
        "layers.0.blocks.1.attn.qkv": {"layers.0.blocks.1.attn.relative_position_bias_table": None},
    }),
    ("beit_base_patch16_224", dict(img_size=32, depth=1, embed_dim=64, num_heads=2), {
        "blocks.0.attn.qkv": {"blocks.0.attn.q_bias": None, "blocks.0.attn.v_bias": None},
        "blocks.0.attn.proj": {"blocks.0.gamma_1": 0},
    }),
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=1), {
        "blocks.0.attn.qkv": {"blocks.0.norm1.weight": None, "blocks.0.attn.q_bias": None},
    }),
    ("cait_xxs24_224", dict(img_size=32, depth=1, depth_token_only=1), {
        "blocks_token_only.0.attn.k": {"blocks_token_only.0.norm1.weight": None},
        "blocks_token_only.0.attn.proj": {"blocks_token_only.0.gamma_1": 0},
    }),
    ("xcit_nano_12_p16_224", dict(img_size=32, depth=1), {
        "blocks.0.attn.qkv": {"blocks.0.attn.temperature": None},
    }),
    ("repvgg_a0", {}, {
        "stages.1.1.conv_kxk.conv": {
            "stages.1.1.conv_1x1.conv.weight": 0, "stages.1.1.identity.weight": 0,
        },
    }),
    ("fastvit_t8", {}, {
        "stages.0.blocks.0.token_mixer.mixer.conv_kxk.0.conv": {
            "stages.0.blocks.0.token_mixer.mixer.conv_scale.conv.weight": 0,
            "stages.0.blocks.0.token_mixer.mixer.identity.weight": 0,
            "stages.0.blocks.0.token_mixer.norm.identity.weight": 0,
            "stages.0.blocks.0.token_mixer.layer_scale.gamma": 0,
        },
    }),
    ("levit_128s", {}, {
        "stages.0.blocks.0.attn.qkv.linear": {
            "stages.0.blocks.0.attn.qkv.bn.weight": 0,
            "stages.0.blocks.0.attn.attention_biases": None,
        },
    }),
    ("resmlp_12_224", dict(img_size=32), {
        "blocks.0.linear_tokens": {"blocks.0.ls1": None},
        "blocks.0.mlp_channels.fc2": {"blocks.0.ls2": 0},
    }),
    ("sequencer2d_s", dict(layers=(1, 1, 1, 1)), {
        "stages.0.blocks.0.rnn_tokens.rnn_v": {
            "stages.0.blocks.0.rnn_tokens.rnn_v.weight_hh_l0": 0,
            "stages.0.blocks.0.rnn_tokens.rnn_v.weight_ih_l0_reverse": 0,
        },
    }),
    ("regnetx_002", {}, {"stem.conv": {"stem.bn.weight": 0}}),
    ("dla46_c", {}, {"base_layer.0": {"base_layer.1.weight": 0}}),
    ("nf_regnet_b0", {}, {"stem.conv": {"stem.conv.gain": 0}}),
    ("ghostnet_050", {}, {}),
    ("hgnetv2_b0", {}, {}),
    ("rexnet_100", {}, {}),
    ("mobilevit_xxs", {}, {}),
    ("tiny_vit_5m_224", {}, {}),
    ("edgenext_xx_small", {}, {}),
    ("repvit_m0_9", {}, {}),
    ("legacy_seresnet18", {}, {"layer0.conv1": {"layer0.bn1.weight": 0}}),
    ("cs3darknet_focus_s", {}, {}),
    ("dpn48b", {}, {}),
    ("cifar_resnet20", {}, {"conv1": {"bn1.weight": 0}}),
    ("cifar_mobilenetv2", {}, {
        "blocks.1.0.conv_pw": {"blocks.1.0.bn1.weight": 0},
        "blocks.1.0.conv_dw": {"blocks.1.0.bn2.weight": 0},
    }),
]  # fmt: skip


def _build(name: str, kwargs: dict) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    peer = copy.deepcopy(model)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p))
    return model, peer


def test_cases_span_enough_families() -> None:
    families = {_timm_family(name) for name, _, _ in CASES}
    assert None not in families and len(families) >= 25, families


@pytest.mark.parametrize(("name", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_family_units_and_graft(name: str, kwargs: dict, expected: dict) -> None:
    model, peer = _build(name, kwargs)
    units = get_adapter(model).units(model)
    check_units(model, units)
    by_name = {u.name: u for u in units}
    for unit, members in expected.items():
        assert unit in by_name, f"{unit} is not a unit of {name}"
        for member, axis in members.items():
            assert member in by_name[unit].members, f"{member} not in unit {unit}"
            assert by_name[unit].axis_of(member) == axis, (unit, member)

    # Every floating parameter is blended; every other tensor stays as it was.
    params = {n for n, p in model.named_parameters() if p.is_floating_point()}
    members = {n for u in units for n in u.members}
    assert params <= members, sorted(params - members)[:5]
    before = {n: t.detach().clone() for n, t in tensor_table(model).items()}
    opt = GraftOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), [peer], every=1, model=model)
    opt.step()
    after = tensor_table(model)
    for n, t in after.items():
        if n not in members:
            assert torch.equal(t, before[n]), f"{n} moved but belongs to no unit"
    first = units[0].scored[0]
    assert not torch.equal(after[first], before[first])
    assert all(torch.isfinite(after[n]).all() for n in members)


def test_prenorm_is_not_paired_with_the_layer_before_it() -> None:
    model, _ = _build("vit_tiny_patch16_224", dict(img_size=32, depth=2))
    units = {u.name: u for u in get_adapter(model).units(model)}
    # proj's output is added to the residual stream; norm2 normalizes that sum.
    assert not any("norm" in m for m in units["blocks.0.attn.proj"].members)
    assert units["blocks.0.attn.proj"].gamma is None


def test_swin_attention_mask_does_not_move() -> None:
    model, peer = _build("swin_tiny_patch4_window7_224", SWIN)
    masks = {n: b.clone() for n, b in model.named_buffers() if n.endswith("attn_mask")}
    assert masks
    GraftOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), [peer], every=1).step()
    for n, b in model.named_buffers():
        if n in masks:
            assert torch.equal(b, masks[n])


def _conv_filters(units: list[Unit], model: nn.Module) -> int:
    mods = dict(model.named_modules())
    return sum(mods[u.name].out_channels for u in units if isinstance(mods[u.name], nn.Conv2d))


@pytest.mark.parametrize(
    ("name", "convs", "params"),
    [
        ("cifar_resnet20", 19, 0.27e6),
        ("cifar_resnet32", 31, 0.46e6),
        ("cifar_resnet56", 55, 0.85e6),
        ("cifar_resnet110", 109, 1.7e6),
    ],
)
def test_cifar_resnets_units(name: str, convs: int, params: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=10)
    units = get_adapter(model).units(model)
    assert len(units) == convs + 1  # every conv, and the classifier
    assert units[-1].name == "fc"
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - params) / params < 0.03
    if name == "cifar_resnet32":
        assert _conv_filters(units, model) == 1136


def test_cifar_mobilenetv2_keeps_each_conv_its_own_unit() -> None:
    with torch.device("meta"):
        model = timm.create_model("cifar_mobilenetv2", pretrained=False, num_classes=10, in_chans=1)
    units = get_adapter(model).units(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [u.name for u in units] == [*convs, "classifier"]
    assert all(len(u.scored) == 1 for u in units)
