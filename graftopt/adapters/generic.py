"""The default adapter: every conv and linear layer is a unit, with the norm that consumes it."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .base import Adapter, Unit, qualified
from .flow import Flow
from .layers import CONV, NORMS, norm_channels, norm_tensors

__all__ = ["GenericAdapter", "pair_norms", "unit_for"]


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, CONV) else module.out_features


def _fits(layer: nn.Module, norm: nn.Module) -> bool:
    if isinstance(norm, nn.LayerNorm) and not isinstance(layer, nn.Linear):
        return False  # a LayerNorm after a conv normalizes spatial positions, not its channels
    return norm_channels(norm) == _out_channels(layer)


def _is_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return False
    return isinstance(module, (CONV, nn.Linear))


def _pairs_by_dataflow(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str] | None:
    """Norms whose input is a layer's output, found by torch.fx; None if the model won't trace."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, NORMS)}
    flow = Flow.trace(model, layers, norms)
    if flow is None:
        return None
    pairs: dict[str, str] = {}
    for name, norm in norms.items():
        src = flow.producer(name) if name in flow.calls else None
        if src is not None and src not in pairs and _fits(layers[src], norm):
            pairs[src] = name
    return pairs


def _pairs_by_order(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """A layer paired with the norm registered right after it, when the channels agree."""
    pairs: dict[str, str] = {}
    previous: str | None = None
    for name, module in model.named_modules():
        if name in layers:
            previous = name
        elif isinstance(module, NORMS):
            if previous is not None and _fits(layers[previous], module):
                pairs[previous] = name
            previous = None
        elif next(module.parameters(recurse=False), None) is not None:
            previous = None
    return pairs


def pair_norms(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Map each layer name to the name of the norm that consumes its output."""
    pairs = _pairs_by_dataflow(model, layers)
    return _pairs_by_order(model, layers) if pairs is None else pairs


def unit_for(model: nn.Module, name: str, norm: str | None) -> Unit:
    """The unit of one conv/linear layer: its weight and bias, plus its norm's tensors."""
    module = model.get_submodule(name)
    axis = 1 if getattr(module, "transposed", False) else 0
    members, axes = [qualified(name, "weight")], [axis]
    if getattr(module, "bias", None) is not None:
        members.append(qualified(name, "bias"))
        axes.append(0)
    gamma = None
    if norm is not None:
        nmod = model.get_submodule(norm)
        for t, _ in norm_tensors(nmod):
            members.append(qualified(norm, t))
            axes.append(0)
        if isinstance(getattr(nmod, "weight", None), torch.Tensor):
            gamma = qualified(norm, "weight")
    return Unit(name, (qualified(name, "weight"),), tuple(members), tuple(axes), gamma)


class GenericAdapter(Adapter):
    """Each Conv (1d/2d/3d, grouped, depthwise, transposed) and each Linear is a unit.

    A unit's members are the layer's weight and bias and the tensors of the normalization
    layer that directly consumes its output (found by torch.fx data flow, or by registration
    order when the model does not trace).
    """

    name = "generic"

    def units(self, model: nn.Module) -> list[Unit]:
        layers = {n: m for n, m in model.named_modules() if _is_layer(m)}
        pairs = pair_norms(model, layers)
        return [unit_for(model, name, pairs.get(name)) for name in layers]


def warn_uncovered(model: nn.Module, units: list[Unit]) -> None:
    """Say which floating parameters no unit covers (recurrent and attention weights,
    embeddings, loose parameters): rounds leave them as they are."""
    covered = {n for u in units for n in u.members}
    params = dict(model.named_parameters())
    left = {
        n: p.numel()
        for n, p in params.items()
        if p.is_floating_point() and p.numel() and n not in covered
    }
    if not left:
        return
    total = sum(p.numel() for p in params.values() if p.is_floating_point())
    names = sorted(left, key=lambda n: -left[n])
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    warnings.warn(
        f"the generic adapter grafts the conv and linear layers of {type(model).__name__}: "
        f"{100 * sum(left.values()) / total:.0f} % of its parameters ({shown}) are in no unit "
        "and rounds leave them as they are (docs/adapters.md: register an adapter to graft "
        "them)",
        RuntimeWarning,
        stacklevel=5,
    )
