"""Models and rounds shared by the benchmarks."""

from __future__ import annotations

import timm
import torch
from torch import nn

import graftopt
import graftopt.models

from . import reference


def make_models(name: str, k: int, device: torch.device | str = "cpu") -> list[nn.Module]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(timm.create_model(name, pretrained=False).eval().to(device))
    return models


def describe(device: torch.device) -> str:
    """The device as the result tables name it (with the GPU's name on CUDA)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synced(fn):
    """``fn`` followed by a wait for the device of its models, so a timing covers its work."""

    def run() -> None:
        fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    return run


class Idle(torch.optim.Optimizer):
    """An inner optimizer whose step does nothing, so a timed ``GraftOptimizer.step()`` is the
    round alone."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    def step(self, closure=None):
        return None


class Round:
    """One simultaneous graft round of a ring of models, three ways, on the same tensors."""

    def __init__(self, models: list[nn.Module], level: str = "layer") -> None:
        self.models = models
        self.level = level
        inner = [Idle(m.parameters()) for m in models]
        self.opts = graftopt.ring(models, inner, same_init=False, every=1, level=level)
        self.units = self.opts[0].units
        tables = [graftopt.adapters.base.tensor_table(m) for m in models]
        names = [n for u in self.units for n in u.members]
        self.tables = [{n: t[n].detach() for n in names} for t in tables]
        self.hosts = [t for tab in self.tables for t in tab.values()]
        self.peers = [t for i in range(len(models)) for t in self.tables[i - 1].values()]

    def graftopt(self) -> None:
        for opt in self.opts:
            opt.step()

    def reference(self) -> None:
        k = len(self.models)
        reference.graft_round(
            self.tables, [self.tables[i - 1] for i in range(k)], self.units, level=self.level
        )

    def floor(self) -> None:
        torch._foreach_lerp_(self.hosts, self.peers, 0.5)

    def close(self) -> None:
        for o in self.opts:
            o.close()


__all__ = ["Idle", "Round", "describe", "make_models", "synced"]
