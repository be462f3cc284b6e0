"""Grafting for an existing timm ``train.py``-style script: one call instead of the optimizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from timm.optim import create_optimizer_v2
from torch import nn

from graftopt import GraftOptimizer, PeerSource
from graftopt import models as _models  # noqa: F401  (registers the CIFAR networks with timm)

__all__ = ["create_graft_optimizer"]


def create_graft_optimizer(
    model: nn.Module,
    peers: Sequence[nn.Module] | PeerSource,
    *,
    every: int,
    graft: Mapping[str, Any] | None = None,
    **optimizer_kwargs: Any,
) -> GraftOptimizer:
    """timm's optimizer for ``model`` (``create_optimizer_v2``), wrapped to graft from ``peers``.

    Args:
        model: the host model the optimizer trains.
        peers: the models it grafts from (in this process; for the paper's ring of ``k``
            networks, network ``i`` takes ``peers=[models[i - 1]]``), or a
            :class:`~graftopt.PeerSource` such as ``RingPeers()`` under torchrun.
        every: optimizer steps between graft rounds: one epoch is the optimizer updates per
            epoch (``len(loader) // grad_accum_steps``), not the batches.
        graft: other :class:`~graftopt.GraftOptimizer` keywords (``A``, ``c``, ``bins``,
            ``level``, ``criterion``, ``callback``, ...).
        **optimizer_kwargs: timm's optimizer arguments, as ``timm.optim.optimizer_kwargs(cfg=args)``
            returns them (``opt``, ``lr``, ``weight_decay``, ``momentum``, ...).

    Example::

        from timm.optim import optimizer_kwargs
        from graftopt.train import create_graft_optimizer

        models = [create_model(args.model, num_classes=10) for _ in range(2)]
        kwargs = optimizer_kwargs(cfg=args)
        optimizers = [
            create_graft_optimizer(m, [models[i - 1]], every=len(loader), **kwargs)
            for i, m in enumerate(models)
        ]
    """
    optimizer = create_optimizer_v2(model, **optimizer_kwargs)
    # timm splits parameters into decay / no-decay groups, which reorders them, so the host
    # cannot be inferred from the optimizer: name it.
    source = peers if isinstance(peers, PeerSource) else list(peers)
    return GraftOptimizer(optimizer, source, every=every, model=model, **dict(graft or {}))
