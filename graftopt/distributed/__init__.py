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

The package along its jobs: :mod:`.comm` moves tensors (point to point or gathered),
:mod:`.store` reaches the job's key-value store, :mod:`.sources` holds the peer sources and
their round protocol, :mod:`.groups` builds the process groups from torchrun's environment;
``python -m graftopt.distributed`` measures an exchange.
"""

from .comm import DEFAULT_TIMEOUT, all_gather_tensors, exchange_tensors
from .groups import DistributedContext, init_from_env, peer_groups
from .sources import AllPeers, ExchangeStats, PeerError, RingPeers

__all__ = [
    "DEFAULT_TIMEOUT",
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
