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
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .criteria import bn_alpha, segment_l1
from .settings import DEFAULTS, check

__all__ = [
    "EntropyPlan",
    "MixPlan",
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


def _c_kernels(device: torch.device, route: str):
    """The C kernels module where ``route`` resolves to them on ``device``, else None."""
    if kernels.route(device, route) != "c":
        return None
    from .kernels import cpu

    return cpu


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


def _bound(tensors: Sequence[Tensor], fresh: set[int] | frozenset[int] = frozenset()) -> tuple:
    """Memory (except at ``fresh`` positions), shape, strides and dtype of each tensor."""
    return tuple(
        (None if i in fresh else t.data_ptr(), t.shape, t.stride(), t.dtype)
        for i, t in enumerate(tensors)
    )


class EntropyPlan:
    """:func:`entropies` for tensors of one layout: what depends only on the layout, done once.

    Call it with tensors of the layout it was built for and, except at the positions in
    ``fresh``, the same data pointers (the same tensors, read again); ``fresh`` marks positions
    that hold a new tensor of that layout at each call.

    Args:
        tensors: as for :func:`entropies`.
        rows: as for :func:`entropies`.
        bins: as for :func:`entropies`.
        fresh: positions whose tensor is a new one at each call.
        route: the kernels (:func:`graftopt.kernels.route`).
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        *,
        rows: Sequence[int] | None = None,
        bins: int = BINS,
        fresh: Sequence[int] = (),
        route: str = "auto",
    ) -> None:
        self.rows = [1] * len(tensors) if rows is None else list(rows)
        self.bins = bins
        self.route = route
        lengths = [t.numel() // r if r else 0 for t, r in zip(tensors, self.rows, strict=True)]
        self.sizes = [n for n, r in zip(lengths, self.rows, strict=True) for _ in range(r)]
        self.ck = _c_kernels(tensors[0].device, route) if tensors else None
        self.counts_of = torch.tensor(self.sizes, dtype=torch.float32)
        self.convert: list[int] = []
        self.repoint: list[int] = []
        if self.ck is not None:
            # Dense tensors go in as they lie in memory: the order of values inside a row does
            # not change its histogram, and dim 0 is outermost for contiguous and channels_last
            # alike.
            dtypes, dense = self.ck.DTYPES, self.ck.dense
            self.convert = [
                i for i, t in enumerate(tensors) if not (t.dtype in dtypes and dense(t))
            ]
            self.repoint = sorted(set(self.convert) | set(fresh))
        self.histogram = None
        self.fresh = set(fresh)
        # What the kernel arrays point at, once built: __call__ refuses other tensors (the
        # kernel would read the old ones' memory, perhaps freed by then).
        self._bound: tuple | None = None
        # The kernel reads float64 as float32: huge finite values would look like Inf.
        self.flags_exact = all(t.dtype != torch.float64 for t in tensors)

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        """The entropies of ``tensors``, as :func:`entropies` gives them; tensors other than
        those of the first call (at positions not in ``fresh``) raise ``ValueError``."""
        if self._bound is not None and _bound(tensors, self.fresh) != self._bound:
            raise ValueError(
                "this EntropyPlan was built for other tensors (their memory, shapes or dtypes "
                "differ): build a plan for these"
            )
        return self.run(tensors)[0]

    def run(self, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """The entropies, and per row whether it is free of NaN and Inf (``None`` where the
        path in use does not tell). Unchecked: for callers that key their plans by the
        tensors' layout themselves (the grafter); others call the plan."""
        if not tensors:
            return torch.zeros(0), None
        if self.ck is not None:
            srcs = list(tensors)
            for i in self.convert:
                srcs[i] = srcs[i].float().contiguous()
            if self.histogram is None:
                self.histogram = self.ck.Histogram(srcs, self.rows)
                self._bound = _bound(tensors, self.fresh)
            else:
                for i in self.repoint:
                    self.histogram.point(i, srcs[i])
            counts, finite = self.histogram.run(self.bins)
            if self.flags_exact:
                return _entropy_of_counts(counts, self.counts_of, finite), finite
            if bool(finite.all()):
                return _entropy_of_counts(counts, self.counts_of), None
            # A float64 row the kernel read as Inf may be finite: scored as segment_entropy does.
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        return segment_entropy(flat, self.sizes, bins=self.bins, route=self.route), None


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


def _dense(t: Tensor) -> bool:
    if t.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


def _alpha_view(alphas: Tensor, column: int, axis: int | None, host: Tensor) -> Tensor:
    """``(m, ...)`` alphas of one tensor, shaped to broadcast against ``(m, *host.shape)``."""
    if axis is None:
        return alphas[:, column].reshape([-1] + [1] * host.dim())
    n = host.shape[axis]
    shape = [1] * (host.dim() + 1)
    shape[0], shape[axis + 1] = -1, n
    return alphas[:, column : column + n].reshape(shape)


@dataclass
class DtypeGroup:
    """The tensors of one dtype that one C mix call blends, and its arrays once built.

    Attributes:
        idx: their positions among the plan's tensors.
        at: ``idx`` as a tensor (to scatter their finite flags).
        kernel: the C kernel's argument arrays (``kernels.cpu.Mix``), made at the first run.
        kept: the destinations ``kernel`` points at, while the caller hands them back.
    """

    idx: list[int]
    at: Tensor
    kernel: Any = None
    kept: list[Tensor] | None = None


class MixPlan:
    """:func:`mix_many`'s choice of path per tensor and its kernel arrays, made once per layout.

    Pass it to :func:`mix_many` for hosts and peers of the layouts it was built for, with the
    same data pointers (the same tensors, read again), and the same ``columns`` and ``axes``.
    """

    def __init__(
        self,
        hosts: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        columns: Sequence[int],
        axes: Sequence[int | None],
        route: str = "auto",
    ) -> None:
        T = len(hosts)
        self.count = T
        self.columns, self.axes = list(columns), list(axes)
        ck = _c_kernels(hosts[0].device, route) if T else None
        self.ck = ck

        def same(i: int) -> bool:
            h = hosts[i]
            return all(
                p[i].dtype == h.dtype and p[i].device == h.device and p[i].stride() == h.stride()
                and p[i].shape == h.shape for p in peers
            )  # fmt: skip

        fast, generic = [], []
        for i, h in enumerate(hosts):
            if h.dtype in (torch.float16, torch.bfloat16) or not same(i):
                continue
            if (
                ck is not None
                and h.device == hosts[0].device
                and h.dtype in (torch.float32, torch.float64)
                and _dense(h)
                and axes[i] in (None, 0)
            ):
                fast.append(i)
            elif ck is None or h.device != hosts[0].device:
                generic.append(i)
        # Per dtype: the tensors, their positions, and (made at the first run) the C kernel's
        # arrays with the destinations they point at.
        self.fast: list[DtypeGroup] = []
        for dtype in (torch.float32, torch.float64):
            idx = [i for i in fast if hosts[i].dtype == dtype]
            if idx:
                self.fast.append(DtypeGroup(idx, torch.tensor(idx, dtype=torch.long)))
        self.whole = len(self.fast) == 1 and len(fast) == T  # one kernel call covers every tensor
        self.generic = generic
        self.generic_at = torch.tensor(generic, dtype=torch.long)
        covered = set(fast) | set(generic)
        self.rest = [i for i in range(T) if i not in covered]
        self._bound: tuple | None = None  # the tensors of the first run (see check)
        self.rest_at = torch.tensor(self.rest, dtype=torch.long)

    @staticmethod
    def _bound_of(hosts: Sequence[Tensor], peers: Sequence[Sequence[Tensor]]) -> tuple:
        return (_bound(hosts), *(_bound(p) for p in peers))

    def check(self, hosts: Sequence[Tensor], peers: Sequence[Sequence[Tensor]]) -> None:
        """Raise ``ValueError`` for tensors other than those of the first run: the kernel
        arrays point at those."""
        if self._bound is not None and self._bound_of(hosts, peers) != self._bound:
            raise ValueError(
                "this MixPlan was built for other tensors (their memory, shapes or dtypes "
                "differ): build a plan for these"
            )

    def release(self) -> None:
        """Let go of the destinations kept from the last run (their memory can be freed)."""
        for group in self.fast:
            group.kept = None

    def _kernel(
        self,
        entry: DtypeGroup,
        hosts: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        out: list,
    ) -> tuple[list[Tensor], object]:
        """The destinations of one dtype's tensors and the kernel arrays pointing at them."""
        idx, kernel, kept = entry.idx, entry.kernel, entry.kept
        given = out if self.whole else [out[i] for i in idx]
        if kernel is not None and kept is not None and all(map(operator.is_, given, kept)):
            return kept, kernel
        dst = [o if o is not None else torch.empty_like(hosts[i]) for o, i in zip(given, idx)]
        if kernel is None:
            row_len = [row_length(hosts[i], self.axes[i]) for i in idx]
            kernel = self.ck.Mix(
                dst, [hosts[i] for i in idx], [[p[i] for i in idx] for p in peers],
                [self.columns[i] for i in idx], row_len,
            )  # fmt: skip
        else:
            kernel.aim(dst)
        entry.kernel = kernel
        # Destinations the caller handed in come back next round: the arrays then stay valid.
        # Fresh ones are not held, so the plan keeps no weight copy alive between rounds.
        entry.kept = dst if all(o is not None for o in given) else None
        return dst, kernel

    def run(
        self,
        hosts: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        alphas: Tensor,
        out: Sequence[Tensor | None] | None,
    ) -> tuple[list[Tensor], Tensor]:
        T = self.count
        m = len(peers)
        columns, axes = self.columns, self.axes
        if self._bound is None:
            self._bound = self._bound_of(hosts, peers)
        out = [None] * T if out is None else list(out)
        alphas = alphas.float()
        device = hosts[0].device if T else torch.device("cpu")
        if self.whole:
            dst, kernel = self._kernel(self.fast[0], hosts, peers, out)
            return list(dst), kernel.run(alphas).to(device)
        result: list[Tensor | None] = [None] * T
        finite = torch.empty(T, dtype=torch.bool, device=device)
        for entry in self.fast:
            idx, at = entry.idx, entry.at
            dst, kernel = self._kernel(entry, hosts, peers, out)
            finite[at] = kernel.run(alphas).to(device)
            for k, i in enumerate(idx):
                result[i] = dst[k]
        if self.generic:
            generic = self.generic
            hs = [hosts[i] for i in generic]
            views = [
                _alpha_view(alphas, columns[i], axes[i], hosts[i]).to(hosts[i]) for i in generic
            ]
            # (1/m) sum_j (a_j h + (1 - a_j) p_j) = mean_j(a_j) h + sum_j ((1 - a_j) / m) p_j
            # A list: kept destinations replace its items below (_foreach_mul gives a tuple).
            acc = list(torch._foreach_mul(hs, [v.mean(0) for v in views]))
            for j, p in enumerate(peers):
                torch._foreach_addcmul_(
                    acc, [p[i] for i in generic], [(1 - v[j]) / m for v in views]
                )
            norms = torch._foreach_norm(hs + [p[i] for p in peers for i in generic], math.inf)
            ok = torch.stack(norms).isfinite().view(m + 1, len(generic)).all(0)
            for k, i in enumerate(generic):
                if out[i] is not None:
                    out[i].copy_(acc[k])
                    acc[k] = out[i]
                result[i] = acc[k]
            finite[self.generic_at.to(device)] = ok.to(device)
        if self.rest:
            flags = []
            for i in self.rest:
                h = hosts[i]
                ax = axes[i]
                a = _alpha_view(alphas, columns[i], ax, h)
                per_peer = [
                    a[j].reshape(-1) if ax is not None else a[j].reshape(()) for j in range(m)
                ]
                result[i] = mix(h, [p[i] for p in peers], per_peer, axis=ax)
                checks = [torch.isfinite(t).all() for t in (h, *(p[i].to(h.device) for p in peers))]
                # Peers of another dtype can hold finite values the host's dtype cannot.
                checks.append(torch.isfinite(result[i]).all())
                flags.append(torch.stack(checks).all().to(device))
            finite[self.rest_at.to(device)] = torch.stack(flags)
        return result, finite  # type: ignore[return-value]


def mix_many(
    hosts: Sequence[Tensor],
    peers: Sequence[Sequence[Tensor]],
    alphas: Tensor,
    columns: Sequence[int],
    axes: Sequence[int | None],
    *,
    out: Sequence[Tensor | None] | None = None,
    plan: MixPlan | None = None,
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
        plan: a :class:`MixPlan` built for these tensors, so that a caller blending the same
            tensors round after round sorts them into paths only once.
        route: the kernels of a plan built here (:func:`graftopt.kernels.route`).

    Returns:
        ``(blended, finite)``: the new tensors, and a bool ``(T,)`` tensor on the hosts' device,
        False where the host's or a peer's tensor holds a NaN or Inf (that blend is then garbage).

    On CPU, same-dtype float32/float64 tensors of one layout go through one C kernel that gives
    :func:`mix`'s result bit for bit; on other devices the blend runs as ``torch._foreach_*`` ops
    (equal to :func:`mix` within float rounding); anything else (mixed dtypes or devices, half
    precision, filter axes other than the outermost) falls back to :func:`mix` per tensor.
    """
    if not peers:
        raise ValueError("mix_many() needs at least one peer")
    if plan is None:
        plan = MixPlan(hosts, peers, columns, axes, route)
    else:
        plan.check(hosts, peers)
    return plan.run(hosts, peers, alphas, out)
