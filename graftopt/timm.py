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
with its own log, checkpoints and summary under ``out/<experiment>/peer<p>``.

For K networks of D data-parallel replicas each (``K * D`` ranks), ``setup(args, replicas=D)``
and two more lines: ``dataset_train = peers.shard(dataset_train)`` after ``create_dataset``,
and ``model = peers.prepare_distributed(task, device_ids=[device], ...)`` after timm's own
``if args.distributed:`` block (both do nothing when ``replicas == 1``).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2 as _timm_create_optimizer_v2
from torch import nn
from torch.utils.data import Dataset

from . import models as _models  # noqa: F401  (registers the CIFAR networks with timm)
from .distributed import AllPeers, RingPeers, peer_groups
from .distributed.comm import DEFAULT_TIMEOUT
from .optimizer import GraftOptimizer
from .settings import DEFAULTS as SETTINGS
from .settings import check

__all__ = ["DEFAULTS", "EVERY", "Shard", "TimmPeers", "setup"]

# The rounds of graftopt train's defaults (docs/accuracy.md): one start (setup's same_init),
# the paper's full blend every EVERY updates. Recalibration is left to the caller: timm's
# train loader keeps persistent workers, and a second pass over it mid-epoch would reset the
# training iterator.
DEFAULTS: Mapping[str, Any] = {}
EVERY = SETTINGS.every

PEER = "{peer}"
REPLICAS_ENV = "GRAFTOPT_REPLICAS"
TIMEOUT_ENV = "GRAFTOPT_PEER_TIMEOUT"


def _timeout(given: float | None) -> float:
    """``given``, else the environment's ``GRAFTOPT_PEER_TIMEOUT``, else the default."""
    if given is None:
        text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
        try:
            given = float(text)
        except ValueError:
            _fail(f"{TIMEOUT_ENV}={text!r} is not a number of seconds")
    if not (math.isfinite(given) and given > 0):  # type: ignore[arg-type]
        _fail(f"the peer timeout must be a positive number of seconds, got {given!r}")
    return float(given)  # type: ignore[arg-type]


def _fail(message: str) -> None:
    raise ValueError(f"graftopt.timm: {message}")


@dataclass
class TimmPeers:
    """This rank's place among the K grafting peers of a timm ``train.py`` run.

    Attributes:
        peer: this rank's network, ``0..K-1``.
        num_peers: networks grafting together (the world size).
        seed: the ``--seed`` the run was started with (``args.seed`` is now
            ``seed + peer * replicas``).
        same_init: every peer starts from peer 0's initial weights (unless resumed).
        resumed: ``--resume`` was given (the weights come from each peer's checkpoint).
        timeout: seconds a rank waits for its peers at a round.
        grad_accum_steps: batches per optimizer update (``--grad-accum-steps``).
        replicas: data-parallel ranks per network (D); rank ``peer * replicas + replica``.
        replica: this rank's replica of its network, ``0..D-1`` (0 logs and saves).
        graft_group: the ranks this one grafts with (replica ``replica`` of every peer;
            ``None``: the world).
        data_group: the replicas of this rank's network (``None`` when ``replicas == 1``).
    """

    peer: int
    num_peers: int
    seed: int
    same_init: bool = True
    resumed: bool = False
    timeout: float = DEFAULT_TIMEOUT
    grad_accum_steps: int = 1
    replicas: int = 1
    replica: int = 0
    graft_group: dist.ProcessGroup | None = None
    data_group: dist.ProcessGroup | None = None
    sharded: bool = False  # shard() was called
    prepared: bool = False  # prepare_distributed() was called

    def check_prepared(self) -> None:
        """Refuse D > 1 replicas whose script skipped :meth:`shard` or
        :meth:`prepare_distributed`: each replica would train on all the data without the
        gradient all-reduce, and the replicas of a network would drift apart."""
        missing = [
            call
            for call, done in (
                ("peers.shard(dataset_train)", self.sharded),
                ("model = peers.prepare_distributed(task, ...)", self.prepared),
            )
            if not done
        ]
        if self.replicas > 1 and missing:
            _fail(
                f"{self.replicas} replicas per network ({REPLICAS_ENV} or setup(replicas=)), but "
                f"the script never called {' and '.join(missing)}: each replica would train on "
                "all the data with no gradient all-reduce and the replicas would drift apart. "
                "Add the two lines of docs/timm.md (K networks of D replicas)"
            )

    def shard(self, dataset: Dataset) -> Dataset:
        """This replica's share of ``dataset`` (a :class:`Shard`; ``dataset`` itself when
        ``replicas == 1``). Call it on timm's training set before ``create_loader``."""
        self.sharded = True
        if self.replicas == 1:
            return dataset
        return Shard(dataset, self.replicas, self.replica, seed=self.seed + self.peer)

    def prepare_distributed(self, task: Any, **ddp_kwargs: Any) -> nn.Module:
        """DDP over this network's replicas; returns the module to train (the script's ``model``).

        ``task``: timm's task (its ``prepare_distributed`` gets ``process_group``) or a plain
        module (wrapped in ``DistributedDataParallel``). With one replica, nothing is wrapped.
        ``ddp_kwargs``: as for timm's ``task.prepare_distributed`` (``device_ids``,
        ``broadcast_buffers``...); CPU device ids are dropped, as DDP wants.
        """
        self.prepared = True
        prepare = getattr(task, "prepare_distributed", None)
        ids = ddp_kwargs.get("device_ids")
        if ids is not None and all(torch.device(d).type == "cpu" for d in ids):
            ddp_kwargs["device_ids"] = None  # DDP takes device ids of accelerators only
        if self.replicas > 1:
            if prepare is not None:
                prepare(process_group=self.data_group, **ddp_kwargs)
            else:
                task = nn.parallel.DistributedDataParallel(
                    task, process_group=self.data_group, **ddp_kwargs
                )
        return task.get_trainable_module() if prepare is not None else task

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
        elif check({"every": every}):
            _fail(f"every must be an integer >= 1 or 'epoch', got {every!r}")
        if self.same_init and not self.resumed:
            broadcast_weights(model)
        if topology not in ("ring", "all"):
            _fail(f"topology must be 'ring' or 'all', got {topology!r}")
        source = (RingPeers if topology == "ring" else AllPeers)(
            self.graft_group, timeout=self.timeout
        )
        optimizer = _timm_create_optimizer_v2(model, *args, **kwargs)
        # The host is named: timm's weight-decay groups reorder the parameters.
        wrapped = GraftOptimizer(
            optimizer, source, every=every, model=model, **{**DEFAULTS, **dict(graft or {})}
        )
        upe = self.updates_per_epoch(loader)
        wrapped.register_load_state_dict_post_hook(lambda opt: _warn_mid_epoch(opt, upe))

        # timm wraps the model in DDP after making the optimizer: checked at the first step.
        def first_step(*_: Any) -> None:
            self.check_prepared()
            handle.remove()

        handle = wrapped.register_step_pre_hook(first_step)
        return wrapped

    def updates_per_epoch(self, loader: Iterable[Any]) -> int:
        """Optimizer updates in one epoch of ``loader``, as timm's ``train.py`` counts them."""
        accum = self.grad_accum_steps
        return (len(loader) + accum - 1) // accum  # type: ignore[arg-type]


def _warn_mid_epoch(optimizer: GraftOptimizer, updates_per_epoch: int) -> None:
    # timm resumes a recovery checkpoint (--recovery-interval) at the start of the next epoch,
    # so the rest of the interrupted epoch's updates are never counted.
    offset = optimizer.steps % updates_per_epoch
    if offset:
        warnings.warn(
            f"graftopt.timm: resumed {offset} updates into an epoch of {updates_per_epoch} (a "
            "recovery checkpoint): timm starts the next epoch, so every later round comes "
            f"{updates_per_epoch - offset} updates earlier in the data than in an "
            "uninterrupted run. The peers stay in step when all of them resume from the same "
            "update; resume from an epoch checkpoint to keep the rounds where they were",
            stacklevel=2,
        )


@torch.no_grad()
def broadcast_weights(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers (one start for all peers)."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src)


class Shard(Dataset):
    """Replica ``replica`` of ``replicas``'s share of ``dataset``: every ``replicas``-th index of
    one permutation drawn from ``seed``, padded by wrapping around (as ``DistributedSampler``
    pads) so that every replica has ``ceil(len / replicas)`` samples and makes the same number
    of steps. The replicas of a network pass the same ``seed`` and together cover the set.

    The share is fixed for the run (the loader shuffles within it every epoch): timm's
    ``create_loader`` builds its sampler itself and takes none. Attributes other than the
    sample access (``transform``, ``reader``...) are the dataset's, so timm can set them.
    """

    def __init__(self, dataset: Dataset, replicas: int, replica: int, *, seed: int) -> None:
        if not 0 <= replica < replicas:
            _fail(f"replica {replica} is not one of 0..{replicas - 1}")
        n = len(dataset)  # type: ignore[arg-type]
        if n < replicas:
            _fail(f"a training set of {n} samples cannot feed {replicas} replicas")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        total = -(-n // replicas) * replicas
        order = torch.cat([order, order[: total - n]])
        vars(self).update(dataset=dataset, indices=order[replica::replicas].tolist())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.dataset, name, value)


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
    replicas: int | None = None,
    same_init: bool = True,
    timeout: float | None = None,
) -> TimmPeers:
    """Make this torchrun rank one peer (or one replica of a peer) of a grafting run of timm's
    ``train.py``.

    Call it right after ``utils.init_distributed_device(args)``, on every rank. Rank
    ``p * replicas + d`` is replica ``d`` of network ``p``; ``replicas`` defaults to the
    environment's ``GRAFTOPT_REPLICAS`` (1 when unset), so one edited script runs any K x D.
    It changes ``args`` so that timm's own distributed code (DDP over the world, its sampler,
    ``reduce_tensor``, ``--dist-bn``), which would make the networks replicas of each other,
    stays off, and the script trains this rank's network as a one-network run would:

    - ``distributed`` off and ``world_size`` ``replicas``: each network gets the whole
      training set (split between its replicas by :meth:`TimmPeers.shard`), its own metrics
      (replica 0's), its own norm statistics, and ``--lr-base`` scaled by one network's batch;
    - ``rank`` ``d``: replica 0 of every network logs and saves its checkpoints, in
      ``<output>/<experiment>/peer<p>`` (one experiment name for all);
    - ``seed`` becomes ``seed + p * replicas``, so that ``random_seed(args.seed, args.rank)``
      gives this rank the seed timm gives it: the networks draw different data orders and
      augmentations (and, with ``same_init=False``, different initial weights);
    - ``{peer}`` in ``--resume`` becomes ``p``: each network resumes from its own checkpoint.

    Raises:
        ValueError: outside torchrun, with fewer than two networks, a world size that is not
            a multiple of ``replicas``, ``--sync-bn``, or a ``--resume`` that names one
            checkpoint for all networks.
    """
    if not getattr(args, "distributed", False) or not dist.is_initialized():
        _fail("run train.py under torchrun with one process per peer (--nproc-per-node K >= 2)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if replicas is None:
        given = os.environ.get(REPLICAS_ENV, "1")
        if not given.strip().isdigit():
            _fail(f"{REPLICAS_ENV}={given!r} is not a number of replicas")
        replicas = int(given)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        _fail(f"replicas must be an integer >= 1, got {replicas!r}")
    timeout = _timeout(timeout)
    if world % replicas:
        _fail(f"the torchrun world of {world} ranks is not a multiple of replicas={replicas}")
    num_peers = world // replicas
    peer, replica = divmod(rank, replicas)
    if num_peers < 2:
        _fail(
            f"grafting needs >= 2 peers, the torchrun world has {world} ranks "
            f"({num_peers} x {replicas} replicas)"
        )
    if getattr(args, "sync_bn", False):
        _fail("--sync-bn would synchronize norm statistics across peers: leave it off")
    resume = getattr(args, "resume", "") or ""
    if resume and PEER not in resume:
        _fail(
            f"--resume {resume!r} names one checkpoint for all {num_peers} peers: put {PEER} in "
            "the path (for example out/EXP/peer{peer}/last.pth.tar)"
        )
    graft_group, data_group = peer_groups(num_peers, replicas)
    args.resume = resume.replace(PEER, str(peer))
    args.experiment = _experiment(args, peer)
    seed = int(args.seed)
    args.seed = seed + peer * replicas
    args.distributed = False
    args.world_size = replicas
    args.rank = replica
    atexit.register(_leave)  # timm destroys the process group only when args.distributed is set
    accum = max(1, int(getattr(args, "grad_accum_steps", 1) or 1))
    return TimmPeers(
        peer, num_peers, seed, same_init, bool(args.resume), timeout, accum, replicas, replica,
        graft_group, data_group,
    )  # fmt: skip


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
