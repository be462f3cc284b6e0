"""Shared fixtures: small models and an independent, straightforward grafting reference."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn


class SmallNet(nn.Module):
    """Conv-BN pairs, a depthwise conv, a conv without norm and a classifier."""

    def __init__(self, in_chans: int = 1, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def make_net(seed: int, **kwargs) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet(**kwargs)
    with torch.no_grad():  # distinct, non-trivial norm parameters and statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture
def nets():
    return [make_net(s) for s in range(4)]


def ref_entropy(t: torch.Tensor, bins: int = 10) -> float:
    """H over torch.histc's bins, computed the plain way."""
    t = t.detach().float().flatten()
    counts = torch.histc(t, bins=bins, min=float(t.min()), max=float(t.max()))
    p = counts / t.numel()
    return float(-sum(float(q) * math.log(float(q)) for q in p if q > 0))


def ref_alpha(hh: float, hp: float, A: float = 0.4, c: float = 500.0) -> float:
    return 0.5 + A / math.pi * math.atan(c * (hh - hp))


# The straightforward per-layer graft of SmallNet: unit -> (scored tensor, members).
SMALLNET_UNITS = {
    "conv1": ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"],
    "dw": ["dw.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"],
    "conv3": ["conv3.weight", "conv3.bias"],
    "fc": ["fc.weight", "fc.bias"],
}


def ref_graft(host: nn.Module, peers: list[nn.Module], A: float = 0.4, c: float = 500.0) -> dict:
    """The expected host state after one layer-level entropy round, in float64."""
    hs = {k: v.detach().clone().double() for k, v in host.state_dict().items()}
    ps = [{k: v.detach().clone().double() for k, v in p.state_dict().items()} for p in peers]
    out = dict(hs)
    for unit, members in SMALLNET_UNITS.items():
        w = f"{unit}.weight"
        alphas = [ref_alpha(ref_entropy(hs[w]), ref_entropy(p[w]), A, c) for p in ps]
        for name in members:
            out[name] = sum(a * hs[name] + (1 - a) * p[name] for a, p in zip(alphas, ps)) / len(ps)
    return out


# Modules whose tests run on every route of the round's kernels: C and pure torch here, and
# Triton (interpreted on CPU tensors) in the job tests/test_routes.py starts with
# GRAFTOPT_ROUTE=triton TRITON_INTERPRET=1, on the first two (the interpreter is slow; the
# round options' code past the histogram is the torch route's).
ROUTE_MODULES = ("test_optimizer", "test_rounds", "test_round_options")
TRITON_MODULES = ROUTE_MODULES[:2]
ROUTES_HERE = ["triton"] if os.environ.get("GRAFTOPT_ROUTE") == "triton" else ["c", "torch"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rsplit(".", 1)[-1] in ROUTE_MODULES:
        metafunc.fixturenames.append("kernel_path")
        metafunc.parametrize("kernel_path", ROUTES_HERE, indirect=True)


@pytest.fixture
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    from graftopt.kernels import cpu

    monkeypatch.setenv("GRAFTOPT_ROUTE", request.param)
    if request.param == "c":
        require_c()
    yield request.param
    monkeypatch.undo()
    cpu.library.cache_clear()


def require_c() -> None:
    """Skip where no compiler is found; where one is, a failed build fails the test."""
    import os
    import shutil

    from graftopt.kernels import cpu

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("GRAFTOPT_NO_CKERNEL", "") not in ("", "0"):
        pytest.skip("C kernels switched off (GRAFTOPT_NO_CKERNEL)")
    if cc is None or shutil.which(cc) is None:
        pytest.skip("no C compiler for the CPU kernels")
    assert cpu.available(), f"a C compiler is here but the kernels did not build: {cpu.status()}"


@pytest.fixture
def c_kernels() -> None:
    """For tests of the C kernels themselves (see :func:`require_c`)."""
    require_c()
