"""Where a host's peer weights come from when the peers live in this process."""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .adapters.base import (
    Adapter,
    TensorRefs,
    Unit,
    nonempty,
    tensor_table,
    unreadable,
    unwrap,
)

if TYPE_CHECKING:
    from .settings import GraftSettings

__all__ = ["ModulePeers", "PeerSource", "check_alignment", "read_tensors"]

_REFS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], TensorRefs]] = (
    weakref.WeakKeyDictionary()
)


def read_tensors(module: nn.Module, names: Sequence[str]) -> list[Tensor]:
    """The named tensors of a (bare) module, as they are now."""
    # Rounds read the same names every time: locate them once per module.
    cache = _REFS.setdefault(module, {})
    key = tuple(names)
    refs = cache.get(key)
    if refs is not None:
        try:
            refs.check()
        except RuntimeError:  # the module tree changed: locate the tensors again
            refs = None
    if refs is None:
        refs = cache[key] = TensorRefs(module, names)
    return refs.get()


def check_alignment(
    host: nn.Module, units: Sequence[Unit], peer: nn.Module, adapter: Adapter, who: str
) -> None:
    """Raise a ValueError naming the first unit or tensor where ``peer`` differs from ``host``."""
    peer_units = nonempty(peer, adapter.units(peer))
    if len(peer_units) != len(units):
        raise ValueError(f"{who} has {len(peer_units)} graft units, the host has {len(units)}")
    host_table, peer_table = tensor_table(host), tensor_table(peer)
    for mine, theirs in zip(units, peer_units, strict=True):
        if mine.name != theirs.name or mine.members != theirs.members:
            raise ValueError(
                f"{who} does not match the host's architecture at unit {mine.name!r}: "
                f"host members {mine.members}, peer unit {theirs.name!r} members {theirs.members}"
            )
        for name in mine.members:
            hs, ps = tuple(host_table[name].shape), tuple(peer_table[name].shape)
            if hs != ps:
                raise ValueError(
                    f"{who} does not match the host's architecture at layer {name!r}: "
                    f"host shape {hs}, peer shape {ps}"
                )


class PeerSource(ABC):
    """Supplies, each round, the peers' copies of the host's unit tensors."""

    @abstractmethod
    def bind(self, host: nn.Module, units: Sequence[Unit], adapter: Adapter) -> None:
        """Check the peers against the host's units; raise a clear error on mismatch."""

    @property
    @abstractmethod
    def num_peers(self) -> int:
        """How many peers each round blends."""

    @abstractmethod
    def fetch(self, names: Sequence[str]) -> list[list[Tensor]]:
        """Per peer, the tensors called ``names``, as they were at the round's step.

        The host never writes what this returns.
        """

    def begin_round(self, round_index: int, settings: GraftSettings, every: int) -> None:  # noqa: B027
        """Called before each round's :meth:`fetch` with the round's index (1 for the first),
        settings and period; sources in other processes check them with their peers.
        """

    def modules(self) -> list[nn.Module]:
        """The peers that are modules of this process (they join the host's rounds)."""
        return []


class ModulePeers(PeerSource):
    """Peers that are ``nn.Module`` objects of this process; read, never written.

    Peers may live on another device or hold another floating dtype than the host: their
    tensors are scored in float32 and moved to the host's device for the blend.
    """

    def __init__(self, peers: Sequence[nn.Module]) -> None:
        self._peers = [unwrap(p) for p in peers]
        self._as_bound: list[TensorRefs] = []
        if not self._peers:
            raise ValueError("peers is empty: give at least one peer model")
        for i, p in enumerate(self._peers):
            if not isinstance(p, nn.Module):
                raise TypeError(f"peer {i} is a {type(p).__name__}, expected an nn.Module")

    @property
    def num_peers(self) -> int:
        return len(self._peers)

    def bind(self, host: nn.Module, units: Sequence[Unit], adapter: Adapter) -> None:
        for i, p in enumerate(self._peers):
            if p is host:
                raise ValueError(
                    f"peer {i} is the host model itself; a model cannot graft from itself"
                )
            check_alignment(host, units, p, adapter, f"peer {i} ({type(p).__name__})")
            table = tensor_table(p)
            for u in units:
                for n in u.members:
                    why = unreadable(table[n]) if n in table else None
                    if why:
                        raise ValueError(
                            f"peer {i} ({type(p).__name__}): unit {u.name!r}: {n} {why}"
                        )
        # The peers as checked: a submodule replaced since then makes fetch() raise.
        names = [n for u in units for n in u.members]
        self._as_bound = [TensorRefs(p, names) for p in self._peers]

    def fetch(
        self,
        names: Sequence[str],
        read: Callable[[nn.Module, Sequence[str]], list[Tensor]] = read_tensors,
    ) -> list[list[Tensor]]:
        """``read``: how to read a peer (a round group reads a peer that stepped past its
        round step from the weights it kept)."""
        for refs in self._as_bound:
            refs.check()
        return [read(p, names) for p in self._peers]

    def modules(self) -> list[nn.Module]:
        return list(self._peers)
