"""Norm statistics re-estimated after a round: blended weights get statistics of their own.

A round blends the norm layers' running statistics with the weights, but the mean and variance
of a blended network's activations are not the blend of its parents' (REPAIR, population
averaging). :func:`recalibrate_norms` resets them and re-estimates them from a few batches, as
:func:`torch.optim.swa_utils.update_bn` does, with the rest of the model left in its mode.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Recalibration", "frozen_norm_statistics", "norm_layers", "recalibrate_norms"]


def norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _inputs(batch: Any) -> Any:
    # (x, y) pairs from a DataLoader, or bare inputs.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def recalibrate_norms(model: nn.Module, batches: Iterable[Any], limit: int | None = None) -> int:
    """Reset and re-estimate the running statistics of ``model``'s batch norms; the batch count.

    The statistics become the plain average over the batches (``momentum=None``, as
    :func:`torch.optim.swa_utils.update_bn`). Only the norm layers run in train mode; every
    module's mode and momentum are restored afterwards, also on error. No gradient is taken and
    no random number is drawn. A model without batch norms is left untouched (0 is returned).

    Args:
        model: the model to recalibrate.
        batches: inputs, or ``(inputs, targets)`` pairs.
        limit: use at most this many batches.
    """
    norms = norm_layers(model)
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in norms
    ]
    device = _device(model)
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in itertools.islice(batches, limit):
            x = _inputs(batch)
            model(x.to(device) if isinstance(x, Tensor) else x)
            used += 1
        if used == 0:
            raise ValueError("recalibrate_norms() got no batches")
    except BaseException:
        for m, (mean, var, tracked) in zip(norms, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
        raise
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return used


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Forward passes in train mode that leave the running statistics as they are.

    For a peer's predictions taken as targets: it normalizes with its batch statistics, as in
    its own training step, without the extra batch moving its running mean and variance.
    """
    norms = norm_layers(model)
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = 1 * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@dataclass
class Recalibration:
    """What :class:`~graftopt.GraftOptimizer` re-estimates the host's norm statistics from.

    Args:
        data: an iterable of batches, iterated afresh each round, or a function of the round
            index returning one (so that a resumed run reads the same batches).
        batches: how many batches to use per round (>= 1).
    """

    data: Iterable[Any] | Callable[[int], Iterable[Any]]
    batches: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"Recalibration batches must be an integer >= 1, got {self.batches!r}")
        if isinstance(self.data, Iterator):
            # A generator is used up by the first round (or the first model of a group).
            raise TypeError(
                f"Recalibration data is a one-pass {type(self.data).__name__}: every round "
                "(of every model using it) reads batches afresh. Pass a DataLoader or a list, "
                "or a function of the round index returning the batches (lambda r: my_batches(r))"
            )

    def __call__(self, model: nn.Module, round_index: int) -> int:
        data = self.data(round_index) if callable(self.data) else self.data
        return recalibrate_norms(model, data, self.batches)
