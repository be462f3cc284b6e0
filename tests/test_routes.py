"""The round's kernel routes: one dispatcher picks them, and every route runs the whole round.

C and pure torch run here; Triton runs on CPU tensors under ``TRITON_INTERPRET=1`` in a child
process (the interpreter must be switched on before triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graftopt
from graftopt import functional as F
from graftopt import kernels
from graftopt.kernels import cpu

from .conftest import TRITON_MODULES, make_net, require_c

ROOT = Path(__file__).resolve().parents[1]
# The C kernel fuses multiply-adds the torch route rounds separately: the routes agree within
# two float32 ulps of the tensor's largest value (docs/concepts.md), Triton and torch bit for bit.
ULP2 = 2 * torch.finfo(torch.float32).eps


def ring_round(route: str) -> list[dict[str, torch.Tensor]]:
    """Three distinct SmallNets after two rounds of a ring (every step, filter level) on
    ``route``, with steps that change nothing between rounds (lr 0)."""
    nets = [make_net(s) for s in range(3)]
    inner = [torch.optim.SGD(n.parameters(), lr=0.0) for n in nets]
    opts = graftopt.ring(nets, inner, every=1, same_init=False, level="filter", route=route)
    for _ in range(2):
        for opt in opts:
            opt.step()
    return [n.state_dict() for n in nets]


def _child(route: str, out: Path, extra_env: dict[str, str]) -> list[dict[str, torch.Tensor]]:
    code = (
        f"import torch, tests.test_routes as t; torch.save(t.ring_round({route!r}), {str(out)!r})"
    )
    env = {**os.environ, **extra_env}
    env.pop("GRAFTOPT_ROUTE", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def _assert_states(a, b, ulps: float) -> None:
    for sa, sb in zip(a, b, strict=True):
        for name, t in sa.items():
            atol = ulps * float(t.abs().max()) if t.is_floating_point() else 0
            torch.testing.assert_close(t, sb[name], rtol=0, atol=atol, msg=name)


def test_the_dispatcher_picks_and_refuses(monkeypatch):
    monkeypatch.delenv("GRAFTOPT_ROUTE", raising=False)
    assert kernels.route("cpu") == ("c" if cpu.available() else "torch")
    assert kernels.route("cpu", "torch") == "torch"
    assert kernels.route("meta") == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="route='triton' runs CUDA tensors"):
        kernels.route("cpu", "triton")
    with pytest.raises(ValueError, match="route='c' runs CPU tensors"):
        kernels.route("meta", "c")
    monkeypatch.setenv("GRAFTOPT_ROUTE", "torch")
    assert kernels.route("cpu") == "torch"
    host, peer = make_net(0), make_net(1)
    with pytest.raises(ValueError, match="route must be one of"):
        graftopt.GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], route="x")
    with pytest.raises(ValueError, match="route='triton'"):
        graftopt.graft_(host, [peer], route="triton")


def test_c_and_torch_routes_agree_on_a_ring_round():
    require_c()
    _assert_states(ring_round("c"), ring_round("torch"), ulps=ULP2)


def test_a_tensor_holding_nan_scores_nan_on_every_route():
    require_c()
    values = torch.randn(300, generator=torch.Generator().manual_seed(0))
    values[7] = float("nan")
    huge = torch.randn(300, dtype=torch.float64)
    huge[0] = 1e300  # finite in float64, beyond float32's range: scaled, not Inf
    for route in ("c", "torch"):
        scores = F.entropies([values, values.nan_to_num().abs() + 1, huge], route=route)
        assert scores[0].isnan() and scores[1:].isfinite().all(), route
        assert 0 < scores[2] < F.entropy(torch.randn(300), route=route), route


def test_triton_route_runs_the_whole_round_interpreted(tmp_path):
    pytest.importorskip("triton")
    triton = _child("triton", tmp_path / "triton.pt", {"TRITON_INTERPRET": "1"})
    # Triton's histogram bins as torch.histc does, and the mix is torch's: bit for bit.
    _assert_states(triton, ring_round("torch"), ulps=0)


def test_the_round_tests_pass_on_the_triton_route():
    """The Triton-interpreted job: the round test modules with GRAFTOPT_ROUTE=triton."""
    pytest.importorskip("triton")
    if os.environ.get("GRAFTOPT_ROUTE"):
        pytest.skip("already inside a route job")
    env = {**os.environ, "GRAFTOPT_ROUTE": "triton", "TRITON_INTERPRET": "1"}
    modules = [f"tests/{m}.py" for m in TRITON_MODULES]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *modules]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "[triton" in done.stdout or " passed" in done.stdout
