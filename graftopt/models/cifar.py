"""CIFAR networks from the filter-grafting experiments, registered as timm models.

Importing this module registers ``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet56``,
``cifar_resnet110`` and ``cifar_mobilenetv2`` with timm, so ``timm.create_model(name, ...)``
builds them. No pretrained weights are published for these networks.

Every convolution is registered directly before the BatchNorm that normalises its output, and
every convolution (and nothing else) has ``conv`` in its parameter names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    is_model,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

__all__ = [
    "CifarMobileNetV2",
    "CifarResNet",
    "CifarResNetBlock",
    "InvertedResidual",
    "OptionAShortcut",
    "cifar_mobilenetv2",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet56",
    "cifar_resnet110",
]

# Normalisation constants of the filter-grafting CIFAR training scripts.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# (expansion t, out channels c, blocks n, first stride s); the 24-channel stage keeps stride 1
# (ImageNet uses 2) so that 32x32 inputs still end at a 4x4 map.
MOBILENETV2_CIFAR_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut (He et al., option A): strided subsampling, zero channel padding."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"option A shortcut cannot reduce channels ({in_chs} -> {out_chs})")
        self.stride = stride
        self.pad_front = (out_chs - in_chs) // 2
        self.pad_back = out_chs - in_chs - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # Slicing from 0 keeps ceil(H / stride) rows, like the padded 3x3 conv on odd sizes.
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class CifarResNetBlock(nn.Module):
    """BasicBlock: 3x3 conv-BN-ReLU, 3x3 conv-BN, add shortcut, ReLU."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.shortcut: nn.Module = (
            OptionAShortcut(in_chs, out_chs, stride)
            if stride != 1 or in_chs != out_chs
            else nn.Identity()
        )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016): 6n+2 layers, three stages, option A shortcuts."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) != 3:
            raise ValueError(f"expected three stage widths, got {tuple(widths)}")
        dd = {"device": device, "dtype": dtype}
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]

        in_chs, reduction = widths[0], 1
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(blocks_per_stage):
                blocks.append(
                    CifarResNetBlock(in_chs, out_chs, stride if block_idx == 0 else 1, **dd)
                )
                in_chs = out_chs
            name = f"layer{stage_idx + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=name))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd
        )
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Kaiming-normal (fan-in) conv and classifier weights, as in the reference CIFAR code."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters into stem and blocks (used by timm's layer decay)."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Toggle activation checkpointing over the residual stages."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """Return the classifier module (or its attribute name)."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0 removes it)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self)
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the unpooled last-stage feature map."""
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, apply dropout, and classify (or return the pooled features)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection.

    The expansion conv is there in every block, ``exp_ratio == 1`` too, as in the network of
    the grafting authors' code (with 100 classes its convolutions hold 17 088 filters, the
    count of the paper's invalid-filter table).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        exp_ratio: int = 6,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        mid_chs = in_chs * exp_ratio
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid_chs, **dd)
        self.act1 = nn.ReLU6(inplace=True)
        self.conv_dw = nn.Conv2d(
            mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False, **dd
        )
        self.bn2 = nn.BatchNorm2d(mid_chs, **dd)
        self.act2 = nn.ReLU6(inplace=True)
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) adapted to 32x32 inputs: stride-1 stem and 24-ch stage."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        stem_chs: int = 32,
        num_features: int = 1280,
        block_cfg: Sequence[tuple[int, int, int, int]] = MOBILENETV2_CIFAR_CFG,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = nn.ReLU6(inplace=True)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="act1")]

        stages = []
        in_chs, reduction = stem_chs, 1
        for stage_idx, (exp_ratio, out_chs, num_blocks, stride) in enumerate(block_cfg):
            reduction *= stride
            blocks = []
            for block_idx in range(num_blocks):
                blocks.append(
                    InvertedResidual(
                        in_chs, out_chs, stride if block_idx == 0 else 1, exp_ratio, **dd
                    )
                )
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(
                dict(num_chs=out_chs, reduction=reduction, module=f"blocks.{stage_idx}")
            )
        self.blocks = nn.Sequential(*stages)

        self.conv_head = nn.Conv2d(in_chs, num_features, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(num_features, **dd)
        self.act2 = nn.ReLU6(inplace=True)
        self.num_features = self.head_hidden_size = num_features
        self.global_pool, self.classifier = create_classifier(
            num_features, num_classes, pool_type=global_pool, **dd
        )
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Standard MobileNetV2 init: Kaiming-normal (fan-out) convs, N(0, 0.01) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into stem and blocks (used by timm's layer decay)."""
        return dict(
            stem=r"^conv_stem|^bn1",
            blocks=[
                (r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)", None),
                (r"^conv_head|^bn2", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Toggle activation checkpointing over the inverted-residual blocks."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """Return the classifier module (or its attribute name)."""
        return "classifier" if name_only else self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0 removes it)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classifier = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self)
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the unpooled 1280-channel feature map after the head conv."""
        x = self.act1(self.bn1(self.conv_stem(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x, flatten=True)
        else:
            x = self.blocks(x)
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, apply dropout, and classify (or return the pooled features)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_M = TypeVar("_M", bound=nn.Module)


def _create(
    model_cls: type[_M],
    variant: str,
    pretrained: bool,
    num_feature_levels: int,
    flatten_sequential: bool,
    **kwargs: Any,
) -> _M:
    if pretrained:
        # The cfgs carry no url / hf_hub_id, so timm would merely warn and keep the random init;
        # fail loudly instead unless the caller supplied local weights.
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        if not (cfg.file or cfg.state_dict):
            raise RuntimeError(
                f"{variant} has no pretrained weights. Use pretrained=False, optionally with "
                "timm.create_model(..., checkpoint_path=...) to load a local checkpoint."
            )
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(
            out_indices=tuple(range(num_feature_levels)), flatten_sequential=flatten_sequential
        ),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "license": "apache-2.0",
        **kwargs,
    }


_RESNET_CFG = dict(pool_size=(8, 8), first_conv="conv1", classifier="fc")
default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet20": _cfg(**_RESNET_CFG),
        "cifar_resnet32": _cfg(**_RESNET_CFG),
        "cifar_resnet56": _cfg(**_RESNET_CFG),
        "cifar_resnet110": _cfg(**_RESNET_CFG),
        "cifar_mobilenetv2": _cfg(
            pool_size=(4, 4), first_conv="conv_stem", classifier="classifier"
        ),
    }
)


def _register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    # Reloading this module must not re-register: timm warns whenever a name is overwritten.
    if not is_model(fn.__name__):
        register_model(fn)
    return fn


def _resnet(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return _create(CifarResNet, variant, pretrained, 4, False, depth=depth, **kwargs)


@_register
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, ~0.27M parameters)."""
    return _resnet("cifar_resnet20", 20, pretrained, **kwargs)


@_register
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, ~0.46M parameters)."""
    return _resnet("cifar_resnet32", 32, pretrained, **kwargs)


@_register
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, ~0.85M parameters)."""
    return _resnet("cifar_resnet56", 56, pretrained, **kwargs)


@_register
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage, ~1.7M parameters)."""
    return _resnet("cifar_resnet110", 110, pretrained, **kwargs)


@_register
def cifar_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 for CIFAR (~2.24M parameters with 10 classes)."""
    return _create(CifarMobileNetV2, "cifar_mobilenetv2", pretrained, 8, True, **kwargs)
