"""The authors' grafting algorithm, written from docs/method.md, as the benchmarks' baseline.

Per layer: entropy by one masked comparison pass per bin, each count read back to the host
(a host sync per layer), alpha in Python, then the blend of every member tensor; all blends
are computed from pre-round weights and written at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from graftopt.adapters.base import Unit


def entropy(w: Tensor, bins: int = 10) -> float:
    """H(w) over equal-width bins of [min, max], the maximum in the last bin."""
    x = w.detach().float().reshape(-1)
    lo, hi = x.min().item(), x.max().item()
    if hi <= lo:
        return 0.0
    step = (hi - lo) / bins
    h = 0.0
    for k in range(bins):
        left = lo + k * step
        inside = (x >= left) & ((x < left + step) if k < bins - 1 else (x <= hi))
        p = inside.sum().item() / x.numel()
        if p > 0:
            h -= p * math.log(p)
    return h


def filter_entropy(w: Tensor, bins: int = 10) -> Tensor:
    """Per-filter entropy of one layer (rows along dim 0), one masked pass per bin."""
    x = w.detach().float().reshape(w.shape[0], -1)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    step = (hi - lo) / bins
    h = torch.zeros(x.shape[0], device=x.device)
    for k in range(bins):
        left = lo + k * step
        inside = (x >= left) & ((x < left + step) if k < bins - 1 else (x <= hi))
        p = inside.float().mean(1)
        h -= torch.special.xlogy(p, p)
    return torch.tensor(h.tolist())  # host sync per layer, as the per-layer loop reads its scores


def graft_round(
    hosts: Sequence[dict[str, Tensor]],
    peers: Sequence[dict[str, Tensor]],
    units: Sequence[Unit],
    *,
    level: str = "layer",
    A: float = 0.4,
    c: float = 500.0,
) -> None:
    """One simultaneous round: host i blends with peers[i]; tables map names to live tensors."""
    new = []
    for host, peer in zip(hosts, peers, strict=True):
        out = {}
        for u in units:
            w = u.scored[0]
            if level == "layer":
                a = 0.5 + A / math.pi * math.atan(c * (entropy(host[w]) - entropy(peer[w])))
                for name in u.members:
                    out[name] = a * host[name] + (1 - a) * peer[name]
            else:
                a = 0.5 + A / math.pi * torch.atan(
                    c * (filter_entropy(host[w]) - filter_entropy(peer[w]))
                )
                for name in u.members:
                    t = host[name]
                    av = (
                        a.view([-1] + [1] * (t.dim() - 1))
                        if t.dim() and t.shape[0] == a.numel()
                        else a.mean()
                    )
                    out[name] = av * t + (1 - av) * peer[name]
        new.append(out)
    with torch.no_grad():
        for host, out in zip(hosts, new, strict=True):
            for name, value in out.items():
                host[name].copy_(value)
