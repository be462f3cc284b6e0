"""The math of filter grafting as pure tensor operations: score, weight, mix.

Nothing here knows about models, optimizers or peers. Every function takes tensors and
returns tensors; none synchronizes with the host, so the same code runs on CPU and CUDA
without stalls.

.. math::
    H(W) = -\\sum_{k=1}^{n} p_k \\ln p_k, \\qquad
    \\alpha = \\tfrac12 + \\tfrac{A}{\\pi} \\arctan\\big(c\\,(H_{host} - H_{peer})\\big), \\qquad
    W_{host} \\leftarrow \\tfrac1m \\sum_j \\big(\\alpha_j W_{host} + (1-\\alpha_j) W_{peer_j}\\big)

where :math:`p_k` is the share of values in bin :math:`k` of :math:`n` equal-width bins over
``[min W, max W]``; the maximum falls into the last bin, as with :func:`torch.histc`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "bn_alpha",
    "entropy",
    "graft_alpha",
    "l1_score",
    "mix",
    "row_entropy",
    "segment_entropy",
]


def segment_entropy(values: Tensor, lengths: Sequence[int], *, bins: int = 10) -> Tensor:
    """Entropy of each contiguous segment of a flat tensor, all segments at once.

    Args:
        values: 1-d tensor; scored in float32 whatever its dtype.
        lengths: length of each segment, in order; they must add up to ``values.numel()``.
        bins: number of equal-width bins over each segment's ``[min, max]`` (default 10).

    Returns:
        float32 tensor of shape ``(len(lengths),)``; a constant segment scores 0.
    """
    n = len(lengths)
    device = values.device
    x = values.reshape(-1).float()
    sizes = torch.tensor(list(lengths), dtype=torch.long, device=device)
    seg = torch.repeat_interleave(torch.arange(n, device=device), sizes, output_size=x.numel())
    lo = torch.full((n,), math.inf, device=device).scatter_reduce_(0, seg, x, "amin")
    hi = torch.full((n,), -math.inf, device=device).scatter_reduce_(0, seg, x, "amax")
    # Same arithmetic as torch.histc, so bin edges agree value for value.
    width = (hi - lo)[seg]
    pos = (x - lo[seg]) * bins / width
    idx = torch.where(width > 0, pos, torch.zeros_like(pos)).long().clamp_(0, bins - 1)
    counts = torch.zeros(n * bins, device=device).index_add_(
        0, seg * bins + idx, torch.ones_like(x)
    )
    p = counts.view(n, bins) / sizes.unsqueeze(1).float()
    return -torch.special.xlogy(p, p).sum(dim=1)


def entropy(tensor: Tensor, *, bins: int = 10) -> Tensor:
    """Entropy of one tensor's values over ``bins`` equal-width bins (a 0-d float32 tensor)."""
    return segment_entropy(tensor.reshape(-1), [tensor.numel()], bins=bins)[0]


def row_entropy(rows: Tensor, *, bins: int = 10) -> Tensor:
    """Entropy of each row of a 2-d tensor (one score per filter at filter level)."""
    f, k = rows.shape
    return segment_entropy(rows.reshape(-1), [k] * f, bins=bins)


def l1_score(rows: Tensor) -> Tensor:
    """Mean absolute value of each row of a 2-d tensor, in float32."""
    return rows.float().abs().mean(dim=1)


def graft_alpha(score_host: Tensor, score_peer: Tensor, *, A: float = 0.4, c: float = 500.0) -> Tensor:
    """The host's share: ``0.5 + A/pi * arctan(c * (score_host - score_peer))``, in (0.5-A/2, 0.5+A/2)."""
    return 0.5 + (A / math.pi) * torch.atan(c * (score_host.float() - score_peer.float()))


def bn_alpha(gamma_host: Tensor, gamma_peer: Tensor) -> Tensor:
    """Per-channel share from normalization scales, ``|g_h| / (|g_h| + |g_p|)``; 0.5 where both are 0."""
    gh, gp = gamma_host.float().abs(), gamma_peer.float().abs()
    total = gh + gp
    return torch.where(total > 0, gh / torch.where(total > 0, total, 1.0), 0.5)


def mix(host: Tensor, peers: Sequence[Tensor], alphas: Sequence[Tensor], *, axis: int | None = None) -> Tensor:
    """Blend ``host`` with its peers into a new tensor of the host's dtype and memory format.

    Args:
        host: the host's tensor.
        peers: one tensor per peer, of the host's shape (any device or dtype).
        alphas: one host share per peer: a 0-d tensor, or at filter level a 1-d tensor with
            one entry per slice of ``axis``.
        axis: the filter axis that a 1-d alpha runs along; ``None`` for 0-d alphas.

    Returns:
        ``(1/m) * sum_j (alpha_j * host + (1 - alpha_j) * peer_j)``, computed in float32 for
        half-precision weights and in the host's dtype otherwise.
    """
    work = torch.float32 if host.dtype in (torch.float16, torch.bfloat16) else host.dtype
    h = host.to(work)
    total = None
    for peer, a in zip(peers, alphas, strict=True):
        a = a.to(device=host.device, dtype=work)
        if axis is not None and a.dim() == 1:
            shape = [1] * host.dim()
            shape[axis] = -1
            a = a.view(shape)
        term = a * h + (1 - a) * peer.to(device=host.device, dtype=work)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("mix() needs at least one peer")
    if len(peers) > 1:
        total = total / len(peers)
    out = torch.empty_like(host)
    out.copy_(total)
    return out
