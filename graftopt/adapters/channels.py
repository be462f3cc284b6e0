"""Which tensors share a channel space: the permutations that leave a network's function as it is.

A conv's output channels can be put in any order if every tensor that reads or writes them
moves along: the conv's filters and bias, the norm after it (scale, shift, running
statistics), the input axis of each consumer, and, through a residual sum, every other branch
that writes the same stream. :func:`channel_spaces` walks the model's fx trace
(:class:`~graftopt.adapters.flow.Flow`) once and groups the channels into such spaces.

The walk knows convolutions, linears, batch/layer/group norms, activations, pooling,
dropout, sums and gates, per-channel scales, channel padding (option A shortcuts),
concatenation, flattening after global pooling and dimension permutes. Any other operation
fixes the channels it touches (they keep their order): the result can be incomplete, never
wrong. Inputs and outputs of the model are fixed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..matching import ChannelSpaces
from .base import unwrap
from .flow import Flow
from .layers import CONV, is_depthwise, is_layer, is_norm

__all__ = ["channel_spaces"]

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_UNARY_NAMES = {
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu", "mish", "softplus",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "clamp", "clamp_", "clip", "contiguous",
    "clone", "to", "float", "half", "bfloat16", "type_as", "abs", "neg", "exp", "sqrt", "square",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d",
}  # fmt: skip
_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
_VIEWS = {"reshape", "view", "expand", "expand_as", "unsqueeze", "to", "type_as", "float"}
_BINARY_NAMES = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


class _Spaces:
    """Channel spaces under construction: leaves merged by union-find, split where needed.

    A leaf stands for a run of channels; a sum merges two leaves channel for channel; a leaf
    merged with a run that other leaves make up is split to match. Splitting only ever
    restricts which permutations are allowed.
    """

    def __init__(self) -> None:
        self.size: list[int] = []
        self.parent: list[int] = []
        self.parts: dict[int, list[int]] = {}  # a split leaf -> its pieces
        self.fixed: set[int] = set()  # roots whose channels keep their order

    def new(self, n: int, fixed: bool = False) -> list[int]:
        self.size.append(n)
        self.parent.append(len(self.parent))
        if fixed:
            self.fixed.add(len(self.parent) - 1)
        return [len(self.parent) - 1]

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def leaves(self, layout: list[int]) -> list[int]:
        out: list[int] = []
        for a in layout:
            out.extend(self.leaves(self.parts[a]) if a in self.parts else [a])
        return out

    def total(self, layout: list[int]) -> int:
        return sum(self.size[a] for a in self.leaves(layout))

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.fixed:
                self.fixed.add(ra)

    def _split(self, leaf: int, first: int) -> None:
        """Split ``leaf``, and every leaf merged with it, after its first ``first`` channels."""
        root = self.find(leaf)
        members = [
            a for a in range(len(self.parent)) if a not in self.parts and self.find(a) == root
        ]
        n, fixed = self.size[leaf], root in self.fixed
        heads, tails = [], []
        for a in members:
            (h,), (t,) = self.new(first, fixed), self.new(n - first, fixed)
            self.parts[a] = [h, t]
            heads.append(h)
            tails.append(t)
        for h, t in zip(heads[1:], tails[1:], strict=True):
            self._union(heads[0], h)
            self._union(tails[0], t)

    def unify(self, x: list[int], y: list[int]) -> bool:
        """Merge two layouts channel for channel; False (nothing merged) when sizes differ."""
        if self.total(x) != self.total(y):
            return False
        while True:
            lx, ly = self.leaves(x), self.leaves(y)
            for a, b in zip(lx, ly, strict=False):
                if self.size[a] != self.size[b]:
                    big, small = (a, b) if self.size[a] > self.size[b] else (b, a)
                    self._split(big, self.size[small])
                    break
            else:
                for a, b in zip(lx, ly, strict=True):
                    self._union(a, b)
                return True

    def fix(self, layout: list[int]) -> None:
        for a in self.leaves(layout):
            self.fixed.add(self.find(a))


@dataclass
class _Value:
    """What the walk knows of a node's tensor: its channel layout and which axis holds it."""

    layout: list[int]
    axis: int  # 1 (channels first, after the batch) or -1 (channels last)
    ndim: int | None = None
    flattened: bool = False  # channels x positions, valid only if positions == 1
    pooled: bool = False  # one position left (global pooling): flattening keeps the channels

    def with_(self, **kw) -> _Value:
        return _Value(**{**self.__dict__, **kw})

    def axis_pos(self) -> int | None:
        if self.axis >= 0:
            return self.axis
        return None if self.ndim is None else self.ndim + self.axis


class _Walk:
    def __init__(self, model: nn.Module, flow: Flow) -> None:
        self.flow = flow
        self.modules = dict(model.named_modules())
        self.tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        self.sp = _Spaces()
        self.entries: list[tuple[str, int, list[int]]] = []  # (tensor, axis, layout)
        self.values: dict[fx.Node, _Value | str | None] = {}  # str: a loose tensor's name

    def _fix_inputs(self, node: fx.Node) -> None:
        for n in node.all_input_nodes:
            v = self.values.get(n)
            if isinstance(v, _Value):
                self.sp.fix(v.layout)

    def _value(self, arg) -> _Value | str | None:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def run(self) -> None:
        for node in self.flow.graph.nodes:
            try:
                self.values[node] = self._visit(node)
            except _Unknown:
                self._fix_inputs(node)
                self.values[node] = None

    # -- rules ----------------------------------------------------------------------------

    def _visit(self, node: fx.Node) -> _Value | str | None:
        if node.op == "placeholder":
            return None
        if node.op == "output":
            raise _Unknown
        if node.op == "get_attr":
            name = str(node.target)
            if name in self.tensors:
                return name
            raise _Unknown
        if self.flow.is_shape(node):
            return None
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        ins = self.flow.inputs(node)
        if len(ins) == 1 and isinstance(self._value(ins[0]), str) and name in _VIEWS:
            loose = self._value(ins[0])  # a 1-d scale reshaped to broadcast: still per channel
            if self.tensors[loose].dim() == 1:
                return loose
            raise _Unknown
        if target in _BINARY or (node.op == "call_method" and name in _BINARY_NAMES):
            return self._binary(node, ins)
        if target in (torch.cat, torch.concat):
            return self._cat(node)
        if target is F.pad:
            return self._pad(node)
        if target is operator.getitem:
            return self._getitem(node)
        if name in ("flatten", "view", "reshape") or target is torch.flatten:
            return self._flatten(node, name)
        if name in ("mean", "sum", "amax") or target in (torch.mean, torch.sum, torch.amax):
            return self._reduce(node)
        if name in ("permute", "transpose") or target in (torch.permute, torch.transpose):
            return self._permute(node, name)
        if name in _UNARY_NAMES and len(ins) == 1:
            v = self._value(ins[0])
            if isinstance(v, _Value) and not v.flattened:
                if name.startswith("adaptive"):
                    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
                    return v.with_(pooled=_is_one(size))
                return v
        raise _Unknown

    def _module(self, node: fx.Node, m: nn.Module) -> _Value | None:
        ins = self.flow.inputs(node)
        v = self._value(ins[0]) if len(ins) == 1 else None
        if not isinstance(v, _Value):
            v = None
        name = str(node.target)
        if is_layer(m):
            return self._layer(node, name, m, v)
        if is_norm(m):
            return self._norm(node, name, m, v)
        if isinstance(m, (*_ACTIVATIONS, *_POOLS)) and v is not None and not v.flattened:
            if isinstance(m, nn.PReLU) and m.weight.numel() > 1:
                self.entries.append((f"{name}.weight", 0, v.layout))
            if isinstance(m, _POOLS) and "Adaptive" in type(m).__name__:
                return v.with_(pooled=_is_one(m.output_size))
            return v
        if isinstance(m, nn.Flatten) and v is not None and m.start_dim == 1 and v.axis_pos() == 1:
            return v.with_(ndim=2, flattened=v.ndim != 2 and not v.pooled)
        raise _Unknown

    def _layer(self, node: fx.Node, name: str, m: nn.Module, v: _Value | None) -> _Value | None:
        has_bias = getattr(m, "bias", None) is not None
        if isinstance(m, CONV) and not m.transposed:
            in_ok = v is not None and v.axis_pos() == 1 and not v.flattened
            ndim = m.weight.dim()
            if is_depthwise(m) and m.out_channels == m.in_channels:
                if in_ok and self.sp.total(v.layout) == m.in_channels:
                    self.entries.append((f"{name}.weight", 0, v.layout))
                    if has_bias:
                        self.entries.append((f"{name}.bias", 0, v.layout))
                    return _Value(v.layout, 1, ndim)
                raise _Unknown
            if m.groups != 1:
                raise _Unknown
            out = self._dense(name, has_bias, v, in_ok, m.in_channels, m.out_channels)
            return _Value(out, 1, ndim)
        if isinstance(m, nn.Linear):
            last = v is not None and (v.axis == -1 or (v.axis_pos() == 1 and v.ndim == 2))
            out = self._dense(name, has_bias, v, last, m.in_features, m.out_features)
            return _Value(out, -1, v.ndim if v is not None else None)
        raise _Unknown

    def _dense(
        self, name: str, has_bias: bool, v: _Value | None, fits: bool, n_in: int, n_out: int
    ) -> list[int]:
        """A layer that reads ``v`` along its weight's axis 1 and writes a new space."""
        if v is not None and fits and self.sp.total(v.layout) == n_in:
            self.entries.append((f"{name}.weight", 1, v.layout))
        elif v is not None:
            self.sp.fix(v.layout)
        out = self.sp.new(n_out)
        self.entries.append((f"{name}.weight", 0, out))
        if has_bias:
            self.entries.append((f"{name}.bias", 0, out))
        return out

    def _norm(self, node: fx.Node, name: str, m: nn.Module, v: _Value | None) -> _Value | None:
        if v is None or v.flattened:
            raise _Unknown
        n = self.sp.total(v.layout)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ok = v.axis_pos() == 1 and m.num_features == n
        elif isinstance(m, nn.GroupNorm):
            ok = v.axis_pos() == 1 and m.num_channels == n and m.num_groups in (1, n)
        elif isinstance(m, nn.LayerNorm):
            # timm's LayerNorm2d normalizes dim 1 of NCHW tensors; torch's the last dim.
            channels_first = type(m).__name__ == "LayerNorm2d"
            want = (
                v.axis_pos() == 1
                if channels_first
                else v.axis == -1 or v.axis_pos() == (None if v.ndim is None else v.ndim - 1)
            )
            ok = want and tuple(m.normalized_shape) == (n,)
        else:
            ok = False
        if not ok:
            raise _Unknown
        for t, _ in m.named_parameters(prefix=name, recurse=False):
            self.entries.append((t, 0, v.layout))
        for t, b in m.named_buffers(prefix=name, recurse=False):
            if b.dim() == 1 and b.numel() == n:
                self.entries.append((t, 0, v.layout))
        return v

    def _loose(self, tensor: str, v: _Value) -> bool:
        """Record a loose tensor combined elementwise with ``v``; False if its axis is unclear."""
        t = self.tensors[tensor]
        n = self.sp.total(v.layout)
        if t.numel() == 1:
            return True
        if t.dim() == 1:
            if t.numel() != n:
                return False
            self.entries.append((tensor, 0, v.layout))
            return True
        pos = v.axis_pos()
        if pos is None or v.ndim is None:
            return False
        axis = pos - (v.ndim - t.dim())
        if axis < 0 or t.shape[axis] != n:
            return False
        self.entries.append((tensor, axis, v.layout))
        return True

    def _binary(self, node: fx.Node, ins: list[fx.Node]) -> _Value | None:
        vals = [self._value(n) for n in ins]
        known = [v for v in vals if isinstance(v, _Value)]
        if not known or any(v is None for v in vals) or any(v.flattened for v in known):
            raise _Unknown
        first = known[0]
        for v in known[1:]:
            if v.axis_pos() != first.axis_pos() or not self.sp.unify(first.layout, v.layout):
                raise _Unknown
        for v in vals:
            if isinstance(v, str) and not self._loose(v, first):
                raise _Unknown
        ndims = [v.ndim for v in known if v.ndim is not None]
        return first.with_(ndim=max(ndims) if ndims else None)

    def _cat(self, node: fx.Node) -> _Value | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise _Unknown
        vals = [self._value(t) for t in tensors]
        if not vals or not all(isinstance(v, _Value) and not v.flattened for v in vals):
            raise _Unknown
        first = vals[0]
        pos = {v.axis_pos() for v in vals}
        ndim = first.ndim
        if len(pos) != 1 or None in pos:
            raise _Unknown
        (p,) = pos
        d = dim if dim >= 0 or ndim is None else ndim + dim
        if d == p:
            return _Value([a for v in vals for a in v.layout], first.axis, ndim)
        if d < 0:
            raise _Unknown
        for v in vals[1:]:  # along another dim: every piece lies in one channel space
            if not self.sp.unify(first.layout, v.layout):
                raise _Unknown
        return first

    def _pad(self, node: fx.Node) -> _Value | None:
        v = self._value(node.args[0])
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        if not isinstance(v, _Value) or v.ndim is None or v.flattened or mode != "constant":
            raise _Unknown
        if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
            raise _Unknown
        pair = v.ndim - 1 - v.axis_pos()  # pads run from the last dim backwards
        if len(pad) <= 2 * pair:
            return v
        front, back = pad[2 * pair], pad[2 * pair + 1]
        if front < 0 or back < 0:
            raise _Unknown
        # The padded channels hold zeros here; the branches summed with them give them values.
        layout = (
            (self.sp.new(front) if front else []) + v.layout + (self.sp.new(back) if back else [])
        )
        return v.with_(layout=layout)

    def _getitem(self, node: fx.Node) -> _Value | None:
        v = self._value(node.args[0])
        index = node.args[1]
        if not isinstance(v, _Value) or v.flattened or v.ndim is None:
            raise _Unknown
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None for i in index) or len(index) > v.ndim:
            raise _Unknown
        pos, dropped = v.axis_pos(), 0
        for d, i in enumerate(index):
            if d == pos:
                if i != slice(None):
                    raise _Unknown
            elif isinstance(i, int):
                dropped += d < pos
            elif not isinstance(i, slice):
                raise _Unknown
        ints = sum(isinstance(i, int) for i in index)
        return _Value(v.layout, v.axis if v.axis < 0 else pos - dropped, v.ndim - ints)

    def _flatten(self, node: fx.Node, name: str) -> _Value | None:
        v = self._value(node.args[0])
        if not isinstance(v, _Value) or v.flattened:
            raise _Unknown
        args = node.args[1:]
        if name == "flatten" or node.target is torch.flatten:
            start = args[0] if args else node.kwargs.get("start_dim", 0)
            end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
            pos = v.axis_pos()
            if v.ndim is None or end != -1 or not isinstance(start, int) or pos is None:
                raise _Unknown
            start = start if start >= 0 else v.ndim + start
            if start > pos:  # positions flattened after the channels
                return v.with_(ndim=start + 1, axis=pos)
            if start == pos == 1:
                return v.with_(ndim=2, axis=1, flattened=v.ndim != 2 and not v.pooled)
            raise _Unknown
        # x.view(x.size(0), -1): the flattening of a classifier head
        if len(args) == 2 and args[1] == -1 and isinstance(args[0], fx.Node) and v.axis_pos() == 1:
            return v.with_(ndim=2, axis=1, flattened=v.ndim != 2 and not v.pooled)
        raise _Unknown

    def _reduce(self, node: fx.Node) -> _Value | None:
        v = self._value(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if not isinstance(v, _Value) or v.flattened or v.ndim is None or dims is None:
            raise _Unknown
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            raise _Unknown
        dims = [d if d >= 0 else v.ndim + d for d in dims]
        pos = v.axis_pos()
        if pos in dims or 0 in dims:
            raise _Unknown
        pooled = v.pooled or set(dims) == set(range(v.ndim)) - {0, pos}
        if keep:
            return v.with_(pooled=pooled)
        return _Value(v.layout, pos - sum(d < pos for d in dims), v.ndim - len(dims), pooled=pooled)

    def _permute(self, node: fx.Node, name: str) -> _Value | None:
        v = self._value(node.args[0])
        if not isinstance(v, _Value) or v.flattened or v.ndim is None:
            raise _Unknown
        args = list(node.args[1:])
        pos = v.axis_pos()
        if name == "transpose" or node.target is torch.transpose:
            if len(args) != 2 or not all(isinstance(a, int) for a in args):
                raise _Unknown
            a, b = (d if d >= 0 else v.ndim + d for d in args)
            new = b if pos == a else a if pos == b else pos
        else:
            order = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            if len(order) != v.ndim or not all(isinstance(d, int) for d in order):
                raise _Unknown
            order = [d if d >= 0 else v.ndim + d for d in order]
            new = order.index(pos)
        return _Value(v.layout, -1 if new == v.ndim - 1 else new, v.ndim)

    def spaces(self) -> ChannelSpaces:
        roots: dict[int, int] = {}
        axes: dict[str, list[tuple[int, int, int]]] = {}
        for tensor, axis, layout in self.entries:
            t = self.tensors.get(tensor)
            if t is None:
                continue
            offset = 0
            for leaf in self.sp.leaves(layout):
                r = self.sp.find(leaf)
                n = self.sp.size[leaf]
                if r not in self.sp.fixed and n > 1:
                    space = roots.setdefault(r, len(roots))
                    entry = (axis, offset, space)
                    if entry not in axes.setdefault(tensor, []):
                        axes[tensor].append(entry)
                offset += n
            if offset != t.shape[axis]:
                raise RuntimeError(
                    f"channel spaces of {tensor!r}: {offset} channels along axis {axis}, "
                    f"the tensor has {t.shape[axis]}"
                )
        sizes = [0] * len(roots)
        for r, s in roots.items():
            sizes[s] = self.sp.size[r]
        return ChannelSpaces(tuple(sizes), {k: tuple(v) for k, v in axes.items()})


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


class _Unknown(Exception):
    """An operation the walk does not know: its channels keep their order."""


def channel_spaces(model: nn.Module) -> ChannelSpaces:
    """The channel spaces of ``model``'s tensors (see the module docstring).

    Raises ValueError when the model cannot be traced by torch.fx.
    """
    model = unwrap(model)
    layers = [n for n, m in model.named_modules() if is_layer(m)]
    norms = [n for n, m in model.named_modules() if is_norm(m)]
    flow = Flow.trace(model, layers, norms)
    if flow is None:
        raise ValueError(
            f"{type(model).__name__} cannot be traced by torch.fx, so its channel spaces are "
            "unknown: filter matching needs a traceable model"
        )
    walk = _Walk(model, flow)
    walk.run()
    return walk.spaces()
