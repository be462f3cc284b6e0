"""One peer per process under ``torchrun``: start-up, errors agreed by all ranks, gathering.

``torchrun --nproc-per-node K -m graftopt.train ... --peers K`` runs lane ``r`` (grafted
network ``r`` and, with ``--baseline``, baseline ``r``) on rank ``r``. Rank 0 writes the CSVs,
the table and the plots from rows gathered from every rank; each rank saves its own checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from graftopt.distributed import DistributedContext, init_from_env

from .checkpoint import newest_common_epoch, rank_epochs
from .config import TrainConfig

__all__ = [
    "USER_ERRORS",
    "agree",
    "all_gather",
    "broadcast",
    "check_world",
    "resume_epoch",
    "start",
]

T = TypeVar("T")
# Errors a user can act on; the CLI prints them without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


def start(cfg: TrainConfig) -> DistributedContext | None:
    """Join the ``torchrun`` job this process belongs to; ``None`` for a one-process run.

    A job of one process (``torchrun --nproc-per-node 1``) runs every lane in that process.
    ``--device cpu`` asks for gloo even where CUDA is present.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    backend = "gloo" if cfg.device.startswith("cpu") else None
    # K = the world size: the command line runs one peer per process. Asking for --peers
    # here would fail before a resumed run has read its saved --peers.
    return init_from_env(backend=backend, timeout=cfg.peer_timeout)


def check_world(cfg: TrainConfig, ctx: DistributedContext) -> None:
    if cfg.peers != ctx.world_size:
        raise ValueError(
            f"--peers {cfg.peers}, but torchrun started {ctx.world_size} processes: the command "
            f"line runs one peer per process, so start {cfg.peers} in all "
            f"(torchrun --nproc-per-node {cfg.peers} ...). Data-parallel peers (K x D processes) "
            "are available from the Python API, see docs/distributed.md"
        )


def all_gather(ctx: DistributedContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), by rank."""
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(ctx: DistributedContext, obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(ctx: DistributedContext | None, fn: Callable[[], T]) -> T:
    """``fn()``; if it raises a user error on any rank, every rank raises one.

    Without this, a rank that fails alone (its data or checkpoint is missing) would leave the
    others waiting at the next collective.
    """
    if ctx is None:
        return fn()
    error: BaseException | None = None
    try:
        value = fn()
    except USER_ERRORS as e:
        error = e
    messages = all_gather(ctx, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return value
    if error is not None:
        raise error
    rank, message = failed[0]
    raise ValueError(f"rank {rank} failed: {message}")


def gather_lanes(ctx: DistributedContext, t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, by rank (on the rank's device)."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(ctx.num_peers)]
    dist.all_gather(parts, t, group=ctx.graft_group)
    return torch.cat(parts)


def resume_epoch(ctx: DistributedContext, folder: Path) -> int:
    """The newest epoch whose checkpoint every rank holds (each rank reads its own files, so
    ranks on several machines agree too); the same error on every rank when there is none."""
    held = all_gather(ctx, rank_epochs(folder, ctx.rank))
    epoch = newest_common_epoch(held)
    if epoch is None:
        raise FileNotFoundError(
            f"no epoch of {folder} has the checkpoints of every rank ("
            + ", ".join(f"rank {r}: epochs {e or 'none'}" for r, e in enumerate(held))
            + ")"
        )
    return epoch
