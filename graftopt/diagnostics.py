"""What a user can read about grafting: per-round scores and alphas, invalid filters."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapters.base import unwrap

# Frames of these packages are not the user's: a round's warnings point past them.
_INTERNAL = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller point at the first frame
    outside graftopt and torch: the user's ``opt.step()`` line, not torch's optimizer wrapper."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


__all__ = ["InvalidFilters", "RoundRecord", "invalid_filters"]


@dataclass(frozen=True)
class RoundRecord:
    """One host's graft round.

    Scores and alphas stay on the weights' device and are flattened over "slots": one slot per
    unit at layer level, one per filter at filter level (``slots[i]`` of them for unit ``i``).
    Nothing is copied to the CPU until a method below asks for it.

    Attributes:
        round: the round index (1 for the first round).
        step: the host's optimizer step the round followed.
        units: unit names, in order.
        slots: slots per unit.
        host_scores: ``(S,)`` the host's scores.
        peer_scores: ``(m, S)`` each peer's scores.
        alphas: ``(m, S)`` the host's share against each peer.
        skipped: units left as they were because a tensor held NaN or Inf.
    """

    round: int
    step: int
    units: tuple[str, ...]
    slots: tuple[int, ...]
    host_scores: Tensor
    peer_scores: Tensor
    alphas: Tensor
    skipped: tuple[str, ...] = ()

    def alpha(self, unit: str) -> Tensor:
        """The ``(m, slots)`` alphas of one unit."""
        i = self.units.index(unit)
        start = sum(self.slots[:i])
        return self.alphas[:, start : start + self.slots[i]]

    def unit_alphas(self) -> dict[str, float]:
        """Per unit, its alpha averaged over peers and filters (one host sync)."""
        means = torch.segment_reduce(
            self.alphas.float().mean(0),
            "mean",
            lengths=torch.tensor(self.slots, device=self.alphas.device),
        )
        return dict(zip(self.units, means.tolist(), strict=True))

    def mean_alpha(self) -> float:
        """The alpha averaged over units (each unit counted once) and peers."""
        values = self.unit_alphas().values()
        return sum(values) / max(len(values), 1)


@dataclass(frozen=True)
class InvalidFilters:
    """Filters whose l1 norm is below a threshold, in total and per conv layer."""

    threshold: float
    invalid: int
    total: int
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.invalid / self.total if self.total else 0.0


@torch.no_grad()
def invalid_filters(model: nn.Module, threshold: float = 0.1) -> InvalidFilters:
    """Count conv filters (output channels) whose weights' l1 norm is below ``threshold``.

    Args:
        model: any model; its Conv1d/2d/3d layers are counted.
        threshold: the l1-norm bound under which a filter is invalid (default 0.1).

    Returns:
        :class:`InvalidFilters` with integer ``invalid`` and ``total`` and a ``layers``
        breakdown ``{name: (invalid, total)}``.
    """
    layers: dict[str, tuple[int, int]] = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
            m, nn.modules.lazy.LazyModuleMixin
        ):
            w = m.weight.transpose(0, 1) if m.transposed else m.weight
            norms = w.detach().float().reshape(w.shape[0], -1).abs().sum(1)
            layers[name] = (int((norms < threshold).sum()), w.shape[0])
    return InvalidFilters(
        threshold,
        sum(i for i, _ in layers.values()),
        sum(t for _, t in layers.values()),
        layers,
    )
