"""A model's real data flow, from a torch.fx trace of a weightless copy of it.

The trace answers the questions an adapter asks: which layer produced the tensor a norm
normalizes, which layer consumes a norm's output, which layer a loose parameter (a layer-scale
gamma, a position embedding, a relative-position table) acts on.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterable

import torch
from torch import fx, nn

from .layers import is_layer, is_norm

__all__ = ["Flow"]

_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
_SHAPE_METHODS = {"size", "dim", "numel", "type_as", "new_zeros", "new_ones", "new_empty"}
# Sums and differences: re-parameterizable blocks fuse either (FastViT's mixer(x) - norm(x)).
_ADDS = (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub)
# Walks give up after this many nodes: a far-away layer is not a meaningful owner.
_MAX_WALK = 400


def _timm_leaves() -> tuple[set[type], tuple]:
    try:
        from timm.layers import _fx
    except ImportError:  # timm is optional for plain models
        return set(), ()
    return set(_fx.get_notrace_modules()), tuple(_fx.get_notrace_functions())


class _Tracer(fx.Tracer):
    """Keeps layers, norms and timm's no-trace modules as single nodes."""

    def __init__(self, leaves: set[type], autowrap: tuple) -> None:
        super().__init__(autowrap_functions=tuple(f for f in autowrap if callable(f)))
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_layer(m) or is_norm(m) or type(m) in self._leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors live on the meta device (no memory, no weights).

    Tracing the copy keeps the real model untouched: some modules cache tensors in plain
    attributes during forward, and a trace would leave proxies there.
    """
    memo: dict[int, object] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class Flow:
    """The traced graph of a model, with walks between its layers, norms and loose tensors.

    Args:
        graph: the fx graph of the model.
        layers: qualified names of the model's layers (conv, linear, ...).
        norms: qualified names of its normalization layers.
        tensor_owner: qualified tensor name -> layer name, for every layer's own tensors
            (a layer applied functionally, ``F.linear(x, self.qkv.weight, bias)``, shows up
            as a ``get_attr`` of its weight, not as a module call).
        weighted: names of the modules that hold parameters of their own.
    """

    def __init__(
        self,
        graph: fx.Graph,
        layers: Iterable[str],
        norms: Iterable[str],
        tensor_owner: dict[str, str],
        weighted: set[str],
    ) -> None:
        self.graph = graph
        self._layers, self._norms = set(layers), set(norms)
        self._owner = tensor_owner
        self._weighted = weighted
        self._shape: dict[fx.Node, bool] = {}
        self.calls: dict[str, fx.Node] = {}
        for node in graph.nodes:
            name = self.layer_of(node) or (node.target if self.is_norm_call(node) else None)
            if name is not None and name not in self.calls:
                self.calls[name] = node
        self.attrs: dict[str, fx.Node] = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                self.attrs.setdefault(str(node.target), node)

    @classmethod
    def trace(cls, model: nn.Module, layers: Iterable[str], norms: Iterable[str]) -> Flow | None:
        """Trace ``model``; None when it cannot be copied or traced (callers fall back)."""
        layers = list(layers)
        leaves, autowrap = _timm_leaves()
        try:
            skeleton = _skeleton(model)
            graph = _Tracer(leaves, autowrap).trace(skeleton)
        except Exception:
            return None
        owner = {}
        for name in layers:
            for tname, _ in model.get_submodule(name).named_parameters(prefix=name):
                owner[tname] = name
        weighted = {n for n, m in model.named_modules() if next(m.parameters(), None) is not None}
        return cls(graph, layers, norms, owner, weighted)

    # -- node classification ------------------------------------------------------------

    def layer_of(self, node: fx.Node) -> str | None:
        """The layer a node applies, or None."""
        if node.op == "call_module":
            return node.target if node.target in self._layers else None
        if node.op in ("call_function", "call_method"):
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and str(arg.target) in self._owner:
                    return self._owner[str(arg.target)]
        return None

    def is_norm_call(self, node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in self._norms

    def is_shape(self, node: fx.Node) -> bool:
        """Whether a node computes sizes or dtypes rather than tensor values."""
        if node not in self._shape:
            if node.op == "call_function" and node.target is getattr:
                result = len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
            elif node.op == "call_method" and node.target in _SHAPE_METHODS:
                result = True
            elif node.op in ("call_function", "call_method") and node.all_input_nodes:
                self._shape[node] = False  # guards against cycles; graphs have none
                result = all(self.is_shape(n) for n in node.all_input_nodes)
            else:
                result = False
            self._shape[node] = result
        return self._shape[node]

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        """The nodes whose tensor values flow into ``node``."""
        return [n for n in node.all_input_nodes if not self.is_shape(n)]

    def users(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.users if not self.is_shape(n)]

    def _transparent(self, node: fx.Node) -> bool:
        """One tensor in, same channels out: activations, dropout, reshapes, permutes."""
        if node.op not in ("call_function", "call_method", "call_module"):
            return False
        if self.layer_of(node) or self.is_norm_call(node):
            return False
        ins = self.inputs(node)
        if node.op == "call_module":
            return node.target not in self._weighted and len(ins) == 1
        return len(ins) == 1 and ins[0].op != "get_attr"

    # -- walks ----------------------------------------------------------------------------

    def producer(
        self, name: str, through_norms: bool = False, single_use: bool = False
    ) -> str | None:
        """The layer whose output reaches layer or norm ``name`` through channel-keeping ops.

        Args:
            name: a layer or norm that appears in the trace.
            through_norms: also step back through norm calls (for a conv after conv-norm-act).
            single_use: every tensor on the way must feed only the next step (no shortcut).
        """
        node = self.calls.get(name)
        if node is None:
            return None
        ins = self.inputs(node)
        cur = ins[0] if ins else None
        while cur is not None:
            if single_use and len(self.users(cur)) != 1:
                return None
            layer = self.layer_of(cur)
            if layer is not None:
                return layer
            if self._transparent(cur) or (through_norms and self.is_norm_call(cur)):
                ins = self.inputs(cur)
                cur = ins[0] if ins else None
            else:
                return None
        return None

    def _bfs(
        self, start: Iterable[fx.Node], step: Callable[[fx.Node], list[fx.Node]]
    ) -> str | None:
        queue, seen = deque(start), set()
        while queue and len(seen) < _MAX_WALK:
            node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            layer = self.layer_of(node)
            if layer is not None:
                return layer
            queue.extend(step(node))
        return None

    def consumer(self, name: str) -> str | None:
        """The nearest layer downstream of layer or norm ``name``."""
        node = self.calls.get(name)
        return None if node is None else self._bfs(self.users(node), self.users)

    def upstream(self, name: str) -> str | None:
        """The nearest layer upstream of norm ``name``."""
        node = self.calls.get(name)
        return None if node is None else self._bfs(self.inputs(node), self.inputs)

    def acted_on(self, tensor: str) -> str | None:
        """The layer whose data a loose tensor is combined with (added, multiplied, ...)."""
        start = self.attrs.get(tensor)
        if start is None:
            return None
        derived, queue = {start}, deque(self.users(start))
        while queue and len(derived) < _MAX_WALK:
            node = queue.popleft()
            if node in derived:
                continue
            derived.add(node)
            layer = self.layer_of(node)
            if layer is not None:
                return layer
            others = [n for n in self.inputs(node) if n not in derived]
            found = self._bfs(others, self.inputs) if others else None
            if found is not None:
                return found
            queue.extend(self.users(node))
        return None

    def _strip(self, node: fx.Node) -> fx.Node:
        while self._transparent(node):
            node = self.inputs(node)[0]
        return node

    def _is_add(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target in _ADDS
        return node.op == "call_method" and node.target in ("add", "add_", "sub", "sub_")

    def _branch(self, term: fx.Node) -> tuple[str, fx.Node] | None:
        """A summed term as (layer or norm name, the tensor it was applied to)."""
        cur = self._strip(term)
        name = self.layer_of(cur)
        if name is None and self.is_norm_call(cur):
            name = str(cur.target)
            ins = self.inputs(cur)
            below = self._strip(ins[0]) if ins else None
            if below is not None and self.layer_of(below) and len(self.users(below)) == 1:
                name, cur = self.layer_of(below), below
        if name is None:
            return None
        src = [n for n in self.inputs(cur) if n.op != "get_attr"]
        return (name, src[0]) if src else None

    def branches(self) -> list[list[str]]:
        """Layers (or bare norms) applied to one tensor whose outputs are summed (or subtracted).

        These are the branches of a re-parameterizable block (RepVGG, MobileOne): at
        inference they fuse into one conv. A residual sum never qualifies, since its two
        terms start from different tensors.
        """
        groups, done = [], set()
        for node in reversed(self.graph.nodes):
            if not self._is_add(node) or node in done:
                continue
            terms, stack = [], [node]
            while stack:
                add = stack.pop()
                done.add(add)
                for arg in self.inputs(add):
                    inner = self._strip(arg)
                    if self._is_add(inner) and len(self.users(inner)) == 1:
                        stack.append(inner)
                    else:
                        terms.append(arg)
            by_input: dict[fx.Node, list[str]] = {}
            for term in terms:
                found = self._branch(term)
                if found is not None:
                    by_input.setdefault(found[1], []).append(found[0])
            groups.extend(names for names in by_input.values() if len(names) > 1)
        return groups
