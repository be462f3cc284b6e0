"""What scores a filter, and how two scores become the host's share: the criterion registry.

A criterion is one :class:`Criterion` registered here; ``GraftOptimizer(criterion=...)``, the
settings check and ``graftopt train --graft-criterion`` (its choices and help) read the
registry, so adding a criterion is one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CRITERIA", "Criterion", "bn_alpha", "register", "segment_l1"]


@dataclass(frozen=True)
class Criterion:
    """A way to weigh the host against a peer.

    Attributes:
        name: the ``criterion=`` value.
        help: one line for ``--help`` and the docs.
        row_score: ``(flat values, row lengths) -> one score per row`` (a unit, or a filter at
            filter level); ``None``: the entropy of each row, on the round's kernel route.
            Higher scores keep more of the host (the paper's alpha curve).
        unit_alpha: ``(host norm scale, peer norm scale) -> per-channel host share``, used
            instead of the scores' alpha for units that have a norm scale.
        filter_level: whether it needs ``level="filter"``.
    """

    name: str
    help: str
    row_score: Callable[[Tensor, Tensor], Tensor] | None = None
    unit_alpha: Callable[[Tensor, Tensor], Tensor] | None = None
    filter_level: bool = False


def segment_l1(values: Tensor, lengths: Tensor) -> Tensor:
    """Mean absolute value of each consecutive segment of ``values`` (``lengths`` long)."""
    lengths = lengths.to(values.device)
    return torch.segment_reduce(values.float().abs(), "mean", lengths=lengths)


def bn_alpha(gamma_host: Tensor, gamma_peer: Tensor) -> Tensor:
    """Per-channel share from norm scales, ``|g_h| / (|g_h| + |g_p|)``; 0.5 where both are 0."""
    gh, gp = gamma_host.float().abs(), gamma_peer.float().abs()
    total = gh + gp
    return torch.where(total > 0, gh / torch.where(total > 0, total, 1.0), 0.5)


CRITERIA: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    """Add ``criterion`` to the registry (a name already there is refused)."""
    if criterion.name in CRITERIA:
        raise ValueError(f"criterion {criterion.name!r} is registered already")
    CRITERIA[criterion.name] = criterion
    return criterion


register(Criterion("entropy", "the entropy of the weights (the paper)"))
register(Criterion("l1", "the mean absolute weight", row_score=segment_l1))
register(
    Criterion(
        "bn",
        "the norm layer's scale, |g_h| / (|g_h| + |g_p|) per channel (entropy where a unit has "
        "no norm)",
        unit_alpha=bn_alpha,
        filter_level=True,
    )
)
