"""graftopt.timm: a train.py-shaped script (tests/timm_script.py) grafting one peer per rank."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from torch import nn

import graftopt
import graftopt.models
import graftopt.timm
from graftopt import GraftOptimizer

from .conftest import make_net
from .test_train_distributed import ENV as TORCHRUN_ENV
from .test_train_distributed import _port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

ROOT = Path(__file__).resolve().parent.parent
ENV = {**TORCHRUN_ENV, "PYTHONPATH": str(ROOT)}


def _script(out: Path, *args: str, procs: int = 2) -> subprocess.CompletedProcess[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(_port())]
    cmd = [*launch, "-m", "tests.timm_script", "--output", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240, cwd=out)


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _peer(out: Path, experiment: str, p: int) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = out / experiment / f"peer{p}"
    log = json.loads((folder / "log.json").read_text())
    return log, torch.load(folder / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with rounds, the same without, two epochs in one go, and one resumed."""
    out = tmp_path_factory.mktemp("timm")
    _ok(_script(out, "--experiment", "one", "--model-ema"))
    _ok(_script(out, "--experiment", "norounds", "--model-ema", "--graft-start", "1000000"))
    _ok(_script(out, "--experiment", "two", "--model-ema", "--epochs", "2"))
    shutil.copytree(out / "one", out / "resumed")
    resume = str(out / "resumed" / "peer{peer}" / "last.pth.tar")
    _ok(_script(out, "--experiment", "resumed", "--model-ema", "--epochs", "2", "--resume", resume))
    return out


def test_each_rank_is_a_peer_with_its_own_folder_seed_and_whole_data(runs: Path) -> None:
    logs = [_peer(runs, "one", p)[0] for p in range(2)]
    assert [log["seed"] for log in logs] == [42, 43]
    assert [log["samples"] for log in logs] == [[48], [48]]  # no sampler split between peers
    assert [log["rounds"] for log in logs] == [[6], [6]]  # 48 / 8 updates: at the epoch's end
    for p in range(2):
        assert (runs / "one" / f"peer{p}" / "last.pth.tar").is_file()
    # One start, their own data orders: before any round the peers differ.
    a, b = (_peer(runs, "norounds", p)[1] for p in range(2))
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])


def test_round_across_ranks_equals_the_in_process_ring(runs: Path) -> None:
    before = [_peer(runs, "norounds", p) for p in range(2)]
    assert [log["rounds"] for log, _ in before] == [[], []]
    models = []
    for _, state in before:
        m = timm.create_model("cifar_resnet20", num_classes=3, pretrained=False)
        m.load_state_dict(state)
        models.append(m)
    inners = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    for opt in graftopt.ring(models, inners, same_init=False, every=1, **graftopt.timm.DEFAULTS):
        opt.step()
    for p, model in enumerate(models):
        after = _peer(runs, "one", p)[1]
        for name, value in model.state_dict().items():
            torch.testing.assert_close(after[name], value, msg=f"peer {p}: {name}")


def test_resumed_peers_continue_on_schedule(runs: Path) -> None:
    for p in range(2):
        (log, resumed), (ref_log, ref) = _peer(runs, "resumed", p), _peer(runs, "two", p)
        assert log["rounds"] == ref_log["rounds"] == [6, 12]
        assert log["committed"] == 2 and log["steps"] == 12
        for name, value in ref.items():
            torch.testing.assert_close(resumed[name], value, msg=f"peer {p}: {name}")


def test_three_peers_with_mixup_scaler_and_accumulation(tmp_path: Path) -> None:
    args = ["--experiment", "x", "--epochs", "2", "--model-ema", "--mixup", "0.4", "--scaler"]
    _ok(_script(tmp_path, *args, "--grad-accum-steps", "2", procs=3))
    logs = [_peer(tmp_path, "x", p)[0] for p in range(3)]
    # 6 batches of 2 accumulated: 3 updates per epoch, one round at each epoch's end.
    assert [log["rounds"] for log in logs] == [[3, 6]] * 3
    assert [log["steps"] for log in logs] == [6] * 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume", "one/last.pth.tar"], "names one checkpoint for all 2 peers"),
        (["--sync-bn"], "--sync-bn"),
        (["--replicas", "2"], "2 ranks (1 x 2 replicas)"),
    ],
    ids=["resume-without-peer", "sync-bn", "one-network-of-two-replicas"],
)
def test_setup_refuses(tmp_path: Path, args: list[str], message: str) -> None:
    proc = _script(tmp_path, *args)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_k_networks_of_d_replicas(tmp_path: Path) -> None:
    """2 x 2 ranks: DDP over each network's replicas, grafting between the networks, resumed
    from each network's checkpoints on schedule."""
    args = ["--replicas", "2", "--graft-every", "4", "--model-ema"]
    _ok(_script(tmp_path, "--experiment", "kd", *args, "--epochs", "2", procs=4))
    # The same run stopped after one epoch and resumed from each network's checkpoint.
    _ok(_script(tmp_path, "--experiment", "kd1", *args, procs=4))
    resume = str(tmp_path / "kd1" / "peer{peer}" / "last.pth.tar")
    _ok(
        _script(
            tmp_path, "--experiment", "kd1", *args, "--epochs", "2", "--resume", resume, procs=4
        )
    )
    for p in range(2):
        folder = tmp_path / "kd" / f"peer{p}"
        logs = [json.loads((folder / f"log{s}.json").read_text()) for s in ("", ".replica1")]
        # Each replica takes half of the 48 samples: 3 updates of 8 per epoch, rounds every 4.
        assert [log["samples"] for log in logs] == [[24, 24]] * 2
        assert [log["rounds"] for log in logs] == [[4]] * 2
        assert [log["seed"] for log in logs] == [42 + 2 * p] * 2  # rank p * 2 + d: seed + rank
        ours = torch.load(folder / "final.pt", weights_only=True)
        replica = torch.load(folder / "final.replica1.pt", weights_only=True)
        assert ours.keys() == replica.keys()
        for name, t in ours.items():
            assert torch.equal(t, replica[name]), name  # rounds read identical replicas
        assert (folder / "last.pth.tar").is_file()  # replica 0 saves
    # A round of two makes them one network (alphas a and 1 - a); two updates later they differ.
    a, b = (_peer(tmp_path, "kd", p)[1] for p in range(2))
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])
    for p in range(2):
        (log, resumed), (ref_log, ref) = _peer(tmp_path, "kd1", p), _peer(tmp_path, "kd", p)
        assert log["rounds"] == ref_log["rounds"] == [4]
        assert log["steps"] == 6 and log["committed"] == 1
        for name, value in ref.items():
            torch.testing.assert_close(resumed[name], value, msg=f"peer {p}: {name}")


def test_shard_splits_the_set_between_replicas() -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.arange(10))
    shards = [graftopt.timm.Shard(data, 3, d, seed=5) for d in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded as DistributedSampler pads
    seen = [int(s[i][0]) for s in shards for i in range(len(s))]
    assert sorted(set(seen)) == list(range(10))
    assert len(seen) - len(set(seen)) == 2
    again = graftopt.timm.Shard(data, 3, 1, seed=5)
    assert again.indices == shards[1].indices  # the replicas of a network agree on the split
    assert graftopt.timm.Shard(data, 3, 1, seed=6).indices != shards[1].indices
    shards[0].transform = "t"  # timm's create_loader sets the dataset's transform
    assert data.transform == "t" and shards[2].transform == "t"
    with pytest.raises(ValueError, match="cannot feed 3 replicas"):
        graftopt.timm.Shard(TensorDataset(torch.arange(2)), 3, 0, seed=0)


def test_setup_outside_torchrun_is_refused() -> None:
    import argparse

    with pytest.raises(ValueError, match="under torchrun"):
        graftopt.timm.setup(argparse.Namespace(distributed=False, seed=0))


@pytest.mark.parametrize("every", [6, 2])
def test_resuming_mid_epoch_warns(every: int) -> None:
    """Rounds shift on a resume from inside an epoch, whatever ``every`` (epochs of 6)."""
    model = make_net(0)
    opt = GraftOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), [make_net(1)], every=every)
    opt.register_load_state_dict_post_hook(lambda o: graftopt.timm._warn_mid_epoch(o, 6))
    state = opt.state_dict()
    state["graft"]["steps"] = 4
    state["graft"]["arrived"] = state["graft"]["committed"] = 4 // every
    with pytest.warns(UserWarning, match="4 updates into an epoch of 6"):
        opt.load_state_dict(state)
    state["graft"]["steps"] = 6
    state["graft"]["arrived"] = state["graft"]["committed"] = 6 // every
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(state)


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def test_adahessian_runs_second_order_through_the_wrapper() -> None:
    model, peer = make_net(0), make_net(1)
    inner = create_optimizer_v2(model, opt="adahessian", lr=0.1)
    opt = GraftOptimizer(inner, [peer], every=2, model=model)
    # As timm's train.py decides how to call backward:
    second_order = hasattr(opt, "is_second_order") and opt.is_second_order
    assert second_order
    before = model.conv1.weight.detach().clone()
    for seed in range(2):
        opt.zero_grad()
        _loss(model, seed).backward(create_graph=second_order)
        opt.step()
    assert opt.rounds == 1 and not torch.equal(model.conv1.weight, before)


def test_lookahead_sync_reaches_the_inner_optimizer() -> None:
    model, peer = make_net(0), make_net(1)
    inner = create_optimizer_v2(model, opt="lookahead_sgd", lr=0.1, momentum=0.9)
    opt = GraftOptimizer(inner, [peer], every=100, model=model)
    for seed in range(7):  # past lookahead's k = 6 steps, so that slow weights exist
        opt.zero_grad()
        _loss(model, seed).backward()
        opt.step()
    assert hasattr(opt, "sync_lookahead")
    fast = model.conv1.weight.detach().clone()
    opt.sync_lookahead()  # timm's end of epoch: the weights become the slow weights
    assert not torch.equal(model.conv1.weight, fast)


def test_rounds_every_n_updates(tmp_path: Path) -> None:
    _ok(_script(tmp_path, "--experiment", "n", "--graft-every", "4", "--epochs", "2"))
    assert [_peer(tmp_path, "n", p)[0]["rounds"] for p in range(2)] == [[4, 8, 12]] * 2


def test_peer_timeout_comes_from_the_argument_or_the_environment(monkeypatch) -> None:
    from graftopt.timm import TIMEOUT_ENV, _timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert _timeout(None) == 300.0
    monkeypatch.setenv(TIMEOUT_ENV, "45")
    assert _timeout(None) == 45.0 and _timeout(12) == 12.0
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="GRAFTOPT_PEER_TIMEOUT='soon' is not a number"):
        _timeout(None)
    with pytest.raises(ValueError, match="must be a positive number of seconds"):
        _timeout(float("inf"))


def test_replicas_without_shard_and_ddp_are_refused() -> None:
    """GRAFTOPT_REPLICAS with the three-line script would let the replicas drift apart."""
    from graftopt.timm import TimmPeers

    peers = TimmPeers(peer=0, num_peers=2, seed=0, replicas=2)
    with pytest.raises(ValueError, match=r"never called peers.shard\(dataset_train\) and model"):
        peers.check_prepared()
    peers.shard(list(range(8)))
    with pytest.raises(ValueError, match=r"never called model = peers.prepare_distributed"):
        peers.check_prepared()

    class Task:
        def prepare_distributed(self, **kwargs) -> None:
            pass

        def get_trainable_module(self) -> nn.Module:
            return nn.Linear(2, 2)

    peers.prepare_distributed(Task())
    peers.check_prepared()
    TimmPeers(peer=0, num_peers=2, seed=0).check_prepared()  # one replica: nothing to add
