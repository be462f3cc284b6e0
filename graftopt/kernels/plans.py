"""The round's per-layout plans: what scoring and mixing tensors of one layout needs, built once.

An :class:`EntropyPlan` and a :class:`MixPlan` hold the C kernels' pointer arrays for the tensors
they were built for (checked against each call's tensors, or keyed by the caller), the path each
tensor takes (:func:`graftopt.kernels.route`), and the destinations kept between rounds. The math
they run is :mod:`graftopt.functional`'s.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..functional import (
    BINS,
    _alpha_view,
    _entropy_of_counts,
    mix,
    row_length,
    segment_entropy,
)

__all__ = ["DtypeGroup", "EntropyPlan", "MixPlan"]


def _c_kernels(device: torch.device, route: str):
    """The C kernels module where ``route`` resolves to them on ``device``, else None."""
    if kernels.route(device, route) != "c":
        return None
    from . import cpu

    return cpu


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


def _dense(t: Tensor) -> bool:
    if t.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


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
