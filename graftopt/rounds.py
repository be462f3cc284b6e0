"""How rounds run: simultaneous rounds of the models of one process, and one round as a call.

A :class:`Participant` counts one host's steps; its :class:`RoundGroup`, the in-process models
linked to it by peer relations, commits each round when all of them arrived, so that each blend
of round ``r`` reads weights as they were after each model's own ``r * every``-th step, before
any round-``r`` write, whatever order the models step in. Each host's round is planned by its
:class:`~graftopt.grafter.Grafter`.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .adapters import Adapter, get_adapter
from .adapters.base import nonempty, unwrap, validate_units
from .adapters.channels import channel_spaces
from .diagnostics import RoundRecord, user_stacklevel
from .grafter import Grafter, RoundPlan
from .inplace import InPlaceRound, in_place_round
from .peers import ModulePeers, read_tensors
from .settings import DEFAULTS, GraftSettings

__all__ = ["Participant", "RoundGroup", "graft_"]

_D = DEFAULTS


def graft_(
    host: nn.Module,
    peers: Sequence[nn.Module],
    *,
    A: float = _D.A,
    c: float = _D.c,
    bins: int = _D.bins,
    level: str = _D.level,
    criterion: str = _D.criterion,
    adapter: Adapter | None = None,
    rate: float = _D.rate,
    align: bool = _D.align,
    route: str = _D.route,
) -> RoundRecord:
    """Graft ``host`` from ``peers`` once, now: one round of :class:`GraftOptimizer`, as a call.

    For loops of one's own: the peers are read as they are and never written; the host is
    blended in place, unit by unit, with the same math, checks and NaN/Inf handling as a
    round of the optimizer. Arguments are those of :class:`~graftopt.GraftOptimizer`.

    Example::

        record = graftopt.graft_(model, [peer1, peer2], level="filter")
        print(record.mean_alpha())
    """
    settings = GraftSettings(
        A=A, c=c, bins=bins, level=level, criterion=criterion, rate=rate, align=align,
        route=route,
    )  # fmt: skip
    host = unwrap(host)
    adapter = adapter if adapter is not None else get_adapter(host)
    units = adapter.units(host)
    validate_units(host, units)
    units = nonempty(host, units)
    source = ModulePeers(list(peers))
    source.bind(host, units, adapter)
    grafter = Grafter(host, units, source, settings)
    grafter.rate = float(rate)
    if align:
        grafter.spaces = channel_spaces(host)
    plan = grafter.plan(read_tensors(host, grafter.names), source.fetch(grafter.names))
    (unit_ok,) = _write_round([grafter], [plan], [None])
    record = dataclasses.replace(plan.record, skipped=grafter.skipped(unit_ok))
    _warn_skipped(record, host)
    return record


def _write_round(
    grafters: Sequence[Grafter],
    plans: Sequence[RoundPlan],
    snapshots: Sequence[dict[str, Tensor] | None],
    kept: list[InPlaceRound | None] | None = None,
) -> list[Tensor]:
    """Blend and write the planned rounds of a group; per host, its ``unit_ok``.

    In place where the tensors allow it (see :mod:`graftopt.inplace`), through buffers
    otherwise. ``kept``: a one-item list holding the in-place round of an earlier call, updated.
    """
    if all(s is None for s in snapshots):
        ip = in_place_round(plans, kept[0] if kept else None)
        if kept is not None:
            kept[0] = ip
        if ip.possible:
            return ip.run(grafters, plans)
    blends = [g.blend_planned(p) for g, p in zip(grafters, plans, strict=True)]
    for g, b, snap in zip(grafters, blends, snapshots, strict=True):
        g.write(b, snap)
    return [b.unit_ok for b in blends]


def _warn_skipped(record: RoundRecord, host: nn.Module) -> None:
    if record.skipped:
        which = f"graft round {record.round}" if record.round else "graft_"
        units = [name or "(the whole model)" for name in record.skipped]
        warnings.warn(
            f"{which}: units {units} of {type(host).__name__} hold NaN or Inf in the host or a "
            "peer (or blend beyond the host's dtype) and were left as they were",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


# Which participant hosts a module: one wrapper per host, and the links a new host joins by.
_HOSTS: weakref.WeakValueDictionary[int, Participant] = weakref.WeakValueDictionary()
_ORDER = itertools.count()


def _participant_of(module: nn.Module) -> Participant | None:
    p = _HOSTS.get(id(module))
    return p if p is not None and p.grafter.host is module else None


def _linked(a: Participant, b: Participant) -> bool:
    return any(m is b.host for m in a.grafter.peers.modules()) or any(
        m is a.host for m in b.grafter.peers.modules()
    )


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes ``t`` can touch: [first, last) in memory."""
    if t.numel() == 0:
        return (0, 0)
    reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return (t.data_ptr(), t.data_ptr() + (reach + 1) * t.element_size())


def _refuse_shared(newcomer: Participant, others: Sequence[Participant]) -> None:
    """Refuse a host whose unit tensors overlap another group member's in memory (one layer
    object in both models): both blends would be written there, and one lost."""
    mine = [
        (_span(t), n) for n, t in zip(newcomer.grafter.names, newcomer.grafter.live(), strict=True)
    ]
    for p in others:
        for n, t in zip(p.grafter.names, p.grafter.live(), strict=True):
            lo, hi = _span(t)
            hit = next((m for (a, b), m in mine if a < hi and lo < b), None)
            if hit is not None:
                raise ValueError(
                    f"this {type(newcomer.host).__name__}'s {hit!r} shares memory with {n!r} of "
                    f"the {type(p.host).__name__} it grafts with (one layer object in both "
                    "models?): a round would write both blends there and lose one. Give each "
                    "model its own layers (copy.deepcopy)"
                )


class RoundGroup:
    """The models of one process that graft from each other, and what their rounds share.

    Members are linked by peer relations (a member's peers, and the members that take it as a
    peer); a group is formed when its hosts are wrapped, never searched for at a round. It
    holds, while a round waits, the round-step weights of the members that stepped again, and
    the in-place round of its last round, reused by the next.
    """

    def __init__(self, members: Sequence[Participant] = ()) -> None:
        self._members = [weakref.ref(p) for p in sorted(members, key=lambda p: p._order)]
        self.snapshots: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = (
            weakref.WeakKeyDictionary()
        )
        self.in_place: list[InPlaceRound | None] = [None]
        for p in members:
            p.group = self

    @property
    def hosts(self) -> list[nn.Module]:
        """The models that round together, in the order they were wrapped."""
        return [p.host for p in self.members]

    @property
    def members(self) -> list[Participant]:
        """The live members, in the order their hosts were wrapped."""
        return [p for p in (r() for r in self._members) if p is not None]

    @staticmethod
    def join(newcomer: Participant) -> RoundGroup:
        """The group of ``newcomer`` and of every wrapped host linked to it (their groups
        merge). Raises before anything changes when the members' schedules differ."""
        linked = [p for p in _HOSTS.values() if p is not newcomer and _linked(newcomer, p)]
        members = {id(newcomer): newcomer}
        snapshots: dict[nn.Module, dict[str, Tensor]] = {}
        for p in linked:
            for q in p.group.members:
                members[id(q)] = q
            snapshots.update(p.group.snapshots)
        for p in members.values():
            if (p.every, p.first) != (newcomer.every, newcomer.first):
                raise ValueError(
                    "models that graft from each other in one process must share `every` and "
                    f"`start`: {type(newcomer.host).__name__} has every={newcomer.every}, "
                    f"start={newcomer.start}; a peer has every={p.every}, start={p.start}"
                )
        _refuse_shared(newcomer, [p for p in members.values() if p is not newcomer])
        group = RoundGroup(list(members.values()))
        group.snapshots.update(snapshots)
        return group

    def leave(self, member: Participant) -> None:
        """Remove ``member``; the others regroup by the links left between them."""
        rest = [p for p in self.members if p is not member]
        while rest:
            component = [rest.pop(0)]
            for cur in component:  # grows while it is walked: every member linked to one
                linked = [q for q in rest if _linked(cur, q)]
                rest = [q for q in rest if q not in linked]
                component += linked
            group = RoundGroup(component)
            for p in component:
                if p.host in self.snapshots:
                    group.snapshots[p.host] = self.snapshots[p.host]
        member.group = RoundGroup([member])

    def read(self, module: nn.Module, names: Sequence[str]) -> list[Tensor]:
        """A member's tensors as its round must read them: kept ones if it stepped again."""
        kept = self.snapshots.get(module)
        return [kept[n] for n in names] if kept is not None else read_tensors(module, names)


class Participant:
    """Counts one host's optimizer steps and runs its rounds, simultaneously with its group's.

    Args:
        grafter: the host's grafter.
        every: run a round after every ``every``-th step.
        on_round: called with each round's :class:`RoundRecord` after the blend is written.
        start: no round before this many steps (the first round comes at the first multiple of
            ``every`` at or after ``start``).
    """

    group: RoundGroup

    def __init__(
        self,
        grafter: Grafter,
        every: int,
        on_round: Callable[[RoundRecord], None],
        start: int = 0,
    ) -> None:
        self.grafter = grafter
        self.every = every
        self.start = start
        self.on_round = on_round
        self.steps = 0
        self.arrived = 0
        self.committed = 0
        self.closed = False
        self._order = next(_ORDER)
        self._replica_warned = False
        self._overtake_warned = False
        self.dropped = 0  # rounds this host stepped past while they waited for a peer
        host = grafter.host
        if _participant_of(host) is not None:
            raise ValueError(
                f"this {type(host).__name__} is already the host of another GraftOptimizer; "
                "wrap each model once, or call close() on the other wrapper first"
            )
        RoundGroup.join(self)
        _HOSTS[id(host)] = self

    def warn_if_replicas(self, record: RoundRecord) -> None:
        """Warn once when, in one of the first rounds, a peer scores exactly as the host in
        every unit: a copy of it (a DDP replica, or the same start and the same data), which
        the round blends to no effect."""
        if self._replica_warned or record.round > self.first + 2 or record.skipped:
            return  # (a unit with NaN or Inf has its own warning)
        same = [
            j
            for j in range(record.peer_scores.shape[0])
            if torch.equal(record.peer_scores[j].to(record.host_scores.device), record.host_scores)
        ]
        if same:
            self._replica_warned = True
            warnings.warn(
                f"graft round {record.round}: peers {same} of {type(self.host).__name__} score "
                "exactly as the host in every unit, so they look like copies of it and the "
                "round changes nothing. Peers need their own data order (and DDP only over a "
                "peer's own replicas)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def close(self) -> None:
        """Leave the host's registration and the group (the host can then be wrapped again)."""
        self.closed = True
        if _participant_of(self.grafter.host) is self:
            del _HOSTS[id(self.grafter.host)]
            self.group.leave(self)

    @property
    def host(self) -> nn.Module:
        return self.grafter.host

    @property
    def first(self) -> int:
        """The index of the first round (rounds are numbered by ``steps // every``)."""
        return max(1, -(-self.start // self.every))

    @property
    def completed(self) -> int:
        """How many rounds have been committed."""
        return max(0, self.committed - self.first + 1 - self.dropped)

    def _overtake(self, members: Sequence[Participant], r: int) -> None:
        """This host reached round ``r`` while its last round still waits for a peer (a peer
        skipped a step): that round is dropped for this host, which takes part in the group's
        next commit with its weights of now (so one skipped step costs one round, and the
        rounds go on in step). Warns once per host."""
        late = [
            f"{type(p.host).__name__} (steps {p.steps})"
            for p in members
            if p is not self and p.arrived <= p.committed
        ]
        self.group.snapshots.pop(self.host, None)
        self.dropped += 1
        if not self._overtake_warned:
            self._overtake_warned = True
            warnings.warn(
                f"{type(self.host).__name__} reached graft round {r} (step {self.steps}) while "
                f"round {self.arrived} still waited for {late}: a model skipped a step. The "
                f"group's next round reads this model as it is then; step the models in "
                "lockstep (one step each per iteration, a skipped update still calling step())",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def before_step(self) -> None:
        """Keep the round-step weights if this host steps again while its round waits."""
        if self.closed:
            return
        snapshots = self.group.snapshots
        if self.arrived > self.committed and self.host not in snapshots:
            snapshots[self.host] = {
                n: t.detach().clone()
                for n, t in zip(self.grafter.names, self.grafter.live(), strict=True)
            }

    def after_step(self) -> None:
        """Count a step; at every ``every``-th, arrive at the round and commit it if complete."""
        if self.closed:
            return
        self.steps += 1
        if self.steps % self.every or self.steps < self.start:
            return
        r = self.steps // self.every
        group = self.group
        members = group.members
        if self.arrived > self.committed:
            self._overtake(members, r)
        self.arrived = r
        # Each member waits at a round, or has been there already (a member that joined late).
        if all(p.arrived > p.committed or p.arrived >= r for p in members):
            try:
                _commit(group, members, r)
            except BaseException as e:
                if self.committed >= r:
                    raise  # written: a warning or callback raised afterwards
                # Nothing was written (every check reads before the first write): the round
                # did not happen, and the next round runs as usual.
                for p in members:
                    p.arrived = p.committed
                group.snapshots.clear()
                if hasattr(e, "add_note"):
                    e.add_note(
                        f"graft round {r} (step {self.steps}) failed and was not applied; the "
                        "models are as they were and the next round will run"
                    )
                raise


def _fetch(group: RoundGroup, grafter: Grafter) -> list[list[Tensor]]:
    if isinstance(grafter.peers, ModulePeers):
        return grafter.peers.fetch(grafter.names, group.read)
    return grafter.peers.fetch(grafter.names)


def _commit(group: RoundGroup, members: Sequence[Participant], r: int) -> None:
    """Plan every member's blend from pre-round weights, then write them all."""
    plans = []
    cache: dict = {}
    for p in members:
        g = p.grafter
        host = group.read(g.host, g.names)
        g.peers.begin_round(p.arrived, g.settings, p.every)
        plans.append(g.plan(host, _fetch(group, g), cache=cache))
    grafters = [p.grafter for p in members]
    snapshots = [group.snapshots.get(p.host) for p in members]
    oks = _write_round(grafters, plans, snapshots, group.in_place)
    # The round is written: every member moves on before any warning or callback can raise.
    group.snapshots.clear()
    for p in members:
        p.committed = p.arrived
    # Every member's follow-up runs (state reset, recalibration, history, callback) even when
    # another's raises; the first exception comes out afterwards, naming whose it was.
    failed: list[BaseException] = []
    for i, (p, plan, ok) in enumerate(zip(members, plans, oks, strict=True)):
        rec = dataclasses.replace(
            plan.record, round=p.arrived, step=p.arrived * p.every, skipped=p.grafter.skipped(ok)
        )
        try:
            _warn_skipped(rec, p.host)
            p.warn_if_replicas(rec)
            p.on_round(rec)
        except Exception as e:
            e.add_note(
                f"raised after graft round {rec.round} of group member {i} "
                f"({type(p.host).__name__}); the round is written for every member and their "
                "follow-ups ran"
            )
            failed.append(e)
    if failed:
        raise failed[0]
