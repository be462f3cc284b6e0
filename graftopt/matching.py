"""Filter matching: permute a peer's filters into the host's order before they are blended.

Two networks trained from different starts learn similar filters in different orders, and
blending filter ``j`` of one with filter ``j`` of the other averages unlike with unlike. Weight
matching (Ainsworth et al., "Git Re-Basin", 2023) finds, for every channel space of the
network, the permutation of the peer's channels that best agrees with the host's weights;
permuting a channel space together with every tensor that reads or writes it leaves the peer's
function unchanged. Which tensors share a space comes from
:func:`graftopt.adapters.channels.channel_spaces`; this module is the math on tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ChannelSpaces", "linear_assignment", "match_peer", "matched", "permute"]


@dataclass(frozen=True)
class ChannelSpaces:
    """Channel spaces of an architecture and where each lies in its tensors.

    Args:
        sizes: channels per space; a permutation of space ``s`` is a permutation of
            ``range(sizes[s])``.
        axes: tensor name -> ``((axis, offset, space), ...)``: channels ``offset`` to
            ``offset + sizes[space]`` along ``axis`` of the tensor are space ``space``.
            Channels of a tensor no space covers are never permuted.
    """

    sizes: tuple[int, ...]
    axes: Mapping[str, tuple[tuple[int, int, int], ...]]

    @property
    def channels(self) -> int:
        """How many channels can be permuted, over all spaces."""
        return sum(self.sizes)

    def identity(self) -> list[Tensor]:
        return [torch.arange(n) for n in self.sizes]


def linear_assignment(gain: Tensor) -> Tensor:
    """The permutation ``p`` of a square matrix that maximizes ``sum_i gain[i, p[i]]``.

    Shortest augmenting paths with dual prices (Jonker-Volgenant, as in Crouse 2016 and
    scipy's ``linear_sum_assignment``): exact, ``O(n^3)``, one row added per outer step.
    Uses scipy when it is installed (same optimum, compiled).
    """
    if gain.dim() != 2 or gain.shape[0] != gain.shape[1]:
        raise ValueError(f"gain must be a square matrix, got shape {tuple(gain.shape)}")
    cost = -gain.detach().double().cpu().numpy()
    if not np.isfinite(cost).all():
        raise ValueError("gain holds NaN or Inf")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return torch.from_numpy(_assign(cost))
    return torch.from_numpy(linear_sum_assignment(cost)[1].astype(np.int64))


def _assign(cost: np.ndarray) -> np.ndarray:
    n = cost.shape[0]
    u, v = np.zeros(n), np.zeros(n)
    col4row = np.full(n, -1, dtype=np.int64)
    row4col = np.full(n, -1, dtype=np.int64)
    for cur in range(n):
        shortest = np.full(n, np.inf)
        path = np.full(n, -1, dtype=np.int64)
        rows_seen = np.zeros(n, dtype=bool)
        cols_seen = np.zeros(n, dtype=bool)
        i, low, sink = cur, 0.0, -1
        while sink < 0:
            rows_seen[i] = True
            reduced = low + cost[i] - u[i] - v
            better = ~cols_seen & (reduced < shortest)
            shortest[better] = reduced[better]
            path[better] = i
            open_costs = np.where(cols_seen, np.inf, shortest)
            j = int(np.argmin(open_costs))
            low = open_costs[j]
            cols_seen[j] = True
            if row4col[j] < 0:
                sink = j
            else:
                i = int(row4col[j])
        u[cur] += low
        others = rows_seen.copy()
        others[cur] = False
        u[others] += low - shortest[col4row[others]]
        v[cols_seen] -= low - shortest[cols_seen]
        j = sink
        while True:
            i = int(path[j])
            row4col[j] = i
            col4row[i], j = j, int(col4row[i])
            if i == cur:
                break
    return col4row


def _index(size: int, entries: Sequence[tuple[int, int]], perms: Sequence[Tensor]) -> Tensor:
    """The gather index of one axis: each space's channels in the permuted order."""
    idx = torch.arange(size)
    for offset, space in entries:
        p = perms[space]
        idx[offset : offset + len(p)] = offset + p
    return idx


def permute(
    spaces: ChannelSpaces,
    tensors: Mapping[str, Tensor],
    perms: Sequence[Tensor],
    skip: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """``tensors`` with every space ``s`` of theirs in the order ``perms[s]`` (new tensors).

    Channel ``k`` of space ``s`` in the result is channel ``perms[s][k]`` of the input. Tensors
    no space covers come back as they are. ``skip``: an ``(name, axis)`` left unpermuted.
    """
    out = {}
    for name, t in tensors.items():
        by_axis: dict[int, list[tuple[int, int]]] = {}
        for axis, offset, space in spaces.axes.get(name, ()):
            if skip != (name, axis):
                by_axis.setdefault(axis, []).append((offset, space))
        for axis, entries in by_axis.items():
            t = t.index_select(axis, _index(t.shape[axis], entries, perms).to(t.device))
        out[name] = t
    return out


def _uses(spaces: ChannelSpaces, names: set[str]) -> list[list[tuple[str, int, int]]]:
    """Per space, the ``(tensor, axis, offset)`` places it occupies among ``names``."""
    uses: list[list[tuple[str, int, int]]] = [[] for _ in spaces.sizes]
    for name, entries in spaces.axes.items():
        if name in names:
            for axis, offset, s in entries:
                uses[s].append((name, axis, offset))
    return uses


def _gain(
    spaces: ChannelSpaces,
    size: int,
    uses: Sequence[tuple[str, int, int]],
    host: Mapping[str, Tensor],
    peer: Mapping[str, Tensor],
    perms: Sequence[Tensor],
) -> Tensor:
    """``gain[i, j]``: agreement of host channel ``i`` with peer channel ``j`` of one space of
    ``size`` channels (at its ``uses``), the peer's other spaces in their current order. On the
    tensors' device, in float32."""
    gain = None
    for name, axis, offset in uses:
        others = permute(spaces, {name: peer[name]}, perms, skip=(name, axis))[name]
        a = host[name].detach().movedim(axis, 0)[offset : offset + size].reshape(size, -1)
        b = others.detach().movedim(axis, 0)[offset : offset + size].reshape(size, -1)
        term = a.float() @ b.float().t()
        gain = term if gain is None else gain + term
    return gain


@torch.no_grad()
def match_peer(
    spaces: ChannelSpaces,
    host: Mapping[str, Tensor],
    peer: Mapping[str, Tensor],
    max_iter: int = 100,
    seed: int = 0,
) -> list[Tensor]:
    """Per space, the order of the peer's channels that best matches the host's weights.

    Coordinate ascent over the spaces (weight matching): each pass solves every space's
    assignment with the others held, in an order drawn from ``seed``, until a pass changes no
    permutation. Deterministic for given tensors. The result is for :func:`permute` of the peer.
    """
    perms = spaces.identity()
    uses = _uses(spaces, set(host) & set(peer))
    if not spaces.sizes:
        return perms
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for s in torch.randperm(len(spaces.sizes), generator=g).tolist():
            if not uses[s]:
                continue
            gain = _gain(spaces, spaces.sizes[s], uses[s], host, peer, perms).double().cpu()
            if not torch.isfinite(gain).all():
                continue  # NaN or Inf: the round's own check skips the units that hold it
            new = linear_assignment(gain)
            ar = torch.arange(len(new))
            # Only a clear gain moves a permutation (float32 sums carry rounding): ties and
            # noise keep the order, so the loop ends.
            if gain[ar, new].sum() > gain[ar, perms[s]].sum() + 1e-7 * gain.abs().sum():
                perms[s] = new
                changed = True
        if not changed:
            break
    return perms


def matched(
    spaces: ChannelSpaces, host: Mapping[str, Tensor], peer: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``peer`` with its filters in the order that best matches ``host``'s (new tensors where
    anything moved): :func:`permute` by :func:`match_peer`."""
    return permute(spaces, peer, match_peer(spaces, host, peer))
