"""How a round's cost grows: with the number of layers at a fixed size, and with the peers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graftopt
from graftopt.kernels import cpu

from .common import Idle, Round, describe, make_models, synced

TOTAL = 4_000_000  # parameters per model, split over the layers


class Stack(nn.Module):
    """``layers`` linear layers holding ``TOTAL`` weights between them (never run forward)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        side = int((TOTAL // layers) ** 0.5)
        self.body = nn.Sequential(*(nn.Linear(side, side, bias=False) for _ in range(layers)))


def _stacks(layers: int, k: int, device: torch.device | str = "cpu") -> list[nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(Stack(layers).to(device))
    return out


@pytest.mark.parametrize("impl", ["graftopt", "floor"])
@pytest.mark.parametrize("layers", [10, 100, 1000])
def test_layers_at_fixed_size(benchmark, layers, impl, device):
    r = Round(_stacks(layers, 2, device), "layer")
    benchmark.group = "scaling: layers at fixed size (4M params, k=2)"
    benchmark.extra_info.update(
        model=f"stack{layers}",
        k=2,
        level="layer",
        impl=impl,
        layers=layers,
        device=describe(device),
    )
    try:
        benchmark.pedantic(synced(getattr(r, impl)), rounds=30, warmup_rounds=3)
    finally:
        r.close()


class AllToAll:
    """Model 0 grafts from all others (one host, ``m`` peers); the others only supply."""

    def __init__(self, models: list[nn.Module]) -> None:
        self.opt = graftopt.GraftOptimizer(
            Idle(models[0].parameters()), models[1:], every=1, model=models[0]
        )
        names = [n for u in self.opt.units for n in u.members]
        tables = [graftopt.adapters.base.tensor_table(m) for m in models]
        self.hosts = [tables[0][n].detach() for n in names]
        self.peers = [[t[n].detach() for n in names] for t in tables[1:]]

    def graftopt(self) -> None:
        self.opt.step()

    def floor(self) -> None:
        for p in self.peers:
            torch._foreach_lerp_(self.hosts, p, 0.5)


def _time_host(benchmark, r: AllToAll, group: str, model: str, peers: int, impl, device, rounds):
    benchmark.group = group
    benchmark.extra_info.update(
        model=model, peers=peers, level="layer", impl=impl, device=describe(device)
    )
    try:
        benchmark.pedantic(synced(getattr(r, impl)), rounds=rounds, warmup_rounds=2)
    finally:
        r.opt.close()


@pytest.mark.parametrize("impl", ["graftopt", "floor"])
@pytest.mark.parametrize("peers", [1, 2, 4, 8])
def test_peers(benchmark, peers, impl, device):
    r = AllToAll(_stacks(100, peers + 1, device))
    group = "scaling: peers of one host (4M params, 100 layers)"
    _time_host(benchmark, r, group, "stack100", peers, impl, device, rounds=30)


@pytest.mark.parametrize("impl", ["graftopt", "floor"])
@pytest.mark.parametrize("peers", [1, 2, 4])
def test_peers_resnet50(benchmark, peers, impl, device):
    """The usage of the README: ``GraftOptimizer(SGD(host.parameters()), peers=[...])``."""
    r = AllToAll(make_models("resnet50", peers + 1, device))
    group = "scaling: peers of one host (resnet50)"
    _time_host(benchmark, r, group, "resnet50", peers, impl, device, rounds=15)


class KernelsOnly:
    """The C kernels a round of one host and one plain peer needs, without the engine around
    them: histograms of both models and the blend, either in two passes over all tensors (as a
    round runs them) or in chunks of about ``MB`` megabytes, each chunk counted and blended
    while it is in cache (what a fused round could reach)."""

    MB = 4

    def __init__(self, models: list[nn.Module]) -> None:
        hosts, peers = ([p.detach() for p in m.parameters()] for m in models)
        chunks: list[list[int]] = [[]]
        size = 0
        for i, h in enumerate(hosts):
            chunks[-1].append(i)
            size += h.numel() * h.element_size()
            if size >= self.MB * 1e6:
                chunks.append([])
                size = 0
        self.chunks = [self._kernels(hosts, peers, c) for c in chunks if c]
        self.whole = self._kernels(hosts, peers, list(range(len(hosts))))
        self.hosts, self.peers = hosts, peers

    @staticmethod
    def _kernels(hosts, peers, idx):
        h, p = [hosts[i] for i in idx], [peers[i] for i in idx]
        hist = cpu.Histogram(h + p, [1] * (2 * len(idx)))
        mix = cpu.Mix(h, h, [p], list(range(len(idx))), [0] * len(idx))
        return hist, mix, torch.full((1, len(idx)), 0.5)

    def two_passes(self) -> None:
        hist, mix, alpha = self.whole
        hist.run(10)
        mix.run(alpha)

    def chunked(self) -> None:
        for hist, mix, alpha in self.chunks:
            hist.run(10)
            mix.run(alpha)

    def floor(self) -> None:
        torch._foreach_lerp_(self.hosts, self.peers, 0.5)


@pytest.mark.parametrize("impl", ["two_passes", "chunked", "floor"])
def test_kernels_resnet50(benchmark, impl, device):
    """How far a round of one host and one plain peer could go on CPU: its kernels alone."""
    if device.type != "cpu" or not cpu.available():
        pytest.skip("the C kernels run on CPU")
    r = KernelsOnly(make_models("resnet50", 2, device))
    benchmark.group = "scaling: the kernels of one host and one plain peer (resnet50)"
    benchmark.extra_info.update(model="resnet50", peers=1, impl=impl, device=describe(device))
    benchmark.pedantic(getattr(r, impl), rounds=15, warmup_rounds=2)
