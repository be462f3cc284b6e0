"""One host's round: scores of every unit, alphas, and the blend, as a pure function of the
tensors it reads.

A :class:`Grafter` plans a round (:meth:`~Grafter.plan`: scores and alphas, no blending) and
blends it into buffers (:meth:`~Grafter.blend`) or leaves the blend to
:mod:`graftopt.inplace`. What depends only on the layout of the tensors (kernel arguments, paths,
alpha columns) is built once per layout and checked each round against a key per model.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import functional as F
from . import kernels
from .adapters.base import TensorRefs, Unit, tensor_table
from .criteria import CRITERIA
from .diagnostics import RoundRecord
from .kernels import cpu
from .kernels.plans import EntropyPlan, MixPlan
from .matching import ChannelSpaces, matched
from .peers import PeerSource
from .settings import GraftSettings

__all__ = ["Blend", "Grafter", "RoundPlan"]


def toward_blend(table: Tensor, rate: float) -> Tensor:
    """Alphas that move the host ``rate`` of the way from its weights to the blend.

    The blend is linear in the alphas: ``W + r (blend(alpha) - W) = blend(1 - r (1 - alpha))``,
    so every mix path (C kernel, in place, torch) blends gently from the rewritten table.
    """
    return table if rate == 1.0 else 1.0 - rate * (1.0 - table)


def _rows(tensors: Sequence[Tensor], axes: Sequence[int | None]) -> Tensor:
    """Scored tensors as one float32 matrix with a row per filter."""
    parts = []
    for t, ax in zip(tensors, axes, strict=True):
        t = t.detach().float()
        parts.append(t.movedim(ax or 0, 0).reshape(t.shape[ax or 0], -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class Blend:
    """A computed, not yet written, round of one host (see :meth:`Grafter.blend`).

    Attributes:
        values: per tensor, its blended value (buffers the grafter reuses next round).
        unit_ok: bool ``(units,)`` on the weights' device: False for a unit holding NaN or Inf in
            the host or a peer; such a unit is left as it was when the blend is written.
        record: the round's record, with ``skipped`` still empty.
    """

    values: list[Tensor]
    unit_ok: Tensor
    record: RoundRecord


# A model's unit scores, filter counts per unit, and which units' scored tensors are finite.
_Scores = tuple[Tensor, list[int], Tensor | None]


@dataclass
class RoundPlan:
    """A scored and weighed, not yet blended, round of one host (see :meth:`Grafter.plan`).

    Attributes:
        host, peers: the tensors the round reads.
        table: float32 ``(peers, columns)`` alphas as the mix reads them.
        record: the round's record.
        key: what the plan depends on (settings, the layout of the host and of each peer).
        mixer: how the tensors blend.
        scored_finite: per model (host first), per unit whether its scored tensors are finite,
            or ``None`` where the scoring path does not tell.
    """

    host: Sequence[Tensor]
    peers: Sequence[Sequence[Tensor]]
    table: Tensor
    record: RoundRecord
    key: tuple
    mixer: MixPlan
    scored_finite: list[Tensor | None]

    @property
    def layouts(self) -> list[_Key]:
        """The layout key of the host and of each peer (``key`` is ``((settings, host layout,
        slots), *peer layouts)``)."""
        return [self.key[0][1], *self.key[1:]]


def _probed(tensors: Sequence[Tensor]) -> list[bool]:
    """Per tensor, whether the C finite probe reads it."""
    return [t.device.type == "cpu" and t.dtype in cpu.DTYPES and cpu.dense(t) for t in tensors]


def _finite(tensors: Sequence[Tensor], probe: cpu.Finite | None) -> Tensor:
    """bool ``(T,)`` on CPU: whether each tensor is free of NaN and Inf (``probe``: the C probe
    built for these tensors when the route is C and they all take it, else torch reads each)."""
    if probe is not None:
        return probe.run()
    return torch.stack([t.isfinite().all().cpu() for t in tensors])


def _fits(buffer: Tensor, t: Tensor) -> bool:
    """Whether a kept blend buffer can take ``t``'s blend."""
    same = buffer.shape == t.shape and buffer.stride() == t.stride()
    return same and buffer.dtype == t.dtype and buffer.device == t.device


_shape, _dtype, _device = (operator.attrgetter(a) for a in ("shape", "dtype", "device"))


def _layout(tensors: Sequence[Tensor]) -> tuple:
    """What a plan built for ``tensors`` depends on: per tensor its memory, layout and dtype.

    Tensors replaced after wrapping (``model.to()``, ``load_state_dict``, a new ``.data``) differ
    in some entry, so a plan made for the old ones is never used for them.
    """
    ts = list(tensors)
    return (
        tuple(map(Tensor.data_ptr, ts)),
        tuple(map(_shape, ts)),
        tuple(map(Tensor.stride, ts)),
        tuple(map(_dtype, ts)),
        tuple(map(_device, ts)),
    )


class _Key:
    """A plan key that hashes once; keys of equal value found round after round are interned
    (see :meth:`Grafter._layout_key`), so comparing them is an identity check."""

    __slots__ = ("_hash", "value")

    def __init__(self, value: tuple) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, _Key) and self._hash == other._hash and self.value == other.value


class Grafter:
    """Blends one host with its peers, unit by unit.

    A round scores every unit of the host and of each peer in one batched call, computes all
    alphas as one tensor and blends every tensor through :func:`graftopt.functional.mix_many`;
    nothing in it waits for the device.

    Args:
        host: the unwrapped host model.
        units: the host's units from its adapter.
        peers: where the peers' tensors come from.
        settings: the round's hyper-parameters.
    """

    def __init__(
        self, host: nn.Module, units: Sequence[Unit], peers: PeerSource, settings: GraftSettings
    ) -> None:
        if not units:
            raise ValueError(f"{type(host).__name__} has no graft units (no conv or linear layers)")
        self.host = host
        self.units = list(units)
        self.peers = peers
        self.settings = settings
        self.criterion = CRITERIA[settings.criterion]
        # The fraction of the way to the blend the next round moves the host (1: the paper).
        self.rate = 1.0
        # Channel spaces to match each peer's filters to the host's by, or None (no matching).
        self.spaces: ChannelSpaces | None = None
        self.names = [n for u in self.units for n in u.members]
        table = tensor_table(host)
        missing = [n for n in self.names if n not in table]
        if missing:
            raise ValueError(f"the adapter named tensors the host does not have: {missing[:5]}")
        self._index = {n: i for i, n in enumerate(self.names)}
        self._refs = TensorRefs(host, self.names)
        kernels.route(self._refs.get()[0].device, settings.route)  # refuses one that cannot run
        self._unit_of = torch.tensor([k for k, u in enumerate(self.units) for _ in u.members])
        # Members no score reads: their NaN/Inf check is a pass of its own.
        self._unscored = [
            i
            for i, (u, n) in enumerate((u, n) for u in self.units for n in u.members)
            if n not in u.scored
        ]
        self._unscored_units = self._unit_of[self._unscored]
        self._scored_finite: list[Tensor | None] = []
        # The finite probes of the tensors read last round, by layout (pointers included).
        self._probes: dict[tuple, cpu.Finite | None] = {}
        # Blend destinations, reused from round to round on CPU: the one copy simultaneity
        # needs, without fresh allocations each round.
        self._out: list[Tensor | None] = [None] * len(self.names)
        self._unit_names = tuple(u.name for u in self.units)
        # Work that depends only on the layout of the tensors, done once per layout and used
        # while :func:`_layout` of the round's tensors matches the key it was made for.
        self._score_plans: dict[tuple, tuple] = {}  # scores of one model's tensors
        self._used_plans: dict[tuple, tuple] = {}  # those used this round
        self._host_plan: tuple | None = None  # (key, columns, axes, lengths)
        self._fit: tuple | None = None  # (host key, which kept buffers fit)
        self._out_key: tuple | None = None  # the host key the kept buffers were made for
        self._mix: tuple | None = None  # (key, MixPlan)
        self._interned: dict[tuple, _Key] = {}  # layout keys by tensor ids, last round
        self._seen: dict[tuple, _Key] = {}  # those made this round

    def _layout_key(self, tensors: Sequence[Tensor], memo: dict | None = None) -> _Key:
        """:func:`_layout` of ``tensors`` as a :class:`_Key`, the very key of an earlier round
        when the same tensors kept their layout. ``memo``: keys already made in this commit."""
        ids = tuple(map(id, tensors))
        if memo is not None and ids in memo:
            key = memo[ids][1]
        else:
            value = _layout(tensors)
            old = self._interned.get(ids)
            key = old if old is not None and old.value == value else _Key(value)
            if memo is not None:
                memo[ids] = (tensors, key)  # the tensors stay alive, so their ids stay theirs
        self._seen[ids] = key
        return key

    def live(self) -> list[Tensor]:
        """The host's unit tensors themselves (the ones a round writes)."""
        return self._refs.get()

    def _scores(self, tensors: Sequence[Tensor], level: str, score: Callable) -> _Scores:
        rows = []
        for u in self.units:
            idx = [self._index[n] for n in u.scored]
            r = _rows([tensors[i] for i in idx], [u.axis_of(n) for n in u.scored])
            rows.append(r.reshape(1, -1) if level == "layer" else r)
        slots = [r.shape[0] for r in rows]
        flat = torch.cat([r.reshape(-1) for r in rows])
        sizes = [r.shape[1] for r in rows for _ in range(r.shape[0])]
        return score(flat, torch.tensor(sizes)), slots, None

    def _entropy_plan(self, tensors: Sequence[Tensor], level: str) -> tuple:
        """How every unit's entropy is read from tensors of this layout, and its row count."""
        spec: list[int | tuple[list[int], list[int | None]]] = []
        rows, fresh = [], []
        for k, u in enumerate(self.units):
            idx = [self._index[n] for n in u.scored]
            ax = u.axis_of(u.scored[0]) or 0
            first = tensors[idx[0]]
            if len(idx) == 1 and (level == "layer" or ax == 0):
                spec.append(idx[0])  # scored where it lies, whatever its layout
                rows.append(1 if level == "layer" or first.dim() == 0 else first.shape[0])
            else:
                spec.append((idx, [u.axis_of(n) for n in u.scored]))  # (filters, values)
                fresh.append(k)
                rows.append(1 if level == "layer" else first.shape[ax])
        direct = None if fresh else [s for s in spec if isinstance(s, int)]
        sources = self._sources(tensors, spec, direct)
        s = self.settings
        plan = EntropyPlan(sources, rows=rows, bins=s.bins, fresh=fresh, route=s.route)
        unit_of_row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
        return spec, direct, rows, plan, unit_of_row

    @staticmethod
    def _sources(
        tensors: Sequence[Tensor], spec: Sequence, direct: list[int] | None
    ) -> list[Tensor]:
        if direct is not None:
            return [tensors[i] for i in direct]
        return [
            tensors[s] if isinstance(s, int) else _rows([tensors[i] for i in s[0]], s[1])
            for s in spec
        ]

    def _entropy_scores(self, tensors: Sequence[Tensor], level: str, key: tuple) -> _Scores:
        """Every unit's entropy (per filter at filter level) in one batched call."""
        plan = self._score_plans.get(key) or self._entropy_plan(tensors, level)
        self._used_plans[key] = plan
        spec, direct, rows, entropies, unit_of_row = plan
        scores, finite = entropies.run(self._sources(tensors, spec, direct))
        if finite is not None:
            ok = torch.ones(len(rows), dtype=torch.bool, device=finite.device)
            finite = ok.scatter_reduce(0, unit_of_row.to(finite.device), finite, "amin")
        return scores, rows, finite

    def _cached_scores(
        self, tensors: Sequence[Tensor], cache: dict | None, layout: tuple | None = None
    ) -> _Scores:
        s = self.settings
        score = self.criterion.row_score
        if cache is None and score is not None:
            return self._scores(tensors, s.level, score)
        # Within one commit no tensor changes, so a model scored as a host is not scored again
        # as another host's peer.
        key = (s.level, score, s.bins, self._layout_key(tensors) if layout is None else layout)
        if cache is not None and key in cache:
            if key in self._score_plans:  # kept for the rounds where this grafter scores it
                self._used_plans[key] = self._score_plans[key]
            return cache[key]
        if score is None:
            scores = self._entropy_scores(tensors, s.level, key)
        else:
            scores = self._scores(tensors, s.level, score)
        if cache is not None:
            cache[key] = scores
        return scores

    def _alphas(
        self,
        host: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        cache: dict | None = None,
        layouts: Sequence[tuple] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """``layouts``: :func:`_layout` of the host and of each peer, when the caller has them.

        Leaves in ``_scored_finite``, per model (host first), which units' scored tensors are
        free of NaN and Inf (``None`` where the scoring path does not tell).
        """
        s = self.settings
        lay = [None] * (len(peers) + 1) if layouts is None else layouts
        h_scores, slots, h_finite = self._cached_scores(host, cache, lay[0])
        scored = [self._cached_scores(p, cache, q) for p, q in zip(peers, lay[1:], strict=True)]
        p_scores = torch.stack([sc[0].to(h_scores.device) for sc in scored])
        self._scored_finite = [h_finite, *(sc[2] for sc in scored)]
        alphas = F.graft_alpha(h_scores.unsqueeze(0), p_scores, A=s.A, c=s.c)
        unit_alpha = self.criterion.unit_alpha
        if unit_alpha is not None:
            # Units without a norm scale keep the alpha of their scores.
            start = 0
            cols = []
            for u, n in zip(self.units, slots, strict=True):
                if u.gamma is None:
                    cols.append(alphas[:, start : start + n])
                else:
                    g = host[self._index[u.gamma]]
                    cols.append(
                        torch.stack(
                            [unit_alpha(g, p[self._index[u.gamma]].to(g.device)) for p in peers]
                        )
                    )
                start += n
            alphas = torch.cat(cols, dim=1)
        return h_scores, p_scores, alphas, slots

    def _check_writable(self) -> None:
        """Refuse, before anything is written, host tensors a round could not write whole."""
        for name, t in zip(self.names, self.live(), strict=True):
            if t.is_inference():
                raise ValueError(
                    f"{type(self.host).__name__}.{name} is an inference tensor (made under "
                    "torch.inference_mode()): a graft round cannot write it; clone the model's "
                    "tensors outside inference mode"
                )
            if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride(), strict=True)):
                raise ValueError(
                    f"{type(self.host).__name__}.{name} has shape {tuple(t.shape)} and stride "
                    f"{t.stride()}: its elements share memory (an expanded view), so a graft "
                    "round cannot write it; give it its own memory (.contiguous())"
                )

    def _check_shapes(self, layouts: Sequence[_Key]) -> None:
        """Refuse a peer tensor whose shape is not the host's (torch would broadcast it)."""
        host_shapes = layouts[0].value[1]
        for j, key in enumerate(layouts[1:]):
            for name, mine, theirs in zip(self.names, host_shapes, key.value[1], strict=True):
                if mine != theirs:
                    raise ValueError(
                        f"peer {j} of {type(self.host).__name__}: {name} has shape "
                        f"{tuple(theirs)}, the host's has {tuple(mine)} (was it replaced after "
                        "wrapping?); nothing was written"
                    )

    def _columns(
        self, host: Sequence[Tensor], slots: Sequence[int]
    ) -> tuple[list[int], list[int | None]]:
        """Per tensor, its column in the alpha table and its filter axis (None: one alpha)."""
        starts = list(itertools.accumulate(slots, initial=0))
        total = starts[-1]
        columns: list[int] = []
        axes: list[int | None] = []
        for k, (u, n) in enumerate(zip(self.units, slots, strict=True)):
            for name, axis in zip(u.members, u.axes, strict=True):
                t = host[self._index[name]]
                if self.settings.level == "layer":
                    columns.append(k)
                    axes.append(None)
                elif axis is None or t.dim() == 0 or t.shape[axis] != n:
                    columns.append(total + k)  # the unit's mean filter alpha
                    axes.append(None)
                else:
                    columns.append(starts[k])
                    axes.append(axis)
        return columns, axes

    @torch.no_grad()
    def plan(
        self,
        host: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        *,
        cache: dict | None = None,
    ) -> RoundPlan:
        """Score and weigh a round without blending and without waiting for the device.

        ``cache`` (one dict per commit) shares the scores of a model between the hosts that
        read it in one round.
        """
        self._refs.check()  # the host's module tree is still the one its units came from
        if self.spaces is not None:
            peers = [self._matched(host, p) for p in peers]
        memo = {} if cache is None else cache.setdefault("layout keys", {})
        layouts = [self._layout_key(host, memo), *(self._layout_key(p, memo) for p in peers)]
        self._used_plans = {}
        try:
            h_scores, p_scores, alphas, slots = self._alphas(host, peers, cache, layouts)
        finally:
            # Plans and keys of tensors no longer read are dropped.
            self._score_plans = self._used_plans
            self._interned, self._seen = self._seen, {}
        host_key = (self.settings, layouts[0], tuple(slots))
        if self._host_plan is None or self._host_plan[0] != host_key:
            self._check_writable()
            columns, axes = self._columns(host, slots)
            lengths = torch.tensor(slots, device=alphas.device)
            self._host_plan = (host_key, columns, axes, lengths)
        _, columns, axes, lengths = self._host_plan
        table = alphas
        if self.settings.level == "filter":
            lengths = lengths.to(alphas.device)
            means = torch.segment_reduce(alphas.t().contiguous(), "mean", lengths=lengths).t()
            table = torch.cat([alphas, means], dim=1)
        table = toward_blend(table, self.rate)
        mix_key = (host_key, *layouts[1:])
        if self._mix is None or self._mix[0] != mix_key:
            self._check_shapes(layouts)  # tensors replaced since the last round
            mixer = MixPlan(host, peers, columns, axes, self.settings.route)
            self._mix = (mix_key, mixer)
        record = RoundRecord(0, 0, self._unit_names, tuple(slots), h_scores, p_scores, alphas)
        return RoundPlan(host, peers, table, record, mix_key, self._mix[1], self._scored_finite)

    def _matched(self, host: Sequence[Tensor], peer: Sequence[Tensor]) -> list[Tensor]:
        """``peer`` with its filters in the order that best matches the host's (new tensors
        where anything moved; the peer's own tensors are never written)."""
        h = dict(zip(self.names, host, strict=True))
        moved = matched(self.spaces, h, dict(zip(self.names, peer, strict=True)))
        return [moved[n] for n in self.names]

    @torch.no_grad()
    def blend(
        self,
        host: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        *,
        cache: dict | None = None,
    ) -> Blend:
        """Blend without writing and without waiting for the device.

        ``cache`` (one dict per commit) shares the scores of a model between the hosts that
        read it in one round. The values are valid until the next call.
        """
        return self.blend_planned(self.plan(host, peers, cache=cache))

    @torch.no_grad()
    def blend_planned(self, plan: RoundPlan) -> Blend:
        """The blend of a :meth:`plan` into buffers (see :meth:`blend`)."""
        host, peers, mixer = plan.host, plan.peers, plan.mixer
        host_key = plan.key[0]
        out = self._kept(host, host_key)
        values, finite = F.mix_many(
            host, peers, plan.table, mixer.columns, mixer.axes, out=out, plan=mixer
        )
        # Kept only on CPU, where fresh buffers cost page faults; CUDA's caching allocator
        # already reuses memory, and keeping them there would hold a weight copy between rounds.
        on_cpu = bool(values) and values[0].device.type == "cpu"
        self._out = list(values) if on_cpu else [None] * len(self.names)
        self._out_key = host_key
        unit_of = self._unit_of.to(finite.device)
        unit_ok = torch.ones(len(self.units), dtype=torch.bool, device=finite.device)
        unit_ok = unit_ok.scatter_reduce(0, unit_of, finite, "amin")
        return Blend(values, unit_ok, plan.record)

    def unit_ok(self, plan: RoundPlan) -> Tensor:
        """bool ``(units,)`` on CPU: units whose tensors are finite in the host and in every
        peer, read before anything is blended."""
        ok = torch.ones(len(self.units), dtype=torch.bool)
        kept, self._probes = self._probes, {}
        models = [plan.host, *plan.peers]
        for tensors, scored, layout in zip(models, plan.scored_finite, plan.layouts, strict=True):
            if scored is None:
                idx, units = range(len(self.names)), self._unit_of
            else:
                ok = torch.logical_and(ok, scored)
                idx, units = self._unscored, self._unscored_units
            if not idx:
                continue
            sub = [tensors[i] for i in idx]
            key = (layout, scored is None)
            if key not in kept:
                c = kernels.route(sub[0].device, self.settings.route) == "c"
                kept[key] = cpu.Finite(sub) if c and all(_probed(sub)) else None
            self._probes[key] = kept[key]
            ok = ok.scatter_reduce(0, units, _finite(sub, kept[key]), "amin")
        return ok

    def per_tensor(self, unit_flags: Tensor) -> Tensor:
        """Per-unit flags spread to the unit's tensors (in :attr:`names` order)."""
        return unit_flags[self._unit_of.to(unit_flags.device)]

    def release(self) -> None:
        """Drop the kept blend buffers (a round wrote in place and needs none)."""
        if self._mix is not None:
            self._mix[1].release()
        self._out = [None] * len(self.names)
        self._out_key = self._fit = None

    def _kept(self, host: Sequence[Tensor], host_key: tuple) -> list[Tensor | None]:
        """The kept blend buffers that can take this round's blends (None for the others)."""
        if self._fit is not None and self._fit[0] == host_key:
            # A blend's buffer takes the layout of its host, so buffers made for hosts of this
            # layout fit as they did when checked.
            fit = self._fit[1]
            if fit is True:
                return self._out
            return [o if ok else None for o, ok in zip(self._out, fit, strict=True)]
        fit = [o is not None and _fits(o, h) for o, h in zip(self._out, host, strict=True)]
        if self._out_key == host_key and all(o is not None for o in self._out):
            self._fit = (host_key, True if all(fit) else fit)
        return [o if ok else None for o, ok in zip(self._out, fit, strict=True)]

    def skipped(self, blend: Blend | Tensor) -> tuple[str, ...]:
        """Names of the units left as they were, from a blend or its ``unit_ok`` (reading it is
        the round's one host sync)."""
        unit_ok = blend.unit_ok if isinstance(blend, Blend) else blend
        if unit_ok.all():
            return ()
        return tuple(u.name for u, ok in zip(self.units, unit_ok.tolist(), strict=True) if not ok)

    @torch.no_grad()
    def write(self, blend: Blend, snapshot: dict[str, Tensor] | None = None) -> None:
        """Write a blend into the host, leaving units with NaN or Inf as they were.

        ``snapshot``: the host's weights at its round step when it has stepped on since; the
        graft is then applied as a change.
        """
        live = self.live()
        ok = blend.unit_ok[self._unit_of.to(blend.unit_ok.device)]
        if ok.device.type == "cpu":
            # On CPU the flags are already in host memory: reading them waits for nothing.
            if snapshot is None and all(blend.unit_ok.tolist()):
                torch._foreach_copy_(live, blend.values)
                return
            keep = [i for i, good in enumerate(ok.tolist()) if good]
            if snapshot is None and keep:  # none kept: every unit was skipped
                torch._foreach_copy_([live[i] for i in keep], [blend.values[i] for i in keep])
            else:
                for i in keep:
                    live[i].add_(blend.values[i].to(live[i].dtype) - snapshot[self.names[i]])
            return
        for i, (t, value, good) in enumerate(zip(live, blend.values, ok.unbind(), strict=True)):
            new = value.to(t.dtype)
            if snapshot is not None:
                new = t + (new - snapshot[self.names[i]])
            torch.where(good, new, t, out=t)
