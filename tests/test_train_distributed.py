"""``torchrun -m graftopt.train``: one peer per process, the outputs of the one-process run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from graftopt.train import cli
from graftopt.train.summary import read_csv

from .test_train import TINY, _write_idx

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

# torchrun sets OMP_NUM_THREADS=1; the one-process run gets the same, so that every kernel
# sums in the same order and the runs agree bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(key, None)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], procs: int = 2) -> subprocess.CompletedProcess[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(_port())]
    return subprocess.run(
        [*launch, "-m", "graftopt.train", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=240,
    )


def _here(args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "graftopt.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    idx = _write_idx(tmp_path_factory.mktemp("idx"))
    return ["--data-dir", str(idx), "--epochs", "2", *TINY, "--progress", "plain"]


def test_torchrun_resumed_equals_one_process_run(data: list[str], tmp_path: Path) -> None:
    """2 ranks, stopped after epoch 1 and resumed, write what one process writes, bit for bit."""
    one, ranks = tmp_path / "one", tmp_path / "ranks"
    proc = _here([*data, "--output", str(one)])
    assert proc.returncode == 0, proc.stderr

    proc = _torchrun([*data, "--output", str(ranks), "--stop-after", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "torchrun: 2 processes, one peer each, on cpu (gloo)" in proc.stdout
    assert proc.stdout.count("recipe: ") == 1  # rank 0 alone prints
    assert sorted(p.name for p in ranks.glob("checkpoint*")) == [
        "checkpoint-rank0-epoch1.pth",
        "checkpoint-rank1-epoch1.pth",
    ]
    assert len(read_csv(ranks / "metrics.csv")) == 6  # 4 networks + 2 ensembles, one epoch
    # As if killed while saving epoch 2: rank 0's file written, rank 1's half-written.
    shutil.copy(ranks / "checkpoint-rank0-epoch1.pth", ranks / "checkpoint-rank0-epoch2.pth")
    stale = ranks / ".checkpoint-rank1-epoch2.pth.x1y2z3.tmp"
    stale.write_bytes(b"torn")
    proc = _torchrun(["--resume", str(ranks), "--no-report"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| grafted mean ± std |") == 1
    assert not stale.exists()
    assert sorted(p.name for p in ranks.glob("checkpoint*")) == [  # epoch 1's set dropped
        "checkpoint-rank0-epoch2.pth",
        "checkpoint-rank1-epoch2.pth",
    ]

    for name in ("metrics.csv", "alphas.csv", "summary.md", "summary.json"):
        assert (ranks / name).read_text() == (one / name).read_text(), name
    rows = read_csv(ranks / "metrics.csv")
    assert [r["graft_rounds"] for r in rows if r["kind"] == "grafted"] == [2, 2, 4, 4]
    whole = torch.load(one / "checkpoint.pth", weights_only=True)
    for rank in range(2):
        part = torch.load(ranks / f"checkpoint-rank{rank}-epoch2.pth", weights_only=True)
        assert (part["rank"], part["world_size"], part["epoch"]) == (rank, 2, 2)
        assert sorted(part["nets"]) == [f"baseline{rank}", f"grafted{rank}"]  # its lane only
        for net, state in part["nets"].items():
            for key, value in state["model"].items():
                assert torch.equal(value, whole["nets"][net]["model"][key]), (net, key)
    assert cli.main(["inspect", str(ranks), "--network", "grafted1"]) == 0  # reads rank 1's file
    # A torchrun run is resumed with torchrun: the one-process command says so.
    proc = _here(["--resume", str(ranks)])
    assert proc.returncode == 2
    assert "trained by torchrun over 2 processes" in proc.stderr


def test_torchrun_with_filter_matching_equals_one_process_run(
    data: list[str], tmp_path: Path
) -> None:
    """Matching runs on the tensors a rank receives: the same rounds as in one process."""
    opts = [*data, "--epochs", "1", "--graft-align", "--no-same-init"]
    one, ranks = tmp_path / "one", tmp_path / "ranks"
    proc = _here([*opts, "--output", str(one), "--no-report"])
    assert proc.returncode == 0, proc.stderr
    proc = _torchrun([*opts, "--output", str(ranks), "--no-report"])
    assert proc.returncode == 0, proc.stderr
    assert "filters matched" in proc.stdout
    for name in ("metrics.csv", "alphas.csv"):
        assert (ranks / name).read_text() == (one / name).read_text(), name


def test_torchrun_resume_without_a_common_epoch_fails_clearly(
    data: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    proc = _torchrun([*data, "--output", str(out), "--stop-after", "1"])
    assert proc.returncode == 0, proc.stderr
    (out / "checkpoint-rank1-epoch1.pth").rename(out / "checkpoint-rank1-epoch7.pth")
    proc = _torchrun(["--resume", str(out)])
    assert proc.returncode != 0
    assert "no epoch of" in proc.stderr and "rank 0: epochs [1], rank 1: epochs [7]" in proc.stderr


def test_torchrun_with_another_peer_count_fails_clearly(data: list[str], tmp_path: Path) -> None:
    proc = _torchrun([*data, "--peers", "3", "--output", str(tmp_path / "o")])
    assert proc.returncode != 0
    assert "--peers 3, but torchrun started 2 processes" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_peer_error_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PeerError is printed as an error naming the rank, and the exit status is 1."""
    from graftopt.distributed import PeerError

    class Ctx:
        rank, closed = 1, False

        def close(self) -> None:
            self.closed = True

    ctx = Ctx()

    def fail(*args: object) -> int:
        raise PeerError("graft round 2: rank 0 never reported", ranks=[0])

    monkeypatch.setattr("graftopt.train.ranks.start", lambda cfg: ctx)
    monkeypatch.setattr(cli, "_train_run", fail)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert "graftopt train: rank 1: error: graft round 2: rank 0 never reported" in err
    assert not ctx.closed  # the process group is broken: leave without collectives
