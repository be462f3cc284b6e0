"""Peer sources over ranks: :class:`RingPeers` (the paper's ring) and :class:`AllPeers`.

Each rank trains one network; its source exchanges the units once per round. After the
exchange every rank reports to the others through the job's store (:mod:`.store`), and a rank
writes its graft only when every rank got all its data. A rank that died, hung or left is
named in a :class:`PeerError` on the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor, nn

from ..adapters.base import Adapter, Unit, tensor_table
from ..peers import PeerSource, read_tensors
from .comm import (
    DEFAULT_TIMEOUT,
    REPORT_MARGIN,
    _is_member,
    _seconds,
    all_gather_tensors,
    exchange_tensors,
)
from .store import source_store

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ..settings import GraftSettings

__all__ = ["AllPeers", "ExchangeStats", "PeerError", "RingPeers"]


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
        self._store = source_store(group)
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
        # The confirmation waits a margin longer than the exchange, so that a rank whose
        # exchange timed out still reports in time and only the silent ranks get named.
        body = json.dumps(report).encode()
        limit = self.timeout + min(self.timeout, REPORT_MARGIN)
        values = self._gather_store(f"round {r}", body, start, limit, note)
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
            peer is reported within this plus ``min(timeout, 30)`` seconds, a dead one usually
            sooner.
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
