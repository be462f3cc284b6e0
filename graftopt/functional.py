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

Fast paths: :func:`entropies` and :func:`segment_entropy` histogram every segment in one call
(C kernels on CPU, Triton on CUDA, pure torch elsewhere), and :func:`mix_many` blends many
tensors at once (a C kernel on CPU, ``torch._foreach_*`` ops elsewhere). Each gives the result of
the straightforward per-tensor code: the same bins, and blends within float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .criteria import bn_alpha, segment_l1
from .settings import DEFAULTS, check

__all__ = [
    "bn_alpha",
    "entropies",
    "entropy",
    "graft_alpha",
    "mix",
    "mix_many",
    "row_entropy",
    "row_length",
    "segment_entropy",
    "segment_l1",
]

# The paper's alpha curve and histogram, as the settings schema defines them.
PAPER_A = DEFAULTS.A
PAPER_C = DEFAULTS.c
BINS = DEFAULTS.bins


def check_bins(bins: object) -> None:
    """Refuse a bin count the round kernels cannot count."""
    problem = check({"bins": bins})
    if problem:
        raise ValueError(problem)


def _segment_entropy_torch(
    values: Tensor, lengths: Sequence[int], bins: int, finite: Tensor | None = None
) -> Tensor:
    """The straightforward batched form: a segment id per value, scatter min/max, index_add."""
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
    return _entropy_of_counts(counts.view(n, bins), sizes, finite)


def _entropy_of_counts(counts: Tensor, sizes: Tensor, finite: Tensor | None = None) -> Tensor:
    # An empty segment has no values and no information: entropy 0, not 0/0. A segment holding
    # NaN or Inf has no entropy: NaN, on every route.
    sizes = sizes.to(device=counts.device, dtype=torch.float32).clamp(min=1)
    p = counts.float() / sizes.unsqueeze(1)
    h = -torch.special.xlogy(p, p).sum(dim=1)
    return h if finite is None else h.masked_fill(~finite.to(h.device), math.nan)


_F32_MAX = torch.finfo(torch.float32).max


def _finite_segments(x: Tensor, sizes: Tensor) -> Tensor:
    """Per segment of a flat tensor, whether it is free of NaN and Inf in its own dtype."""
    ok = x.isfinite().to(torch.float32)
    return torch.segment_reduce(ok, "min", lengths=sizes.to(x.device), initial=1.0) > 0


def segment_entropy(
    values: Tensor, lengths: Sequence[int], *, bins: int = BINS, route: str = "auto"
) -> Tensor:
    """Entropy of each contiguous segment of a flat tensor, all segments at once.

    Args:
        values: 1-d tensor; scored in float32 whatever its dtype.
        lengths: length of each segment, in order; they must add up to ``values.numel()``.
        bins: number of equal-width bins over each segment's ``[min, max]`` (default 10).
        route: the kernels (:func:`graftopt.kernels.route`; default the fastest here).

    Returns:
        float32 tensor of shape ``(len(lengths),)``; a constant segment scores 0, one holding
        NaN or Inf scores NaN (on every route). Float64 segments beyond float32's range are
        scaled into it first.
    """
    check_bins(bins)
    x = values.reshape(-1)
    sizes = torch.tensor(list(lengths), dtype=torch.long)
    path = kernels.route(x.device, route)
    beyond = x.dtype == torch.float64 and bool(x.abs().nan_to_num(0.0, 0.0).max() > _F32_MAX)
    if path == "c" and not beyond:
        from .kernels import cpu as ck

        x = x.contiguous() if x.dtype in ck.DTYPES else x.float().contiguous()
        parts = torch.split(x, list(lengths))
        counts, finite = ck.segment_histogram(parts, [1] * len(parts), bins=bins)
        return _entropy_of_counts(counts, sizes, finite)
    finite = _finite_segments(x, sizes)
    if beyond:  # into float32's range: equal-width bins do not change with a positive scale
        seg = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(x.device)
        top = torch.segment_reduce(x.abs().nan_to_num(0.0, 0.0), "max", lengths=sizes.to(
            x.device), initial=0.0)  # fmt: skip
        x = x / torch.where(top > _F32_MAX, top, 1.0)[seg]
    x = x.float()
    if path == "triton":
        from .kernels import triton as tk

        return _entropy_of_counts(tk.segment_histogram(x, lengths, bins=bins), sizes, finite)
    return _segment_entropy_torch(x, lengths, bins, finite)


def entropies(
    tensors: Sequence[Tensor],
    *,
    rows: Sequence[int] | None = None,
    bins: int = BINS,
    route: str = "auto",
) -> Tensor:
    """Entropy of many tensors at once, or of each slice of their first dimension.

    Args:
        tensors: tensors of one device, any floating dtype and memory format.
        rows: per tensor, 1 for one score of the whole tensor, or ``t.shape[0]`` for one score per
            slice ``t[j]`` (per filter); default all 1.
        bins: number of equal-width bins (default 10).
        route: the kernels (:func:`graftopt.kernels.route`; default the fastest here).

    Returns:
        float32 ``(sum(rows),)``: the scores in order, as :func:`segment_entropy` gives them.
    """
    from .kernels.plans import EntropyPlan

    if not tensors:
        return torch.zeros(0)
    return EntropyPlan(tensors, rows=rows, bins=bins, route=route)(tensors)


def entropy(tensor: Tensor, *, bins: int = BINS, route: str = "auto") -> Tensor:
    """Entropy of one tensor's values over ``bins`` equal-width bins (a 0-d float32 tensor)."""
    return segment_entropy(tensor.reshape(-1), [tensor.numel()], bins=bins, route=route)[0]


def row_entropy(rows: Tensor, *, bins: int = BINS, route: str = "auto") -> Tensor:
    """Entropy of each row of a 2-d tensor (one score per filter at filter level)."""
    f, k = rows.shape
    return segment_entropy(rows.reshape(-1), [k] * f, bins=bins, route=route)


def graft_alpha(
    score_host: Tensor, score_peer: Tensor, *, A: float = PAPER_A, c: float = PAPER_C
) -> Tensor:
    """The host's share ``0.5 + A/pi * arctan(c * (score_host - score_peer))``.

    It lies in ``(0.5 - A/2, 0.5 + A/2)``.
    """
    return 0.5 + (A / math.pi) * torch.atan(c * (score_host.float() - score_peer.float()))


def mix(
    host: Tensor, peers: Sequence[Tensor], alphas: Sequence[Tensor], *, axis: int | None = None
) -> Tensor:
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


def row_length(t: Tensor, axis: int | None) -> int:
    """Values per alpha of a tensor blended along dim ``axis`` (0 or None): 0 for one alpha."""
    if axis is None or not t.dim() or not t.shape[0]:
        return 0
    return t.numel() // t.shape[0]


def _alpha_view(alphas: Tensor, column: int, axis: int | None, host: Tensor) -> Tensor:
    """``(m, ...)`` alphas of one tensor, shaped to broadcast against ``(m, *host.shape)``."""
    if axis is None:
        return alphas[:, column].reshape([-1] + [1] * host.dim())
    n = host.shape[axis]
    shape = [1] * (host.dim() + 1)
    shape[0], shape[axis + 1] = -1, n
    return alphas[:, column : column + n].reshape(shape)


def mix_many(
    hosts: Sequence[Tensor],
    peers: Sequence[Sequence[Tensor]],
    alphas: Tensor,
    columns: Sequence[int],
    axes: Sequence[int | None],
    *,
    out: Sequence[Tensor | None] | None = None,
    plan: Any = None,
    route: str = "auto",
) -> tuple[list[Tensor], Tensor]:
    """:func:`mix` for many tensors at once, and whether each input was finite.

    Args:
        hosts: the host's tensors.
        peers: per peer, tensors matching ``hosts``.
        alphas: float32 ``(m, K)``, the host's share against each of the ``m`` peers.
        columns: per tensor, its column in ``alphas`` (the first one when ``axes`` gives an axis).
        axes: per tensor, ``None`` for one alpha per peer (``alphas[:, c]``), or the axis along
            which slice ``i`` takes ``alphas[:, c + i]``.
        out: optional destinations (of the hosts' shape, dtype and strides) to write into, so a
            caller can reuse them round after round; ``None`` entries are allocated.
        plan: a :class:`~graftopt.kernels.plans.MixPlan` built for these tensors, so that a
            caller blending the same tensors round after round sorts them into paths only once.
        route: the kernels of a plan built here (:func:`graftopt.kernels.route`).

    Returns:
        ``(blended, finite)``: the new tensors, and a bool ``(T,)`` tensor on the hosts' device,
        False where the host's or a peer's tensor holds a NaN or Inf (that blend is then garbage).

    On CPU, same-dtype float32/float64 tensors of one layout go through one C kernel that gives
    :func:`mix`'s result bit for bit; on other devices the blend runs as ``torch._foreach_*`` ops
    (equal to :func:`mix` within float rounding); anything else (mixed dtypes or devices, half
    precision, filter axes other than the outermost) falls back to :func:`mix` per tensor.
    """
    from .kernels.plans import MixPlan

    if not peers:
        raise ValueError("mix_many() needs at least one peer")
    if plan is None:
        plan = MixPlan(hosts, peers, columns, axes, route)
    else:
        plan.check(hosts, peers)
    return plan.run(hosts, peers, alphas, out)
