"""Process groups of a grafting job: K peers of D data-parallel replicas, joined from torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .comm import DEFAULT_TIMEOUT, _seconds
from .sources import AllPeers, RingPeers

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DistributedContext", "init_from_env", "peer_groups"]


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
