"""What counts as a layer or a normalization, and which of their tensors a unit blends."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = [
    "filters_of",
    "is_depthwise",
    "is_layer",
    "is_norm",
    "layer_tensors",
    "norm_channels",
    "norm_tensors",
]

CONV = nn.modules.conv._ConvNd
NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
# Leaf modules whose weights are not named ``weight`` but that hold a layer's filters.
_WEIGHTED = (nn.RNNBase, nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)
# Running statistics move with their norm; num_batches_tracked is a counter, not a weight.
_STATS = ("running_mean", "running_var")


def _own_floats(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]


def is_norm(module: nn.Module) -> bool:
    """torch's norms, and norm-like modules (timm's RmsNorm, EvoNorm, ...) with 1-d scales."""
    if isinstance(module, NORMS):
        return True
    if "norm" not in type(module).__name__.lower() or isinstance(module, (CONV, nn.Linear)):
        return False
    own = _own_floats(module)
    children = any(True for c in module.children() if next(c.parameters(), None) is not None)
    # A module called "...Norm" that holds matrices or sub-layers is a block, not a norm.
    return bool(own) and not children and all(p.dim() == 1 for _, p in own)


def is_layer(module: nn.Module) -> bool:
    """Conv, Linear, recurrent and embedding layers, and other modules holding a weight matrix."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return False
    if isinstance(module, (CONV, nn.Linear, *_WEIGHTED)):
        return True
    weight = module._parameters.get("weight")
    return isinstance(weight, Tensor) and weight.dim() >= 2 and not is_norm(module)


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every filter sees one input channel, one filter per channel."""
    return (
        isinstance(module, CONV)
        and not module.transposed
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def filters_of(module: nn.Module) -> int:
    """How many filters (output channels or rows) a layer has."""
    if isinstance(module, CONV):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return layer_tensors(module)[0][1].shape[0]


def layer_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """A layer's own floating parameters, its filter matrix first."""
    own = _own_floats(module)
    if isinstance(module, (CONV, nn.Linear)) or "weight" in dict(own):
        first = "weight"
    else:
        first = next((n for n, p in own if p.dim() >= 2), own[0][0] if own else "")
    return sorted(own, key=lambda item: item[0] != first)


def filter_axis(module: nn.Module) -> int:
    """The axis of a layer's weight that runs over its filters."""
    return 1 if getattr(module, "transposed", False) else 0


def norm_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """A norm's floating parameters (all of them: it is a leaf) and running statistics."""
    out = [(n, p) for n, p in module.named_parameters() if p.is_floating_point()]
    for name in _STATS:
        value = module._buffers.get(name)
        if isinstance(value, Tensor) and value.is_floating_point():
            out.append((name, value))
    return out


def norm_channels(module: nn.Module) -> int | None:
    """How many channels a norm scales, or None where that is not one axis."""
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        return shape[0] if len(shape) == 1 else None
    if isinstance(module, nn.LocalResponseNorm):
        return None
    num = getattr(module, "num_features", None)
    if isinstance(num, int):
        return num
    sizes = {t.numel() for _, t in norm_tensors(module)}
    return sizes.pop() if len(sizes) == 1 else None
