"""PyTorch Lightning: one grafted peer per process of Lightning's DDP.

In ``configure_optimizers``, wrap the optimizer with :func:`graft_optimizer`; give the Trainer
:func:`peer_strategy`. Each process then trains its own network on its shard of the data
(Lightning's distributed sampler), and every ``every`` steps the networks graft over
torch.distributed, as :mod:`graftopt.timm` does for timm's ``train.py``::

    class Net(L.LightningModule):
        def configure_optimizers(self):
            inner = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return graftopt.lightning.graft_optimizer(inner, self)

    L.Trainer(devices=4, strategy=graftopt.lightning.peer_strategy()).fit(Net(), loader)

In one process, ``GraftOptimizer`` works in a LightningModule as in any loop (automatic
optimization, ``bf16-mixed``, the graft state saved in the ``.ckpt``): docs/lightning.md.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from .distributed import AllPeers, RingPeers
from .optimizer import GraftOptimizer
from .settings import DEFAULTS

__all__ = ["graft_optimizer", "peer_strategy"]


@functools.cache
def _peer_strategy_class() -> type:
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    class PeerDDPStrategy(DDPStrategy):
        """DDP that broadcasts rank 0's weights once and then averages nothing."""

        def _setup_model(self, model: nn.Module) -> Any:
            ddp = super()._setup_model(model)
            # Lightning registers comm hooks on CUDA only; the peers need theirs everywhere.
            ddp.register_comm_hook(None, noop_hook)
            return ddp

        def _register_ddp_hooks(self) -> None:
            pass

    return PeerDDPStrategy


def peer_strategy(**kwargs: Any) -> Any:
    """Lightning's ``DDPStrategy`` with one peer per process: no gradient all-reduce (each
    process trains its own network), no buffer sync after the start (each keeps its own norm
    statistics). DDP's one broadcast of rank 0's weights at the start gives the peers one
    start, the recipe the accuracy study found to pay. ``kwargs`` go to ``DDPStrategy``."""
    given = {"ddp_comm_hook", "broadcast_buffers", "forward_sync_buffers"} & set(kwargs)
    if given:
        raise ValueError(
            f"peer_strategy() sets {sorted(given)} itself (peers must not average gradients or "
            "share buffers); use DDPStrategy directly for data parallel"
        )
    return _peer_strategy_class()(forward_sync_buffers=False, **kwargs)


def graft_optimizer(
    optimizer: Optimizer,
    module: nn.Module,
    *,
    every: int = DEFAULTS.every,
    topology: str = "ring",
    timeout: float = DEFAULTS.timeout,
    **graft: Any,
) -> GraftOptimizer:
    """``optimizer`` grafting ``module`` with the same module in the other processes.

    Args:
        optimizer: the optimizer ``configure_optimizers`` would return.
        module: the LightningModule (its parameters are the optimizer's).
        every: optimizer steps between rounds (default 10).
        topology: ``"ring"`` (the paper: process ``p`` grafts from ``p - 1``) or ``"all"``.
        timeout: seconds a process waits for its peers at a round.
        **graft: any other :class:`~graftopt.GraftOptimizer` keyword (``A``, ``rate``, ...).

    Raises ``ValueError`` outside a torch.distributed job of at least 2 processes (Lightning
    starts it before ``configure_optimizers`` with ``devices >= 2`` and a DDP strategy).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise ValueError(
            "graftopt.lightning.graft_optimizer grafts across Lightning's processes: run the "
            "Trainer with devices >= 2 and strategy=graftopt.lightning.peer_strategy(); in one "
            "process, wrap the optimizer in graftopt.GraftOptimizer with peer models instead"
        )
    if topology not in ("ring", "all"):
        raise ValueError(f"topology must be 'ring' or 'all', got {topology!r}")
    source = (RingPeers if topology == "ring" else AllPeers)(None, timeout=timeout)
    return GraftOptimizer(optimizer, source, every=every, model=module, **graft)
