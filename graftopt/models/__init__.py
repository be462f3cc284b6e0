"""Model definitions; importing this package registers the CIFAR networks with timm."""

from graftopt.models.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    CifarMobileNetV2,
    CifarResNet,
    CifarResNetBlock,
    InvertedResidual,
    OptionAShortcut,
    cifar_mobilenetv2,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet56,
    cifar_resnet110,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
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
