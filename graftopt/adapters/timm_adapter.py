"""The adapter for timm architectures: units from the model's data flow, nothing left out.

Every conv and linear layer (and every other module holding a weight matrix: LSTMs,
embeddings, CondConv) starts a unit. The data flow then decides what joins it:

* the norm that normalizes its output (BatchNormAct2d, LayerNorm2d, the BN of a LeViT
  ``Linear_BN``, the LayerNorm after ConvNeXt's permute), per filter;
* a depthwise conv fed only by it, with that conv's norm: filter ``j`` of the depthwise conv
  processes exactly output channel ``j``, so the pair is scored and blended per filter together
  (a 3x3 depthwise filter alone has 9 values, too few for a meaningful entropy);
* the other branches of a re-parameterizable block (RepVGG, MobileOne): layers and a bare
  identity BN applied to the same input and summed, which fuse into one conv at inference;
* norms that precede a layer (pre-norm transformers): they join the layer they feed, with the
  unit's mean alpha at filter level (their channels are its inputs, not its filters);
* loose parameters (layer-scale gammas, position embeddings, class and register tokens,
  relative-position tables, q/v biases): they join the layer whose data they are added to or
  multiplied with, per filter where one of their axes runs over that layer's filters.

Buffers other than running statistics (index tables, attention masks, fixed sin-cos tables)
never move. Where the model cannot be traced, norms pair by registration order and loose
tensors join the nearest layer registered before them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from .base import Adapter, Unit, tensor_table
from .flow import Flow
from .layers import (
    filter_axis,
    filters_of,
    is_depthwise,
    is_layer,
    is_norm,
    layer_tensors,
    norm_channels,
    norm_tensors,
)

__all__ = ["TimmAdapter"]


def _axis(t: Tensor, filters: int) -> int | None:
    """The axis of a riding tensor that runs over its unit's filters, if one clearly does."""
    if filters <= 1:
        return None
    dims = [i for i, s in enumerate(t.shape) if s == filters]
    if len(dims) == 1:
        return dims[0]
    return t.dim() - 1 if dims and dims[-1] == t.dim() - 1 else None


def _fits(layer: nn.Module, norm: nn.Module) -> bool:
    return norm_channels(norm) == filters_of(layer)


@dataclass
class _Draft:
    """A unit under construction: (tensor name, axis, scored) in insertion order."""

    name: str
    filters: int
    entries: list[tuple[str, int | None, bool]] = field(default_factory=list)
    gamma: str | None = None

    def add(self, name: str, axis: int | None, scored: bool = False) -> None:
        self.entries.append((name, axis, scored))


class TimmAdapter(Adapter):
    """Units from a model's traced data flow; built for timm's families, fine for any model.

    Args:
        chain_depthwise: blend a depthwise conv (and its norm) with the layer that alone
            feeds it, scoring both together (default True).
        merge_branches: one unit per re-parameterizable block (default True).
        trace: use torch.fx data flow; False pairs by registration order only (default True).

    Example::

        opt = GraftOptimizer(SGD(model.parameters(), lr=0.1), peers=[peer], every=390,
                             adapter=TimmAdapter(chain_depthwise=False))
    """

    name = "timm"

    def __init__(
        self, *, chain_depthwise: bool = True, merge_branches: bool = True, trace: bool = True
    ) -> None:
        self.chain_depthwise = chain_depthwise
        self.merge_branches = merge_branches
        self.trace = trace

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(chain_depthwise={self.chain_depthwise}, "
            f"merge_branches={self.merge_branches}, trace={self.trace})"
        )

    def units(self, model: nn.Module) -> list[Unit]:
        return self.build(model)[0]

    def build(self, model: nn.Module) -> tuple[list[Unit], bool]:
        """The units, and whether they came from a trace (False: registration order)."""
        mods = dict(model.named_modules())
        order = {n: i for i, n in enumerate(mods)}
        layers = {n: m for n, m in mods.items() if is_layer(m)}
        norms = {n: m for n, m in mods.items() if is_norm(m) and not _inside(n, layers)}
        flow = Flow.trace(model, layers, norms) if self.trace else None
        table = tensor_table(model)

        pairs = self._pairs(flow, layers, norms, mods)
        host_of = _roots(self._hosts(flow, layers, norms, pairs, order))
        drafts: dict[str, _Draft] = {}
        for name, layer in layers.items():
            if name in host_of:
                continue
            drafts[name] = _Draft(name, filters_of(layer))
        for name, layer in layers.items():
            draft = drafts[host_of.get(name, name)]
            ok_rows = name == draft.name or _rows_of(layer) == _rows_of(layers[draft.name])
            for i, (tname, t) in enumerate(layer_tensors(layer)):
                if i == 0:
                    axis = filter_axis(layer)
                else:  # a layer's own vectors and matrices (LSTM gates) run over rows first
                    axis = 0 if t.dim() and t.shape[0] == filters_of(layer) else None
                draft.add(f"{name}.{tname}", axis if ok_rows else None, i == 0 and ok_rows)
            if name in pairs:
                self._add_norm(draft, pairs[name], norms[pairs[name]], paired=True)
        placed = set(pairs.values())
        for norm, host in host_of.items():
            if norm in norms and norm not in placed:
                self._add_norm(drafts[host], norm, norms[norm], paired=True)
                placed.add(norm)
        for norm, module in norms.items():
            if norm in placed:
                continue
            target = (flow.consumer(norm) or flow.upstream(norm)) if flow else None
            target = target or _nearest(norm, layers, order)
            if target is not None:
                self._add_norm(drafts[host_of.get(target, target)], norm, module, paired=False)
        self._add_loose(model, drafts, host_of, flow, layers, norms, order)

        units = []
        for draft in sorted(drafts.values(), key=lambda d: order[d.name]):
            unit = _finish(draft, table)
            if unit is not None:
                units.append(unit)
        return units, flow is not None

    # -- the steps --------------------------------------------------------------------------

    def _pairs(
        self, flow: Flow | None, layers: dict, norms: dict, mods: dict[str, nn.Module]
    ) -> dict[str, str]:
        """Layer -> the norm consuming its output."""
        pairs: dict[str, str] = {}
        seen: set[str] = set()
        if flow is not None:
            seen = set(flow.calls)
            for norm, module in norms.items():
                src = flow.producer(norm) if norm in seen else None
                if src is not None and src not in pairs and _fits(layers[src], module):
                    pairs[src] = norm
        # What the trace did not see (no trace, or inside an untraced module) pairs by
        # registration order: a layer with the norm registered right after it.
        previous = None
        for name, module in mods.items():
            if name in seen:
                previous = None
            elif name in layers:
                previous = name
            elif name in norms:
                if (
                    previous is not None
                    and previous not in pairs
                    and _fits(layers[previous], module)
                ):
                    pairs[previous] = name
                previous = None
            elif next(module.parameters(recurse=False), None) is not None:
                previous = None
        return pairs

    def _hosts(
        self, flow: Flow | None, layers: dict, norms: dict, pairs: dict, order: dict
    ) -> dict[str, str]:
        """Layer (or bare norm) -> the layer whose unit it joins."""
        host_of: dict[str, str] = {}
        if flow is None:
            return host_of
        if self.merge_branches:
            for group in flow.branches():
                members = sorted(set(group), key=order.__getitem__)
                main = next((n for n in members if n in layers), None)
                if main is None or main in host_of:
                    continue
                for name in members:
                    if name == main or name in host_of:
                        continue
                    module = layers.get(name) or norms[name]
                    same = (
                        _rows_of(module) == filters_of(layers[main])
                        if name in layers
                        else _fits(layers[main], module)
                    )
                    if same and name not in pairs.values():
                        host_of[name] = main
        if self.chain_depthwise:
            fed = set()
            for name, module in layers.items():
                if not is_depthwise(module) or name in host_of:
                    continue
                src = flow.producer(name, through_norms=True, single_use=True)
                src = host_of.get(src, src) if src is not None else None
                if (
                    src is not None
                    and src not in fed
                    and not is_depthwise(layers[src])
                    and filters_of(layers[src]) == module.in_channels
                ):
                    host_of[name] = src
                    fed.add(src)
        return host_of

    def _add_norm(self, draft: _Draft, name: str, norm: nn.Module, paired: bool) -> None:
        fits = paired and norm_channels(norm) == draft.filters
        for tname, _ in norm_tensors(norm):
            draft.add(f"{name}.{tname}", 0 if fits else None)
        if fits and draft.gamma is None and isinstance(getattr(norm, "weight", None), Tensor):
            draft.gamma = f"{name}.weight"

    def _add_loose(
        self,
        model: nn.Module,
        drafts: dict[str, _Draft],
        host_of: dict[str, str],
        flow: Flow | None,
        layers: dict,
        norms: dict,
        order: dict,
    ) -> None:
        """Parameters of no layer and no norm join the layer they act on."""
        owned = set(layers) | set(norms)
        for tname, t in model.named_parameters():
            if not t.is_floating_point():
                continue
            module = tname.rpartition(".")[0]
            if module in owned or _inside(module, owned):
                continue
            target = flow.acted_on(tname) if flow is not None else None
            target = target or _nearest(module or tname, layers, order)
            if target is None:
                continue
            draft = drafts[host_of.get(target, target)]
            draft.add(tname, _axis(t, draft.filters))


def _roots(host_of: dict[str, str]) -> dict[str, str]:
    """Follow joins to the end: a branch joined to a depthwise conv that joined its producer."""
    out = {}
    for name, host in host_of.items():
        seen = {name}
        while host in host_of and host not in seen:
            seen.add(host)
            host = host_of[host]
        out[name] = host
    return out


def _rows_of(layer: nn.Module) -> int:
    weight = layer_tensors(layer)[0][1]
    return weight.shape[filter_axis(layer)]


def _inside(name: str, parents: dict | set) -> bool:
    """Whether module ``name`` lies inside one of ``parents`` (a leaf layer or norm)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in parents for i in range(1, len(parts)))


def _nearest(name: str, layers: dict, order: dict) -> str | None:
    """A layer inside module ``name``, else the last layer registered before it, else the first."""
    prefix = f"{name}."
    inside = [n for n in layers if n.startswith(prefix)]
    if inside:
        return inside[0]
    rank = order.get(name, _order_of_tensor(name, order))
    before = [n for n in layers if order[n] <= rank]
    if before:
        return before[-1]
    return next(iter(layers), None)


def _order_of_tensor(name: str, order: dict) -> int:
    module = name.rpartition(".")[0]
    while module and module not in order:
        module = module.rpartition(".")[0]
    return order.get(module, 0)


def _finish(draft: _Draft, table: dict[str, Tensor]) -> Unit | None:
    """The unit, without tensors the model does not list (weights tied to another layer)."""
    seen, members, axes, scored = set(), [], [], []
    for name, axis, is_scored in draft.entries:
        if name in seen or name not in table:
            continue
        seen.add(name)
        members.append(name)
        axes.append(axis)
        if is_scored:
            scored.append(name)
    if not scored:
        return None
    return Unit(draft.name, tuple(scored), tuple(members), tuple(axes), draft.gamma)
