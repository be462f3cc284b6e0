"""Peers in other processes or on other machines, over ``torch.distributed``.

Each rank trains one network; its :class:`~graftopt.peers.PeerSource` exchanges the units once
per round. :class:`RingPeers` grafts from the preceding rank (the paper's ring, one batch of
point-to-point operations per round); :class:`AllPeers` grafts from every other rank (one
``all_gather``, the mean over peers). Both work with any backend (gloo on CPU, NCCL on GPU).

A round is all or nothing for the whole group: after the exchange every rank reports to the
others through the process group's store, and a rank writes its graft only when every rank got
all its data. A rank that died, hung or left is named in a :class:`PeerError` on the others.

Example (one peer per process, ``torchrun --nproc-per-node 2 train.py``)::

    ctx = graftopt.distributed.init_from_env()
    torch.manual_seed(ctx.peer)
    model = make_model().to(ctx.device)
    opt = GraftOptimizer(SGD(model.parameters(), lr=0.1), peers=ctx.ring_peers(), every=390)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .adapters.base import Adapter, Unit, tensor_table
from .peers import PeerSource, read_tensors

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .grafter import GraftSettings

__all__ = [
    "AllPeers",
    "DistributedContext",
    "ExchangeStats",
    "PeerError",
    "RingPeers",
    "all_gather_tensors",
    "exchange_tensors",
    "init_from_env",
    "peer_groups",
]

DEFAULT_TIMEOUT = 300.0


class PeerError(RuntimeError):
    """A peer died, hung or left the job; this rank wrote nothing for the round.

    Attributes:
        ranks: the global ranks that failed or never answered.
    """

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


@dataclass(frozen=True)
class ExchangeStats:
    """What one round moved and how long it took on this rank.

    Attributes:
        round: the round index (1 for the first).
        bytes_sent: bytes of this rank's units handed to the backend.
        bytes_received: bytes of peer units this rank received.
        exchange_s: seconds from posting the exchange to holding all peer data; includes
            waiting for peers that reach the round later.
        confirm_s: seconds spent confirming that every rank of the group got its data.
    """

    round: int
    bytes_sent: int
    bytes_received: int
    exchange_s: float
    confirm_s: float

    @property
    def throughput(self) -> float:
        """Received bytes per second of exchange."""
        return self.bytes_received / self.exchange_s if self.exchange_s > 0 else float("inf")


# -- stateless communication helpers ---------------------------------------------------------


def _seconds(timeout: float | datetime.timedelta | None) -> float | None:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    return timeout


def _is_member(group: ProcessGroup | None) -> bool:
    return dist.get_rank(group) >= 0


def _comm_device(group: ProcessGroup | None, device: torch.device) -> torch.device:
    """Where a buffer must live for the group's backend: gloo moves CPU tensors, NCCL CUDA ones."""
    backend = str(dist.get_backend(group))
    if device.type == "cuda" and "nccl" in backend:
        return device
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _layout(
    tensors: Sequence[Tensor], group: ProcessGroup | None
) -> list[tuple[torch.dtype, torch.device, list[int]]]:
    """Tensor indices bucketed by dtype, with the buffer device of each bucket."""
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, _comm_device(group, t.device)), []).append(i)
    return [(dtype, device, idx) for (dtype, device), idx in buckets.items()]


def _pack(tensors: Sequence[Tensor], idx: Sequence[int], device: torch.device) -> Tensor:
    return torch.cat([tensors[i].detach().reshape(-1).to(device) for i in idx])


def _unpack(
    buffers: Sequence[Tensor], like: Sequence[Tensor], layout: Sequence[tuple[Any, Any, list[int]]]
) -> list[Tensor]:
    """Views of flat buffers shaped like ``like``, on ``like``'s devices."""
    out: list[Tensor] = [like[0]] * len(like)
    for buf, (_, _, idx) in zip(buffers, layout, strict=True):
        parts = buf.split([like[i].numel() for i in idx])
        for i, part in zip(idx, parts, strict=True):
            out[i] = part.view(like[i].shape).to(like[i].device)
    return out


def _wait(works: Sequence[Any], timeout: float | None) -> None:
    """Wait for every request; a request still running after ``timeout`` s raises."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for w in works:
        if deadline is None:
            w.wait()
            continue
        left = max(deadline - time.monotonic(), 1e-3)
        if w.wait(datetime.timedelta(seconds=left)) is False:
            raise TimeoutError(f"no answer within {timeout:g} s")


def exchange_tensors(
    tensors: Sequence[Tensor],
    dst: int,
    src: int,
    group: ProcessGroup | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> list[Tensor] | None:
    """Send ``tensors`` to group rank ``dst`` and receive same-shaped ones from group rank ``src``.

    One flat buffer per dtype goes each way, in one batch of point-to-point operations, so a
    ring of ranks calling this at once does not deadlock. ``src`` must send tensors of the same
    shapes and dtypes.

    Args:
        tensors: the tensors to send (unchanged).
        dst: group rank to send to.
        src: group rank to receive from.
        group: the process group (default: the world).
        timeout: seconds (or a timedelta) to wait for both directions; ``None`` waits as long as
            the backend does.

    Returns:
        The received tensors, on the devices of ``tensors``; ``None`` on ranks outside ``group``.
    """
    if not _is_member(group):
        return None
    layout = _layout(tensors, group)
    sends = [_pack(tensors, idx, device) for _, device, idx in layout]
    recvs = [torch.empty_like(s) for s in sends]
    if group is not None:  # P2POp takes global ranks
        dst, src = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
    ops = [dist.P2POp(dist.isend, s, dst, group) for s in sends]
    ops += [dist.P2POp(dist.irecv, r, src, group) for r in recvs]
    _wait(dist.batch_isend_irecv(ops), _seconds(timeout))
    return _unpack(recvs, tensors, layout)


def all_gather_tensors(
    tensors: Sequence[Tensor],
    group: ProcessGroup | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> list[list[Tensor]] | None:
    """Every group rank's copy of ``tensors`` (same shapes and dtypes on every rank).

    One ``all_gather`` of a flat buffer per dtype.

    Returns:
        Per group rank (this one included), its tensors on the devices of ``tensors``;
        ``None`` on ranks outside ``group``.
    """
    if not _is_member(group):
        return None
    layout = _layout(tensors, group)
    sends = [_pack(tensors, idx, device) for _, device, idx in layout]
    size = dist.get_world_size(group)
    gathered = [[torch.empty_like(s) for _ in range(size)] for s in sends]
    works = [
        dist.all_gather(out, s, group=group, async_op=True)
        for out, s in zip(gathered, sends, strict=True)
    ]
    _wait(works, _seconds(timeout))
    return [_unpack([out[j] for out in gathered], tensors, layout) for j in range(size)]


# -- peer sources ----------------------------------------------------------------------------

# Sources made on one group, counted so that each gets its own keys in the store; every rank
# creates its sources in the same order.
_SOURCES: dict[str, itertools.count] = {}


def _describe(host: nn.Module, units: Sequence[Unit]) -> dict[str, Any]:
    table = tensor_table(host)
    return {
        "units": [[u.name, list(u.members)] for u in units],
        "tensors": [
            [n, list(table[n].shape), str(table[n].dtype).removeprefix("torch.")]
            for u in units
            for n in u.members
            if n in table
        ],
    }


def _first_difference(
    mine: dict[str, Any], base: dict[str, Any], rank: int, base_rank: int
) -> str | None:
    """How ``mine`` (of ``rank``) differs from ``base`` (of ``base_rank``), or None."""
    for key in ("source", "size", "round", "every", "settings"):
        if mine.get(key) != base.get(key):
            return (
                f"rank {rank} has {key}={mine.get(key)}, rank {base_rank} has {key}={base.get(key)}"
            )
    for a, b in itertools.zip_longest(mine["units"], base["units"]):
        if a != b:
            if a is None or b is None:
                return (
                    f"rank {rank} has {len(mine['units'])} graft units, "
                    f"rank {base_rank} has {len(base['units'])}"
                )
            return (
                f"unit {b[0]!r}: rank {base_rank} has members {b[1]}, "
                f"rank {rank} has unit {a[0]!r} members {a[1]}"
            )
    for a, b in zip(mine["tensors"], base["tensors"], strict=False):
        if a != b:
            return (
                f"layer {b[0]!r}: rank {base_rank} has shape {tuple(b[1])} {b[2]}, "
                f"rank {rank} has shape {tuple(a[1])} {a[2]}"
            )
    return None


class _StorePeers(PeerSource):
    """Shared machinery: handshake, per-round confirmation through the store, statistics."""

    kind = ""

    def __init__(
        self,
        group: ProcessGroup | None = None,
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT,
        history: int = 100,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} needs torch.distributed: call torch.distributed."
                "init_process_group() (or graftopt.distributed.init_from_env()) first"
            )
        self.group = group
        seconds = _seconds(timeout)
        if seconds is None:
            raise ValueError("timeout must be a positive number of seconds, got None")
        self.timeout = seconds
        if not _is_member(group):
            raise ValueError(
                f"rank {dist.get_rank()} is not in the group given to {type(self).__name__}"
            )
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.size < 2:
            raise ValueError(
                f"{type(self).__name__} needs a group of at least 2 ranks, got {self.size}"
            )
        self.ranks = (
            dist.get_process_group_ranks(group) if group is not None else list(range(self.size))
        )
        name = (group if group is not None else dist.group.WORLD).group_name
        n = next(_SOURCES.setdefault(name, itertools.count()))
        self._store = dist.PrefixStore(
            f"graftopt/{name}/{n}/", dist.distributed_c10d._get_default_store()
        )
        self.stats: deque[ExchangeStats] = deque(maxlen=history)
        self._host: nn.Module | None = None
        self._description: dict[str, Any] = {}
        self._greeted = False
        self._round = 0
        self._settings: dict[str, Any] = {}
        self._every: int | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, size={self.size}, timeout={self.timeout:g})"
        )

    def _who(self, group_rank: int) -> str:
        glob = self.ranks[group_rank]
        return (
            f"rank {glob}"
            if glob == group_rank
            else f"rank {glob} (peer {group_rank} of the group)"
        )

    def bind(self, host: nn.Module, units: Sequence[Unit], adapter: Adapter) -> None:
        self._host = host
        self._description = _describe(host, units)

    def begin_round(self, round_index: int, settings: GraftSettings, every: int) -> None:
        self._round = round_index
        self._settings = dataclasses.asdict(settings)
        self._every = every

    def fetch(self, names: Sequence[str]) -> list[list[Tensor]]:
        if self._host is None:
            raise RuntimeError(
                f"{type(self).__name__}.fetch() before bind(): pass it to GraftOptimizer"
            )
        if not self._settings:  # a caller that does not announce rounds: count them here
            self._round += 1
        r = self._round
        if not self._greeted:
            self._handshake(r)
        tensors = read_tensors(self._host, names)
        start = time.monotonic()
        failure: BaseException | None = None
        peers: list[list[Tensor]] = []
        try:
            peers = self._exchange(tensors)
        except Exception as e:  # reported to the group below, then raised as a PeerError
            failure = e
        exchanged = time.monotonic()
        self._confirm(r, failure, start)
        sent = sum(t.numel() * t.element_size() for t in tensors)
        received = sum(t.numel() * t.element_size() for p in peers for t in p)
        self.stats.append(
            ExchangeStats(r, sent, received, exchanged - start, time.monotonic() - exchanged)
        )
        return peers

    @abstractmethod
    def _exchange(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Per peer, its copy of ``tensors``."""

    @abstractmethod
    def _suspects(self) -> list[int]:
        """Group ranks this rank exchanges data with."""

    def _gather_store(
        self, prefix: str, value: bytes, start: float, limit: float, note: str = ""
    ) -> list[bytes]:
        """Post ``value`` under ``prefix`` and read every rank's until ``start + limit`` s; name
        the ranks that never post."""
        keys = [f"{prefix}/{j}" for j in range(self.size)]
        deadline = start + limit
        try:
            self._store.set(keys[self.rank], value)
            left = max(deadline - time.monotonic(), 1e-3)
            self._store.wait(keys, datetime.timedelta(seconds=left))
            return self._store.multi_get(keys)
        except Exception as e:
            tail = f"{self._who(self.rank)} wrote nothing for this round{note}"
            try:
                missing = [j for j in range(self.size) if not self._store.check([keys[j]])]
            except Exception:
                raise PeerError(
                    f"graft {prefix}: the job's store is unreachable (it lives in the torchrun "
                    f"agent, or in rank 0 with a tcp:// init_method): {e}; {tail}"
                ) from e
            if not missing:
                raise
            names = ", ".join(self._who(j) for j in missing)
            raise PeerError(
                f"graft {prefix}: {names} never reported (died, hung or left the job; waited "
                f"{time.monotonic() - start:.1f} s, timeout={self.timeout:g} s); {tail}",
                [self.ranks[j] for j in missing],
            ) from None

    def _handshake(self, r: int) -> None:
        """Check once that every rank has the same units, shapes, dtypes, settings and round."""
        mine = {"source": self.kind, "size": self.size, "round": r, "every": self._every}
        mine |= {"settings": self._settings} | self._description
        body = json.dumps(mine, sort_keys=True).encode()
        values = self._gather_store("handshake", body, time.monotonic(), self.timeout)
        if len({hashlib.sha256(v).digest() for v in values}) > 1:
            descs = [json.loads(v) for v in values]
            diffs = [
                d
                for j in range(1, self.size)
                if (d := _first_difference(descs[j], descs[0], self.ranks[j], self.ranks[0]))
            ]
            raise ValueError(
                f"graft handshake failed: the ranks of {type(self).__name__} disagree; "
                + "; ".join(diffs or ["their descriptions differ"])
            )
        self._greeted = True

    def _confirm(self, r: int, failure: BaseException | None, start: float) -> None:
        """Tell the group whether this rank got its data; raise unless every rank did."""
        report: dict[str, Any] = {"ok": failure is None}
        note = ""
        if failure is not None:
            report["error"] = f"{type(failure).__name__}: {str(failure)[:300]}"
            report["suspects"] = [self.ranks[j] for j in self._suspects()]
            note = f" (its exchange failed with {report['error']})"
        # The confirmation waits one timeout longer than the exchange, so that a rank whose
        # exchange timed out still reports in time and only the silent ranks get named.
        body = json.dumps(report).encode()
        values = self._gather_store(f"round {r}", body, start, 2 * self.timeout, note)
        reports = [json.loads(v) for v in values]
        failed = [j for j, rep in enumerate(reports) if not rep["ok"]]
        if failed:
            suspects = sorted({s for j in failed for s in reports[j]["suspects"]})
            detail = "; ".join(f"{self._who(j)}: {reports[j]['error']}" for j in failed)
            raise PeerError(
                f"graft round {r}: exchange with rank(s) {suspects} failed ({detail}); "
                f"{self._who(self.rank)} wrote nothing for this round",
                suspects,
            )
        if r > 2:  # every rank has read round r - 2's reports before posting round r - 1's
            self._store.delete_key(f"round {r - 2}/{self.rank}")


class RingPeers(_StorePeers):
    """The paper's ring over ranks: group rank ``i`` grafts from group rank ``i - 1``.

    Each round, each rank sends its units to its successor and receives its predecessor's in
    one batch of point-to-point operations (one flat buffer per dtype). ``K`` ranks started
    with seeds ``0..K-1`` end with the weights of :func:`graftopt.ring` over the same ``K``
    models in one process.

    Args:
        group: the ranks that graft together, one per peer (default: the world). With
            data-parallel peers use the graft group of :func:`peer_groups`.
        timeout: seconds (or a timedelta) a rank waits at a round for its peers' data; a hung
            peer is reported within twice this, a dead one usually sooner.
        history: how many rounds of :attr:`stats` to keep.

    Attributes:
        stats: per round, an :class:`ExchangeStats`.

    Example::

        opt = GraftOptimizer(SGD(model.parameters()), peers=RingPeers(timeout=120), every=390)
    """

    kind = "ring"

    @property
    def num_peers(self) -> int:
        return 1

    def _suspects(self) -> list[int]:
        return sorted({(self.rank - 1) % self.size, (self.rank + 1) % self.size})

    def _exchange(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        got = exchange_tensors(
            tensors,
            (self.rank + 1) % self.size,
            (self.rank - 1) % self.size,
            self.group,
            self.timeout,
        )
        return [got] if got is not None else []


class AllPeers(_StorePeers):
    """Every other rank of the group is a peer: the blend is the mean over peers.

    One ``all_gather`` per round. Peers are ordered by group rank, so ``K`` ranks match
    ``GraftOptimizer(opt_i, peers=[models[j] for j != i])`` in one process.

    Args:
        group: the ranks that graft together (default: the world).
        timeout: as for :class:`RingPeers`.
        history: how many rounds of :attr:`stats` to keep.
    """

    kind = "all"

    @property
    def num_peers(self) -> int:
        return self.size - 1

    def _suspects(self) -> list[int]:
        return [j for j in range(self.size) if j != self.rank]

    def _exchange(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        got = all_gather_tensors(tensors, self.group, self.timeout) or []
        return [t for j, t in enumerate(got) if j != self.rank]


# -- process groups and launch -----------------------------------------------------------------


def peer_groups(num_peers: int, replicas: int) -> tuple[ProcessGroup | None, ProcessGroup | None]:
    """This rank's graft group and data-parallel group, for ``num_peers x replicas`` ranks.

    Rank ``p * replicas + d`` is replica ``d`` of peer ``p``: the replicas of a peer are
    consecutive ranks (one node per peer under ``torchrun --nproc-per-node replicas``). The
    data-parallel group holds the replicas of this rank's peer (wrap the model in DDP over it);
    the graft group holds replica ``d`` of every peer (pass it to :class:`RingPeers`), so the
    replicas of a peer graft from identical inputs and stay identical. Every rank must call this.

    Returns:
        ``(graft_group, dp_group)``; ``graft_group`` is ``None`` (the world) when
        ``replicas == 1`` and ``dp_group`` is ``None`` (no data parallelism) then too.
    """
    world = dist.get_world_size()
    if num_peers < 2 or replicas < 1 or num_peers * replicas != world:
        raise ValueError(
            f"num_peers x replicas must equal the world size {world} with num_peers >= 2, "
            f"got {num_peers} x {replicas}"
        )
    if replicas == 1:
        return None, None
    graft, _ = dist.new_subgroups_by_enumeration(
        [[p * replicas + d for p in range(num_peers)] for d in range(replicas)]
    )
    dp, _ = dist.new_subgroups_by_enumeration(
        [[p * replicas + d for d in range(replicas)] for p in range(num_peers)]
    )
    return graft, dp


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a grafting job launched by ``torchrun``.

    Attributes:
        rank, world_size, local_rank: as torchrun set them.
        num_peers: networks grafting together (K).
        replicas: data-parallel ranks per network (D); ``world_size == K * D``.
        peer: this rank's network, ``0..K-1``: build network ``peer`` of the in-process run
            (its initial weights, learning rate and data order).
        replica: this rank's index among its network's replicas.
        graft_group: the ranks this one grafts with (``None``: the world).
        dp_group: the replicas of this rank's network, for DDP (``None`` when ``D == 1``).
        device: the device to train on.
        timeout: seconds a rank waits at a round (see :class:`RingPeers`).
    """

    rank: int
    world_size: int
    local_rank: int
    num_peers: int
    replicas: int
    peer: int
    replica: int
    graft_group: ProcessGroup | None
    dp_group: ProcessGroup | None
    device: torch.device
    timeout: float

    def ring_peers(self) -> RingPeers:
        """A :class:`RingPeers` over the graft group (make one per GraftOptimizer)."""
        return RingPeers(self.graft_group, timeout=self.timeout)

    def all_peers(self) -> AllPeers:
        """An :class:`AllPeers` over the graft group."""
        return AllPeers(self.graft_group, timeout=self.timeout)

    def close(self) -> None:
        """Leave the job (``destroy_process_group``)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(
    peers: int | None = None, *, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> DistributedContext | None:
    """Join the job that ``torchrun`` launched this process in; ``None`` outside torchrun.

    Initializes the default process group from torchrun's environment (unless done already),
    picks the device (``cuda:LOCAL_RANK`` when CUDA is available) and builds the groups of
    :func:`peer_groups`.

    Args:
        peers: networks grafting together (K); the world size by default. The world size must
            be a multiple of it: each network then trains data-parallel over ``world / K`` ranks.
        backend: ``"nccl"`` with CUDA, ``"gloo"`` otherwise, unless given.
        timeout: seconds a rank waits at a graft round (see :class:`RingPeers`).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    world = dist.get_world_size()
    k = world if peers is None else peers
    if k < 2 or world % k:
        raise ValueError(f"peers must be >= 2 and divide the world size {world}, got {k}")
    graft, dp = peer_groups(k, world // k)
    rank = dist.get_rank()
    d = world // k
    return DistributedContext(
        rank,
        world,
        local_rank,
        k,
        d,
        rank // d,
        rank % d,
        graft,
        dp,
        device,
        float(_seconds(timeout) or DEFAULT_TIMEOUT),
    )


def _benchmark(argv: Sequence[str] | None = None) -> None:
    """Measure the exchange of one model's units: ``torchrun ... -m graftopt.distributed``."""
    import argparse

    import timm  # the package's import registered the CIFAR networks with it

    from .adapters import get_adapter
    from .grafter import GraftSettings

    parser = argparse.ArgumentParser(
        prog="python -m graftopt.distributed", description=_benchmark.__doc__
    )
    parser.add_argument("--model", default="cifar_resnet56", help="a timm model name")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--source", choices=("ring", "all"), default="ring")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (after one more)")
    args = parser.parse_args(argv)
    ctx = init_from_env()
    if ctx is None:
        parser.error("launch with torchrun --nproc-per-node K (K >= 2)")
    torch.manual_seed(ctx.peer)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(ctx.device)
    source = ctx.ring_peers() if args.source == "ring" else ctx.all_peers()
    adapter = get_adapter(model)
    units = adapter.units(model)
    source.bind(model, units, adapter)
    names = [n for u in units for n in u.members]
    for r in range(1, args.rounds + 2):
        source.begin_round(r, GraftSettings(), 1)
        source.fetch(names)
    if ctx.rank == 0:
        runs = list(source.stats)[1:]  # round 1 includes the handshake and connection set-up
        mb = runs[0].bytes_received / 1e6
        ex = sorted(s.exchange_s for s in runs)[len(runs) // 2]
        co = sorted(s.confirm_s for s in runs)[len(runs) // 2]
        print(
            f"{args.model} {args.source} K={ctx.num_peers} {dist.get_backend()}: "
            f"{mb:.2f} MB received per round, median exchange {ex * 1e3:.1f} ms "
            f"({mb / ex:.0f} MB/s), confirmation {co * 1e3:.2f} ms over {len(runs)} rounds"
        )
    ctx.close()


if __name__ == "__main__":
    _benchmark()
