"""Where a run's networks live: all in this process, or one lane per ``torchrun`` rank.

:func:`world_of` gives the run one object that answers every question whose answer differs
between the two (which lanes are here, who writes the outputs, how a value is agreed on, how
checkpoints are named and saved, how grafting peers are reached), so that the training loop
has no branch of its own for torchrun.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from graftopt import GraftOptimizer, PeerSource, ring
from graftopt.distributed import DistributedContext

from . import ranks
from .checkpoint import (
    CHECKPOINT,
    find_checkpoint,
    load_checkpoint,
    prune_rank_checkpoints,
    rank_checkpoint_name,
    save_checkpoint,
)
from .config import TrainConfig

__all__ = ["ONE_PROCESS", "OneProcess", "Torchrun", "World", "resolve_device", "world_of"]

T = TypeVar("T")
Rows = list[dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    """The device of ``--device`` in one process."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but CUDA is not available here; use --device cpu"
        )
    return device


class World:
    """One process running every lane (the base class is that world)."""

    rank = 0
    lead = True  # writes the CSVs, the table, the plots and config.json
    launch = "graftopt train"

    def check(self, cfg: TrainConfig) -> None:
        """Refuse settings this world cannot run."""

    def lanes(self, cfg: TrainConfig) -> list[int]:
        return list(range(cfg.peers))

    def broadcast(self, value: T) -> T:
        return value

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()``; under torchrun a user error on any rank is raised on every rank."""
        return fn()

    def all_gather(self, value: T) -> list[T]:
        return [value]

    def device(self, name: str) -> torch.device:
        return resolve_device(name)

    def own_checkpoints(self) -> list[str]:
        """Names (globs) of the checkpoint files this process writes."""
        return [CHECKPOINT]

    def resume(self, path: Path) -> tuple[Path, dict[str, Any]]:
        """The run folder of ``--resume path`` and the checkpoint this process continues from."""
        return find_checkpoint(path).parent, load_checkpoint(path)

    def check_resumed(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint saved by a job of another shape."""

    def check_epoch(self, epoch: int) -> None:
        """Refuse to go on from epochs that differ between ranks."""

    def save(self, out: Path, state: dict[str, Any], epochs: int) -> None:
        """Save the checkpoint after ``epochs`` epochs."""
        save_checkpoint(out / CHECKPOINT, state)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {}

    def merge(self, rows: Rows, alphas: Rows) -> tuple[Rows, Rows]:
        """Every lane's rows of one epoch, in the order one process writes them."""
        return rows, alphas

    def gather_lanes(self, t: torch.Tensor) -> torch.Tensor:
        """Every lane's ``t`` along dim 0, in lane order."""
        return t

    def graft(
        self,
        models: Sequence[torch.nn.Module],
        optimizers: Sequence[Optimizer],
        every: int,
        settings: dict[str, Any],
    ) -> list[GraftOptimizer]:
        """The lanes' optimizers wrapped so that the networks graft in a ring."""
        peers = self.ring_peers()
        if peers is None:
            return ring(models, optimizers, same_init=False, every=every, **settings)
        return [
            GraftOptimizer(opt, peers=peers(), every=every, model=m, **settings)
            for m, opt in zip(models, optimizers, strict=True)
        ]

    def ring_peers(self) -> Callable[[], PeerSource] | None:
        """A new source of this process's ring peer, or None when the ring is in-process."""
        return None

    def describe(self, device: torch.device) -> str | None:
        """A line on the job's processes for the log, or None."""
        return None


class OneProcess(World):
    """Every lane in this process."""


class Torchrun(World):
    """Lane ``ctx.peer`` in this process, one peer per rank of a ``torchrun`` job."""

    launch = "torchrun ... -m graftopt.train"

    def __init__(self, ctx: DistributedContext) -> None:
        self.ctx = ctx
        self.rank = ctx.rank
        self.lead = ctx.rank == 0

    def check(self, cfg: TrainConfig) -> None:
        ranks.check_world(cfg, self.ctx)
        if cfg.distill_weight > 0:
            raise ValueError(
                "--distill-weight under torchrun: the peers' predictions would have to cross "
                "ranks every step, which graftopt train does not do; distil in one process"
            )

    def lanes(self, cfg: TrainConfig) -> list[int]:
        return [self.ctx.peer]

    def broadcast(self, value: T) -> T:
        return ranks.broadcast(self.ctx, value)

    def agree(self, fn: Callable[[], T]) -> T:
        return ranks.agree(self.ctx, fn)

    def all_gather(self, value: T) -> list[T]:
        return ranks.all_gather(self.ctx, value)

    def device(self, name: str) -> torch.device:
        resolve_device(name)  # still refuse --device cuda where there is no CUDA
        if name not in ("auto", "cpu", "cuda"):
            raise ValueError(
                f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK (or the CPU); "
                "pass --device auto, cuda or cpu"
            )
        return self.ctx.device

    def own_checkpoints(self) -> list[str]:
        return [rank_checkpoint_name(self.rank, "*")]

    def resume(self, path: Path) -> tuple[Path, dict[str, Any]]:
        folder = path if path.is_dir() else path.parent
        epoch = ranks.resume_epoch(self.ctx, folder)
        return folder, self.agree(lambda: load_checkpoint(folder, self.rank, epoch))

    def check_resumed(self, state: dict[str, Any]) -> None:
        ctx = self.ctx
        saved = (state.get("rank"), state.get("world_size"))
        if saved[1] != ctx.world_size:
            raise ValueError(
                f"the checkpoint of rank {ctx.rank} says rank {saved[0]} of {saved[1]} "
                f"processes; this job has {ctx.world_size}: resume with as many processes as "
                "the run had"
            )
        if saved[0] != ctx.rank:
            raise ValueError(
                f"the checkpoint file of rank {ctx.rank} holds rank {saved[0]}'s networks: a "
                "checkpoint was renamed or copied over another; restore each rank's "
                "checkpoint-rank<r>-epoch<e>.pth as the run wrote it"
            )

    def check_epoch(self, epoch: int) -> None:
        epochs = self.all_gather(epoch)
        if len(set(epochs)) > 1:
            # A job stopped while the ranks were saving: the files are each whole, but of
            # different epochs; grafting would pair the wrong steps (the handshake refuses it).
            raise ValueError(
                "the ranks' checkpoints end at different epochs ("
                + ", ".join(f"rank {r}: {e}" for r, e in enumerate(epochs))
                + "); they cannot be resumed together"
            )

    def save(self, out: Path, state: dict[str, Any], epochs: int) -> None:
        """Save as a set: each rank drops its previous file only once every rank has written
        the new one."""
        path = out / rank_checkpoint_name(self.rank, epochs)

        def save() -> None:
            try:
                save_checkpoint(path, state)
            except OSError as e:
                raise ValueError(f"cannot save {path}: {e.strerror or e}") from None

        self.agree(save)
        prune_rank_checkpoints(out, self.rank, keep=epochs)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.ctx.world_size}

    def merge(self, rows: Rows, alphas: Rows) -> tuple[Rows, Rows]:
        """Networks by lane (rank), then the ensembles and soups (the same on every rank);
        alpha rows by round, then lane, as the rounds of one process complete."""
        nets = [r for r in rows if r["kind"] not in ("ensemble", "soup")]
        shared = [r for r in rows if r["kind"] in ("ensemble", "soup")]
        gathered = self.all_gather((nets, alphas))
        merged = [r for rank_nets, _ in gathered for r in rank_nets]
        keyed = [
            ((a["round"], rank, i), a)
            for rank, (_, alpha_rows) in enumerate(gathered)
            for i, a in enumerate(alpha_rows)
        ]
        return merged + shared, [a for _, a in sorted(keyed, key=lambda t: t[0])]

    def gather_lanes(self, t: torch.Tensor) -> torch.Tensor:
        return ranks.gather_lanes(self.ctx, t)

    def ring_peers(self) -> Callable[[], PeerSource] | None:
        return self.ctx.ring_peers

    def describe(self, device: torch.device) -> str | None:
        return (
            f"torchrun: {self.ctx.world_size} processes, one peer each, on {device.type} "
            f"({dist.get_backend()}); rank 0 writes the outputs"
        )


# The world holds no state, so one instance serves every one-process run.
ONE_PROCESS = OneProcess()


def world_of(ctx: DistributedContext | None) -> World:
    """The world of a run: one process (``ctx`` None) or this rank of a torchrun job."""
    return ONE_PROCESS if ctx is None else Torchrun(ctx)
