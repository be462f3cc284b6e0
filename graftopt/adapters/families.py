"""The adapters of timm's model families and of graftopt's CIFAR networks.

Every timm family gets the data-flow :class:`TimmAdapter`; the families differ in what the
trace finds (norms after or before layers, depthwise chains, re-parameterizable branches,
loose tokens and tables), not in code. ``KINDS`` sorts the families for the coverage goals.
"""

from __future__ import annotations

from .registry import register_adapter
from .timm_adapter import TimmAdapter

__all__ = ["KINDS", "CifarAdapter", "kind_of"]

CONV = (
    "byobnet", "cifar", "convmixer", "convnext", "cspnet", "cspnext", "densenet", "dla", "dpn",
    "efficientnet", "fasternet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next",
    "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2", "mambaout", "mobilenetv3",
    "mobilenetv5", "nasnet", "nfnet", "pnasnet", "rdnet", "regnet", "repghost", "repvit",
    "res2net", "resnest", "resnet", "resnetv2", "rexnet", "selecsls", "senet", "sknet",
    "starnet", "tresnet", "vgg", "vovnet", "xception", "xception_aligned",
)  # fmt: skip
TRANSFORMER = (
    "beit", "cait", "coat", "convit", "crossvit", "davit", "deepseek_vit", "deit", "eva",
    "focalnet", "gcvit", "gemma4_vit", "hiera", "hieradet_sam2", "mvitv2", "naflexvit", "nest",
    "pit", "pvt_v2", "qwen3_vit", "swin_transformer", "swin_transformer_v2",
    "swin_transformer_v2_cr", "tnt", "twins", "vision_transformer", "vision_transformer_relpos",
    "vision_transformer_sam", "volo", "xcit",
)  # fmt: skip
HYBRID = (
    "byoanet", "cpubone", "csatv2", "edgenext", "efficientformer", "efficientformer_v2",
    "efficientvim", "efficientvit_mit", "efficientvit_msra", "fastvit", "iformer", "levit",
    "lowformer", "maxxvit", "metaformer", "mobilevit", "nextvit", "shvit", "swiftformer",
    "tiny_vit", "visformer", "vision_transformer_hybrid", "vitamin",
)  # fmt: skip
MLP = ("mlp_mixer", "sequencer")

KINDS: dict[str, str] = {
    **dict.fromkeys(CONV, "conv"),
    **dict.fromkeys(TRANSFORMER, "transformer"),
    **dict.fromkeys(HYBRID, "hybrid"),
    **dict.fromkeys(MLP, "mlp"),
}


def kind_of(family: str | None) -> str:
    """``conv``, ``transformer``, ``hybrid``, ``mlp``, or ``other`` for an unsorted family."""
    return KINDS.get(family or "", "other")


register_adapter(*(f for f in KINDS if f != "cifar"))(TimmAdapter)


@register_adapter("cifar")
class CifarAdapter(TimmAdapter):
    """The paper's CIFAR networks: every conv keeps its own unit, as in the authors' code.

    The depthwise convs of the CIFAR MobileNetV2 are not chained to their expansion convs,
    so that layer-level grafting gives each conv its own alpha, as the published results did.
    Pass ``TimmAdapter()`` as the adapter to score them per filter with their producer.
    """

    def __init__(self) -> None:
        super().__init__(chain_depthwise=False)
