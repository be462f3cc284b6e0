"""Writing the blends of a round straight into the hosts' tensors, without a weight copy.

A round's blends must read every model as it was before the round. Written through buffers,
that costs one copy of the weights and a second pass to copy them back. On CPU,
:class:`InPlaceRound` instead blends each chunk of a tensor for every host that reads or writes
it into a small per-thread scratch, and writes the chunk back only then: each blend still reads
pre-round values, and each weight is read once and written once. That covers the tensors that
ride the C mix (dense float32 or float64, filters along dim 0); the few others (a filter axis
elsewhere, half precision, a peer of another dtype) are blended into new tensors before the
kernel runs and copied in after it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import functional as F
from .kernels import cpu
from .kernels.plans import MixPlan

if TYPE_CHECKING:
    from .grafter import Grafter, RoundPlan

__all__ = ["InPlaceRound", "in_place_round"]


class _Sets:
    """Union-find over jobs: jobs that read each other's tensors end in one set."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes ``t`` can touch, gaps included."""
    start = t.data_ptr()
    if not t.numel():
        return start, start
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


class InPlaceRound:
    """The in-place blends of a round group whose tensors all take the C kernel path.

    Built by :func:`in_place_round` for plans of one layout; :meth:`run` writes a round.
    """

    def __init__(
        self,
        plans: Sequence[RoundPlan],
        kernel: cpu.GroupMix | None,
        picked: Sequence[list[int]] = (),
        others: Sequence[tuple[list[int], MixPlan | None]] = (),
    ) -> None:
        self.key = tuple(p.key for p in plans)
        self.kernel = kernel
        self.picked = [torch.tensor(idx, dtype=torch.long) for idx in picked]  # the kernel's
        self.others = list(others)  # per host: the rest, and how they blend

    @property
    def possible(self) -> bool:
        """Whether these plans' tensors can be blended in place."""
        return self.kernel is not None

    @torch.no_grad()
    def run(self, grafters: Sequence[Grafter], plans: Sequence[RoundPlan]) -> list[Tensor]:
        """Write every host's blend, leaving units with NaN or Inf as they were; per host, its
        ``unit_ok``."""
        if self.kernel is None:
            raise RuntimeError("these plans cannot be blended in place")
        oks = [g.unit_ok(p) for g, p in zip(grafters, plans, strict=True)]
        # Tensors the kernel does not take (another dtype or filter axis, half precision) are
        # blended first, into new tensors, while every weight still holds its pre-round value.
        extra = []
        for p, (idx, sub) in zip(plans, self.others, strict=True):
            if sub is None:
                extra.append([])
                continue
            hosts = [p.host[i] for i in idx]
            peers = [[q[i] for i in idx] for q in p.peers]
            extra.append(sub.run(hosts, peers, p.table, None)[0])
        skip = torch.cat(
            [~g.per_tensor(ok)[i] for g, ok, i in zip(grafters, oks, self.picked, strict=True)]
        )
        self.kernel.run([p.table for p in plans], skip)
        # The kernel writes through raw pointers: tell autograd, as an in-place op would.
        torch.autograd.graph.increment_version([t for p in plans for t in p.host])
        for g, p, ok, (idx, _), values in zip(
            grafters, plans, oks, self.others, extra, strict=True
        ):
            if values:
                flags = g.per_tensor(ok)[idx].tolist()
                keep = [k for k, good in enumerate(flags) if good]
                if keep:
                    torch._foreach_copy_([p.host[idx[k]] for k in keep], [values[k] for k in keep])
            g.release()
        return oks


def _build(plans: Sequence[RoundPlan]) -> InPlaceRound:
    """The kernel takes the tensors of each host that ride the C mix (of one dtype across the
    group); the rest are blended aside."""
    impossible = InPlaceRound(plans, None)
    mixers = [p.mixer for p in plans]
    if any(m.ck is None for m in mixers):
        return impossible
    dtypes = {p.host[e.idx[0]].dtype for p, m in zip(plans, mixers, strict=True) for e in m.fast}
    if not dtypes:
        return impossible
    dtype = torch.float32 if torch.float32 in dtypes else torch.float64
    picked = [
        next((e.idx for e in m.fast if p.host[e.idx[0]].dtype == dtype), [])
        for p, m in zip(plans, mixers, strict=True)
    ]
    # Writes must not overlap; a read of the kernel either is exactly one of its writes or
    # touches none of them (the tensors blended aside are written after the kernel has run).
    every = sorted(_span(t) for p in plans for t in p.host)
    for a, b in itertools.pairwise(every):
        if b[0] < a[1]:
            return impossible
    hosts = [p.host[i] for p, idx in zip(plans, picked, strict=True) for i in idx]
    peers = [[q[i] for q in p.peers] for p, idx in zip(plans, picked, strict=True) for i in idx]
    writes = sorted((_span(t), i) for i, t in enumerate(hosts))
    starts = [w[0][0] for w in writes]
    exact = {w[0]: w[1] for w in writes}
    sets = _Sets(len(hosts))
    for i, reads in enumerate(peers):
        for t in reads:
            span = _span(t)
            j = exact.get(span)
            if j is not None:
                sets.join(i, j)
                continue
            k = bisect.bisect_right(starts, span[0]) - 1
            near = [w for w in writes[max(k, 0) : k + 2] if w[0][0] < span[1] and span[0] < w[0][1]]
            if near and span[1] > span[0]:
                return impossible
    groups: dict[int, list[int]] = {}
    for i in range(len(hosts)):
        groups.setdefault(sets.find(i), []).append(i)
    table_of, columns, row_len = [], [], []
    others = []
    for k, (p, m, idx) in enumerate(zip(plans, mixers, picked, strict=True)):
        for i in idx:
            ax, h = m.axes[i], p.host[i]
            table_of.append(k)
            columns.append(m.columns[i])
            row_len.append(F.row_length(h, ax))
        taken = set(idx)
        rest = [i for i in range(len(p.host)) if i not in taken]
        sub = None
        if rest:
            sub = MixPlan(
                [p.host[i] for i in rest],
                [[q[i] for i in rest] for q in p.peers],
                [m.columns[i] for i in rest],
                [m.axes[i] for i in rest],
            )
        others.append((rest, sub))
    kernel = cpu.GroupMix(hosts, peers, table_of, columns, row_len, list(groups.values()))
    return InPlaceRound(plans, kernel, picked, others)


def in_place_round(plans: Sequence[RoundPlan], kept: InPlaceRound | None = None) -> InPlaceRound:
    """The :class:`InPlaceRound` of these plans; not :attr:`~InPlaceRound.possible` when their
    tensors cannot be blended in place (not on CPU with the C kernels, none on the C mix's path,
    or overlapping memory).

    ``kept``: the one made for an earlier round, reused when the plans' layouts are the same.
    """
    key = tuple(p.key for p in plans)
    if kept is not None and kept.key == key:
        return kept
    return _build(plans)
