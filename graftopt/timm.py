"""Grafting in timm's own ``train.py``: one peer per torchrun rank, everything else as timm does it.

timm's script treats a torchrun world as replicas of one model: it wraps the model in DDP over
all ranks, splits the data with a distributed sampler, averages the ranks' metrics, reduces the
norm statistics across ranks and scales the learning rate by the world size. For grafting the
ranks are K different networks, each trained as a one-process run would train it.
:func:`setup`, called right after ``utils.init_distributed_device(args)``, turns the script's
``args`` into those of a one-process run for this rank's peer, and the returned
:class:`TimmPeers` builds the grafting optimizer::

    import graftopt.timm
    ...
    device = utils.init_distributed_device(args)
    peers = graftopt.timm.setup(args)
    ...
    optimizer = peers.create_optimizer_v2(model, loader_train, **optimizer_kwargs(cfg=args), ...)

and ``torchrun --nproc-per-node K train.py ... --output out`` trains K grafted networks, each
with its own log, checkpoints and summary under ``out/<experiment>/peer<p>``. One data-parallel
replica per peer: each rank is a whole network (for K networks of D data-parallel replicas
each, run ``graftopt train`` under torchrun).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2 as _timm_create_optimizer_v2
from torch import nn

from .distributed import AllPeers, RingPeers
from .optimizer import GraftOptimizer

__all__ = ["DEFAULTS", "EVERY", "TimmPeers", "setup"]

# The rounds of graftopt train's defaults (docs/accuracy.md): one start (setup's same_init),
# the paper's full blend every EVERY updates. Recalibration is left to the caller: timm's
# train loader keeps persistent workers, and a second pass over it mid-epoch would reset the
# training iterator.
DEFAULTS: Mapping[str, Any] = {}
EVERY = 10

PEER = "{peer}"


def _fail(message: str) -> None:
    raise ValueError(f"graftopt.timm: {message}")


@dataclass
class TimmPeers:
    """This rank's place among the K grafting peers of a timm ``train.py`` run.

    Attributes:
        peer: this rank's network, ``0..K-1``.
        num_peers: networks grafting together (the world size).
        seed: the ``--seed`` the run was started with (``args.seed`` is now ``seed + peer``).
        same_init: every peer starts from peer 0's initial weights (unless resumed).
        resumed: ``--resume`` was given (the weights come from each peer's checkpoint).
        timeout: seconds a rank waits for its peers at a round.
        grad_accum_steps: batches per optimizer update (``--grad-accum-steps``).
    """

    peer: int
    num_peers: int
    seed: int
    same_init: bool = True
    resumed: bool = False
    timeout: float = 300.0
    grad_accum_steps: int = 1

    def create_optimizer_v2(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        *args: Any,
        every: int | str = EVERY,
        topology: str = "ring",
        graft: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> GraftOptimizer:
        """timm's ``create_optimizer_v2(model, *args, **kwargs)``, grafting with the other ranks.

        Args:
            model: the model the script trains (``task.get_trainable_module()``).
            loader: the training loader.
            every: optimizer updates between rounds (default :data:`EVERY`), or ``"epoch"``:
                one round per epoch of ``loader``, its updates counted with
                ``--grad-accum-steps`` as timm counts them (the paper's schedule).
            topology: ``"ring"`` (the paper: peer ``p`` grafts from ``p - 1``) or ``"all"``.
            graft: :class:`~graftopt.GraftOptimizer` keywords over :data:`DEFAULTS`
                (``rate``, ``A``, ``c``, ``start``, ``recalibrate``...).
            *args, **kwargs: timm's optimizer arguments (``**optimizer_kwargs(cfg=args)``).
        """
        per_epoch = every == "epoch"
        if per_epoch:
            every = self.updates_per_epoch(loader)
        elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
            _fail(f"every must be an integer >= 1 or 'epoch', got {every!r}")
        if self.same_init and not self.resumed:
            broadcast_weights(model)
        if topology not in ("ring", "all"):
            _fail(f"topology must be 'ring' or 'all', got {topology!r}")
        source = (RingPeers if topology == "ring" else AllPeers)(timeout=self.timeout)
        optimizer = _timm_create_optimizer_v2(model, *args, **kwargs)
        # The host is named: timm's weight-decay groups reorder the parameters.
        wrapped = GraftOptimizer(
            optimizer, source, every=every, model=model, **{**DEFAULTS, **dict(graft or {})}
        )
        if per_epoch:
            wrapped.register_load_state_dict_post_hook(_warn_mid_epoch)
        return wrapped

    def updates_per_epoch(self, loader: Iterable[Any]) -> int:
        """Optimizer updates in one epoch of ``loader``, as timm's ``train.py`` counts them."""
        accum = self.grad_accum_steps
        return (len(loader) + accum - 1) // accum  # type: ignore[arg-type]


def _warn_mid_epoch(optimizer: GraftOptimizer) -> None:
    # timm resumes a recovery checkpoint (--recovery-interval) at the start of the next epoch,
    # so the rest of the interrupted epoch's updates are never counted.
    offset = optimizer.steps % optimizer.every
    if offset:
        warnings.warn(
            f"graftopt.timm: resumed {offset} updates into an epoch (a recovery checkpoint): "
            "timm starts the next epoch, so from now on every round comes "
            f"{optimizer.every - offset} updates into an epoch instead of at its end. The "
            "peers stay in step when all of them resume from the same update; resume from an "
            "epoch checkpoint to keep rounds at epoch ends",
            stacklevel=2,
        )


@torch.no_grad()
def broadcast_weights(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers (one start for all peers)."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src)


def _experiment(args: argparse.Namespace, peer: int) -> str:
    """One experiment name for all peers (rank 0's), with this peer's folder under it."""
    name = [getattr(args, "experiment", "") or None]
    if name[0] is None and peer == 0:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name[0] = f"{stamp}-{str(args.model).replace('/', '_')}-graft"
    dist.broadcast_object_list(name, 0)
    return os.path.join(str(name[0]), f"peer{peer}")


def setup(
    args: argparse.Namespace,
    *,
    same_init: bool = True,
    timeout: float = 300.0,
) -> TimmPeers:
    """Make this torchrun rank one peer of a grafting run of timm's ``train.py``.

    Call it right after ``utils.init_distributed_device(args)``. It changes ``args`` so that
    the script trains this rank's network alone, as in one process:

    - ``distributed`` off and ``world_size`` 1: no DDP over the peers (it would keep them
      identical), the whole training set for each peer, its own metrics, its own norm
      statistics (no ``--dist-bn``), and ``--lr-base`` scaled by one peer's batch;
    - ``rank`` 0: every peer logs and saves its checkpoints, in
      ``<output>/<experiment>/peer<p>`` (one experiment name for all);
    - ``seed`` becomes ``seed + p``, the seed timm gives rank ``p``: the peers draw different
      data orders and augmentations (and, with ``same_init=False``, different initial weights);
    - ``{peer}`` in ``--resume`` becomes ``p``: each peer resumes from its own checkpoint.

    Raises:
        ValueError: outside torchrun, with fewer than two ranks, with ``--sync-bn``, or with
            a ``--resume`` that names one checkpoint for all peers.
    """
    if not getattr(args, "distributed", False) or not dist.is_initialized():
        _fail("run train.py under torchrun with one process per peer (--nproc-per-node K >= 2)")
    world, peer = dist.get_world_size(), dist.get_rank()
    if world < 2:
        _fail(f"grafting needs >= 2 peers, the torchrun world has {world}")
    if getattr(args, "sync_bn", False):
        _fail("--sync-bn would synchronize norm statistics across peers: leave it off")
    resume = getattr(args, "resume", "") or ""
    if resume and PEER not in resume:
        _fail(
            f"--resume {resume!r} names one checkpoint for all {world} peers: put {PEER} in the "
            "path (for example out/EXP/peer{peer}/last.pth.tar)"
        )
    args.resume = resume.replace(PEER, str(peer))
    args.experiment = _experiment(args, peer)
    seed = int(args.seed)
    args.seed = seed + peer
    args.distributed = False
    args.world_size = 1
    args.rank = 0
    atexit.register(_leave)  # timm destroys the process group only when args.distributed is set
    accum = max(1, int(getattr(args, "grad_accum_steps", 1) or 1))
    return TimmPeers(peer, world, seed, same_init, bool(args.resume), timeout, accum)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
