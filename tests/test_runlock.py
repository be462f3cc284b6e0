"""A run folder belongs to one run; checkpoints are written with the user's umask."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from graftopt.train import runlock
from graftopt.train.checkpoint import atomic_write_text
from graftopt.train.cli import main

from .test_train import TINY, _write_folder


def _lock(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "since": 0}
    (folder / runlock.LOCK).write_text(json.dumps(holder))


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, sleeper.pid)
        with pytest.raises(
            ValueError, match=f"in use by another graftopt run \\(process {sleeper.pid} on"
        ):
            runlock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    note = runlock.acquire(tmp_path)
    assert note is not None and str(sleeper.pid) in note
    assert json.loads((tmp_path / runlock.LOCK).read_text())["pid"] == os.getpid()
    runlock.release(tmp_path)
    assert not (tmp_path / runlock.LOCK).exists()


def test_another_hosts_lock_is_refused_and_never_released(tmp_path: Path) -> None:
    _lock(tmp_path, os.getpid(), host="elsewhere")
    with pytest.raises(ValueError, match="on elsewhere"):
        runlock.acquire(tmp_path)
    runlock.release(tmp_path)
    assert (tmp_path / runlock.LOCK).exists()


def test_second_run_on_a_held_folder_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _write_folder(tmp_path / "data")
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(out, sleeper.pid)
        args = ["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1"]
        assert main([*args, *TINY, "--output", str(out)]) == 2
    finally:
        sleeper.kill()
        sleeper.wait()
    err = capsys.readouterr().err
    assert "is in use by another graftopt run" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [runlock.LOCK]
    # The holder ended: the next run takes the folder over, says so and releases it at the end.
    assert main([*args, *TINY, "--output", str(out)]) == 0
    assert "took over the lock of process" in capsys.readouterr().out
    assert not (out / runlock.LOCK).exists()


def test_files_take_the_users_umask_which_is_never_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask was called"))
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"
                     " PytorchStreamWriter failed writing file data/0: file write failed"),
    ],
)  # fmt: skip
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    import torch

    from graftopt.train import checkpoint

    target = tmp_path / "checkpoint.pth"
    checkpoint.save_checkpoint(target, {"epoch": 1})

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(
        ValueError, match=r"cannot write the checkpoint .*previous checkpoint is kept"
    ):
        checkpoint.save_checkpoint(target, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_rank_checkpoint_of_another_rank_is_named_as_such() -> None:
    from types import SimpleNamespace

    from graftopt.train.world import Torchrun

    world = Torchrun(SimpleNamespace(rank=1, world_size=2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds rank 0's networks: a checkpoint was renamed"):
        world.check_resumed({"rank": 0, "world_size": 2})
    with pytest.raises(ValueError, match="resume with as many processes as the run had"):
        world.check_resumed({"rank": 1, "world_size": 3})
    world.check_resumed({"rank": 1, "world_size": 2})
