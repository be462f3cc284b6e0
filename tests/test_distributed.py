"""Grafting across processes: gloo on CPU, ranks started here (fork) and through torchrun.

Run as ``torchrun --nproc-per-node K -m tests.test_distributed OUT`` it trains one ring peer per
rank and saves each rank's weights under OUT.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import graftopt
from graftopt import GraftOptimizer
from graftopt.distributed import (
    AllPeers,
    PeerError,
    RingPeers,
    init_from_env,
    peer_groups,
)
from graftopt.distributed.sources import _first_difference

from .conftest import make_net

EVERY, STEPS, LR = 2, 6, 0.1
TIMEOUT = 2.0  # seconds a rank waits for its peers at a round in the fault tests
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def _batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, step: int) -> None:
    x, y = _batch(seed, step)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _reference(k: int, source: str) -> list[dict[str, torch.Tensor]]:
    """The same training in one process: graftopt.ring, or each model grafting from all others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks, so that no kernel splits its work differently
    try:
        models = [make_net(i) for i in range(k)]
        opts = [_sgd(m) for m in models]
        if source == "ring":
            grafted = graftopt.ring(models, opts, same_init=False, every=EVERY)
        else:
            grafted = [
                GraftOptimizer(
                    o, [m for j, m in enumerate(models) if j != i], every=EVERY, model=models[i]
                )
                for i, o in enumerate(opts)
            ]
        for s in range(STEPS):
            for i in range(k):
                _step(models[i], grafted[i], i, s)
        return [_state(m) for m in models]
    finally:
        torch.set_num_threads(threads)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], who: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{who}: {name} differs"


# -- what each rank runs -----------------------------------------------------------------------


def _train(
    rank: int, make_source: Callable[[], Any], steps: range = range(STEPS)
) -> dict[str, Any]:
    model = make_net(rank)
    source = make_source()
    opt = GraftOptimizer(_sgd(model), peers=source, every=EVERY)
    for s in steps:
        _step(model, opt, rank, s)
    return {"state": _state(model), "rounds": opt.rounds, "stats": list(source.stats)}


def _ring(rank: int, world: int) -> dict[str, Any]:
    return _train(rank, lambda: RingPeers(timeout=30))


def _ring_and_all(rank: int, world: int) -> dict[str, Any]:
    return {
        "ring": _train(rank, lambda: RingPeers(timeout=30)),
        "all": _train(rank, lambda: AllPeers(timeout=30)),
    }


def _resume(rank: int, world: int) -> dict[str, Any]:
    """Stop after step 3 (between rounds), save, restore into new objects, finish."""
    model = make_net(rank)
    opt = GraftOptimizer(_sgd(model), peers=RingPeers(timeout=30), every=EVERY)
    for s in range(3):
        _step(model, opt, rank, s)
    saved = {"model": _state(model), "opt": opt.state_dict()}
    opt.close()
    model = make_net(100 + rank)
    model.load_state_dict(saved["model"])
    opt = GraftOptimizer(_sgd(model), peers=RingPeers(timeout=30), every=EVERY)
    opt.load_state_dict(saved["opt"])
    for s in range(3, STEPS):
        _step(model, opt, rank, s)
    return {"state": _state(model), "rounds": opt.rounds}


def _mismatch(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 has a wider classifier, then another ``every``: both ranks must refuse."""
    errors = []
    model = make_net(rank, classes=3 + rank)
    opt = GraftOptimizer(_sgd(model), peers=RingPeers(timeout=30), every=EVERY)
    try:
        for s in range(EVERY):
            _step(model, opt, rank, s)
    except ValueError as e:
        errors.append(str(e))
    opt.close()
    model = make_net(rank)
    opt = GraftOptimizer(_sgd(model), peers=RingPeers(timeout=30), every=EVERY + rank)
    try:
        for s in range(EVERY + rank):
            _step(model, opt, rank, s)
    except ValueError as e:
        errors.append(str(e))
    return {"errors": errors}


def _fault(rank: int, world: int, how: str) -> dict[str, Any]:
    """The last rank dies (or hangs) before its second round; the others must fail cleanly."""
    model = make_net(rank)
    opt = GraftOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR, foreach=False),
        peers=RingPeers(timeout=TIMEOUT),
        every=EVERY,
    )
    for s in range(2 * EVERY - 1):
        _step(model, opt, rank, s)
    if rank == world - 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    x, y = _batch(rank, 2 * EVERY - 1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    # What the inner step alone writes: the round must add nothing to it.
    want = {n: p.detach().add(p.grad, alpha=-LR) for n, p in model.named_parameters()}
    try:
        opt.step()
    except PeerError as e:
        got = dict(model.named_parameters())
        untouched = all(torch.equal(got[n], want[n]) for n in want)
        return {"error": str(e), "ranks": e.ranks, "untouched": untouched, "rounds": opt.rounds}
    return {"error": None}


def _kxd(rank: int, world: int) -> dict[str, Any]:
    """2 peers x 2 data-parallel replicas: DDP inside a peer, the ring across peers."""
    graft, dp = peer_groups(2, 2)
    peer, replica = divmod(rank, 2)
    model = make_net(peer)
    ddp = nn.parallel.DistributedDataParallel(model, process_group=dp)
    opt = GraftOptimizer(_sgd(ddp), peers=RingPeers(graft, timeout=30), every=EVERY, model=ddp)
    for s in range(STEPS + 1):  # not ending on a round: two peers are equal right after one
        _step(ddp, opt, 10 * peer + replica, s)
    # Parameters only: DDP hands its first replica's buffers (norm statistics) to the others
    # at each forward, so after the last forward each replica holds its own batch's statistics.
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"state": params, "rounds": opt.rounds}


SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "ring": _ring,
    "ring_and_all": _ring_and_all,
    "resume": _resume,
    "mismatch": _mismatch,
    "kill": lambda rank, world: _fault(rank, world, "kill"),
    "hang": lambda rank, world: _fault(rank, world, "hang"),
    "kxd": _kxd,
}


def _child(scenario: str, rank: int, world: int, port: int, out: str, finishers: range) -> None:
    code = 1
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        result = SCENARIOS[scenario](rank, world)
        torch.save(result, Path(out) / f"{rank}.pt")
        code = 0
    except BaseException as e:
        torch.save({"crash": f"{type(e).__name__}: {e}"}, Path(out) / f"{rank}.pt")
    if rank == 0:  # rank 0 hosts the store: stay until the others are done with it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            (Path(out) / f"{r}.pt").exists() for r in finishers
        ):
            time.sleep(0.05)
    # Skip the interpreter's teardown: this is a fork of the test process.
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    scenario: str, world: int, out: Path, wait_for: range | None = None
) -> list[dict[str, Any] | None]:
    """Run a scenario on ``world`` forked ranks; any outside ``wait_for`` is killed at the end."""
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    wait_for = wait_for if wait_for is not None else range(world)
    args = [(scenario, r, world, port, str(out), wait_for) for r in range(world)]
    procs = [ctx.Process(target=_child, args=a) for a in args]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    try:
        for r in wait_for:
            procs[r].join(max(deadline - time.monotonic(), 0.1))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    results = [
        torch.load(out / f"{r}.pt", weights_only=False) if (out / f"{r}.pt").exists() else None
        for r in range(world)
    ]
    for r in wait_for:
        assert results[r] is not None and "crash" not in results[r], f"rank {r}: {results[r]}"
    return results


# -- tests -------------------------------------------------------------------------------------


def test_two_ranks_match_in_process_ring(tmp_path):
    results = _launch("ring", 2, tmp_path)
    want = _reference(2, "ring")
    for r, res in enumerate(results):
        _assert_same(res["state"], want[r], f"rank {r}")
        assert res["rounds"] == STEPS // EVERY
        stats = res["stats"]
        assert [s.round for s in stats] == [1, 2, 3]
        units = sum(
            t.numel() * t.element_size() for n, t in want[r].items() if "num_batches" not in n
        )
        assert all(s.bytes_sent == s.bytes_received == units for s in stats)


def test_three_ranks_match_in_process_ring_and_all_peers(tmp_path):
    results = _launch("ring_and_all", 3, tmp_path)
    for source in ("ring", "all"):
        want = _reference(3, source)
        for r, res in enumerate(results):
            _assert_same(res[source]["state"], want[r], f"{source}, rank {r}")
            assert res[source]["rounds"] == STEPS // EVERY


def test_resume_from_per_rank_checkpoints(tmp_path):
    results = _launch("resume", 2, tmp_path)
    want = _reference(2, "ring")
    for r, res in enumerate(results):
        _assert_same(res["state"], want[r], f"rank {r}")
        assert res["rounds"] == STEPS // EVERY


def test_handshake_mismatch_fails_on_every_rank(tmp_path):
    results = _launch("mismatch", 2, tmp_path)
    for res in results:
        shape, every = res["errors"]
        assert "graft handshake failed" in shape
        assert "'fc.weight'" in shape and "(3, 8)" in shape and "(4, 8)" in shape
        assert f"every={EVERY + 1}" in every and f"every={EVERY}" in every


@pytest.mark.parametrize(("how", "world"), [("kill", 3), ("hang", 2)])
def test_dead_or_hung_peer_fails_the_others_cleanly(tmp_path, how, world):
    results = _launch(how, world, tmp_path, wait_for=range(world - 1))
    for r in range(world - 1):
        res = results[r]
        assert res["error"] is not None, f"rank {r} did not fail"
        assert f"rank {world - 1} " in res["error"] and "wrote nothing" in res["error"]
        assert res["ranks"] == (world - 1,)
        assert res["untouched"], f"rank {r} wrote part of a failed round"
        assert res["rounds"] == 1


def test_data_parallel_peers_keep_replicas_in_step(tmp_path):
    results = _launch("kxd", 4, tmp_path)
    states = [res["state"] for res in results]
    _assert_same(states[1], states[0], "peer 0, replica 1")
    _assert_same(states[3], states[2], "peer 1, replica 1")
    assert not torch.equal(states[0]["fc.weight"], states[2]["fc.weight"])
    assert all(res["rounds"] == STEPS // EVERY for res in results)


def test_torchrun_two_ranks_match_in_process_ring(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd += ["-m", "tests.test_distributed", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _reference(2, "ring")
    for r in range(2):
        _assert_same(torch.load(tmp_path / f"{r}.pt"), want[r], f"rank {r}")


def test_first_difference_names_layer_and_shapes():
    base = {"source": "ring", "size": 2, "round": 1, "every": 2, "settings": {"A": 0.4}}
    base |= {"units": [["fc", ["fc.weight"]]], "tensors": [["fc.weight", [3, 8], "float32"]]}
    assert _first_difference(base, base, 1, 0) is None
    other = base | {"tensors": [["fc.weight", [4, 8], "float32"]]}
    msg = _first_difference(other, base, 1, 0)
    assert (
        msg == "layer 'fc.weight': rank 0 has shape (3, 8) float32, rank 1 has shape (4, 8) float32"
    )
    assert "round=3" in _first_difference(base | {"round": 3}, base, 1, 0)


def test_sources_need_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        RingPeers()


if __name__ == "__main__":
    ctx = init_from_env()
    if ctx is None:
        sys.exit("run under torchrun")
    torch.set_num_threads(1)
    result = _train(ctx.rank, ctx.ring_peers)
    torch.save(result["state"], Path(sys.argv[1]) / f"{ctx.rank}.pt")
    ctx.close()


FSDP2_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import graftopt
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
sharded, plain = net(), net()
fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
for host, peer in ((sharded, plain), (plain, sharded)):
    try:
        graftopt.GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], model=host)
        print("accepted")
    except ValueError as e:
        print(e)
dist.destroy_process_group()
"""


def test_fsdp2_models_are_refused_at_construction() -> None:
    """A fully_shard model's DTensors would crash the round's kernels: refused up front."""
    cmd = [sys.executable, "-c", FSDP2_SCRIPT % _free_port()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "accepted" not in proc.stdout, proc.stdout
    assert lines[0].startswith("the host's parameter '0.weight' is a DTensor")
    assert lines[1].startswith("peer 0's parameter '0.weight' is a DTensor")
