"""Writing the blends of a round straight into the hosts' tensors, without a weight copy.

A round's blends must read every model as it was before the round. Written through buffers,
that costs one copy of the weights and a second pass to copy them back. On CPU, when every
tensor of the round takes the C kernels' path, :class:`InPlaceRound` instead blends each chunk
of a tensor for every host that reads or writes it into a small per-thread scratch, and writes
the chunk back only then: each blend still reads pre-round values, and each weight is read once
and written once.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .kernels import cpu

if TYPE_CHECKING:
    from .rounds import Grafter, RoundPlan

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
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class InPlaceRound:
    """The in-place blends of a round group whose tensors all take the C kernel path.

    Built by :func:`in_place_round` for plans of one layout; :meth:`run` writes a round.
    """

    def __init__(self, plans: Sequence[RoundPlan], kernel: cpu.GroupMix | None) -> None:
        self.key = tuple(p.key for p in plans)
        self.kernel = kernel

    @property
    def possible(self) -> bool:
        """Whether these plans' tensors can be blended in place."""
        return self.kernel is not None

    def run(self, grafters: Sequence[Grafter], plans: Sequence[RoundPlan]) -> list[Tensor]:
        """Write every host's blend, leaving units with NaN or Inf as they were; per host, its
        ``unit_ok``."""
        if self.kernel is None:
            raise RuntimeError("these plans cannot be blended in place")
        oks = [g.unit_ok(p) for g, p in zip(grafters, plans, strict=True)]
        skip = torch.cat([~g.per_tensor(ok) for g, ok in zip(grafters, oks, strict=True)])
        self.kernel.run([p.table for p in plans], skip)
        for g in grafters:
            g.release()
        return oks


def _kernel(plans: Sequence[RoundPlan]) -> cpu.GroupMix | None:
    mixers = [p.mixer for p in plans]
    if not all(m.whole for m in mixers):
        return None
    hosts = [t for p in plans for t in p.host]
    if not hosts or len({t.dtype for t in hosts}) != 1:
        return None
    # Writes must not overlap; a read either is exactly some job's write or touches none.
    writes = sorted((_span(t), i) for i, t in enumerate(hosts))
    starts = [w[0][0] for w in writes]
    for a, b in itertools.pairwise(writes):
        if b[0][0] < a[0][1]:
            return None
    exact = {w[0]: w[1] for w in writes}
    sets = _Sets(len(hosts))
    peers: list[list[Tensor]] = []
    for p in plans:
        for i in range(len(p.host)):
            peers.append([q[i] for q in p.peers])
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
                return None
    groups: dict[int, list[int]] = {}
    for i in range(len(hosts)):
        groups.setdefault(sets.find(i), []).append(i)
    table_of, columns, row_len = [], [], []
    for k, (p, m) in enumerate(zip(plans, mixers, strict=True)):
        for h, col, ax in zip(p.host, m.columns, m.axes, strict=True):
            table_of.append(k)
            columns.append(col)
            row_len.append(0 if ax is None or not h.dim() else h[0].numel())
    return cpu.GroupMix(hosts, peers, table_of, columns, row_len, list(groups.values()))


def in_place_round(plans: Sequence[RoundPlan], kept: InPlaceRound | None = None) -> InPlaceRound:
    """The :class:`InPlaceRound` of these plans; not :attr:`~InPlaceRound.possible` when their
    tensors cannot be blended in place (not all on the C kernels' path, mixed dtypes, or
    overlapping memory).

    ``kept``: the one made for an earlier round, reused when the plans' layouts are the same.
    """
    key = tuple(p.key for p in plans)
    if kept is not None and kept.key == key:
        return kept
    return InPlaceRound(plans, _kernel(plans))
