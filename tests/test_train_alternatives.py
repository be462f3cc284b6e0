"""What the same hardware does without grafting, in ``graftopt train``: simulated data-parallel
replicas, timm's EMA and torch's SWA of each network, one network alone."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graftopt.train.cli import main
from graftopt.train.loop import replica_step
from graftopt.train.summary import read_csv

from .test_train import TINY, _write_folder

ONE = [a for a in TINY if a not in ("--baseline", "--diverse-lr")]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )


def test_replica_step_gives_ddps_gradients_and_buffers() -> None:
    """Each replica normalizes its own chunk, the gradients are the replicas' mean, and the
    running statistics are replica 0's (DDP broadcasts them before every forward)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    model = _net()
    replicas = [copy.deepcopy(model) for _ in range(2)]
    loss = replica_step(model, x, y, 2, lambda: torch.autocast("cpu", enabled=False))
    losses = []
    for r, xc, yc in zip(replicas, x.chunk(2), y.chunk(2), strict=True):
        chunk_loss = F.cross_entropy(r(xc), yc)
        chunk_loss.backward()
        losses.append(chunk_loss.detach())
    for name, p in model.named_parameters():
        want = sum(dict(r.named_parameters())[name].grad for r in replicas) / 2
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7, msg=name)
    for (name, b), want in zip(model.named_buffers(), replicas[0].buffers(), strict=True):
        assert torch.equal(b, want), name
    torch.testing.assert_close(loss, torch.stack(losses).mean())
    # One batch of 8 normalizes over all 8: not what two replicas compute.
    whole = copy.deepcopy(replicas[0])
    whole.zero_grad()
    F.cross_entropy(whole(x), y).backward()
    assert not torch.allclose(whole[0].weight.grad, model[0].weight.grad)


@pytest.fixture(scope="module")
def averaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One network as two replicas with its EMA and SWA: 2 epochs uninterrupted, and the same
    stopped after epoch 1 and resumed."""
    base = tmp_path_factory.mktemp("alt")
    folder = _write_folder(base / "data")
    flags = ["--dataset", "folder", "--data-dir", str(folder), "--in-chans", "1"]
    flags += ["--epochs", "2", *ONE, "--no-graft", "--peers", "1", "--replicas", "2"]
    flags += ["--model-ema", "0.9", "--swa-start", "0", "--soup-recalibrate", "2"]
    full, split = base / "full", base / "split"
    assert main(["train", *flags, "--output", str(full)]) == 0
    assert main(["train", *flags, "--output", str(split), "--stop-after", "1"]) == 0
    first = torch.load(split / "checkpoint.pth", weights_only=True)
    assert main(["train", "--resume", str(split), "--no-report"]) == 0
    return {"full": full, "split": split, "first": first}  # type: ignore[dict-item]


def test_ema_and_swa_are_evaluated_beside_the_network(averaged: dict) -> None:
    rows = read_csv(averaged["full"] / "metrics.csv")
    names = [(r["epoch"], r["network"], r["kind"]) for r in rows]
    each = [("peer0", "peer"), ("ema_peer0", "ema_peer"), ("swa_peer0", "swa_peer")]
    assert names == [(e, n, k) for e in (1, 2) for n, k in [*each, ("ensemble_peer", "ensemble")]]
    for r in rows:
        assert 0.0 <= r["top1"] <= 100.0
    averages = [r for r in rows if r["kind"] in ("ema_peer", "swa_peer")]
    assert all(r["train_loss"] is None and r["graft_rounds"] is None for r in averages)


def test_swa_holds_the_mean_of_the_epochs_weights(averaged: dict) -> None:
    first = averaged["first"]["nets"]["peer0"]
    last = torch.load(averaged["full"] / "checkpoint.pth", weights_only=True)["nets"]["peer0"]
    assert int(last["swa"]["n_averaged"]) == 2
    for name, value in last["model"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        want = (first["model"][name] + value) / 2
        torch.testing.assert_close(last["swa"][f"module.{name}"], want, msg=name)
    # The EMA moved off both the start and the network.
    ema = last["ema"]["module.conv1.weight"]
    assert not torch.equal(ema, last["model"]["conv1.weight"])


def test_resumed_averages_equal_uninterrupted(averaged: dict) -> None:
    full, split = averaged["full"], averaged["split"]
    assert (full / "metrics.csv").read_text() == (split / "metrics.csv").read_text()
    a = torch.load(full / "checkpoint.pth", weights_only=True)["nets"]["peer0"]
    b = torch.load(split / "checkpoint.pth", weights_only=True)["nets"]["peer0"]
    for key in ("ema", "swa", "model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "3"], "--replicas must be >= 1 and divide --batch-size"),
        (["--graft-bins", "300"], "--graft-bins must be an integer in [2, 256], got 300"),
        (["--min-lr", "nan"], "--min-lr must be a finite number >= 0, got nan"),
        (["--std", "inf"], "--std values must be finite numbers"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["-b", "64"], "--batch-size 64 is larger than the training set (48 images)"),
        (["--model-ema", "1"], "--model-ema is a decay in [0, 1)"),
        (["--swa-start", "2"], "--swa-start must lie in [0, --epochs)"),
        (["--peers", "1"], "--no-graft trains one network with --peers 1"),
        (["--replicas", "2", "--distill-weight", "1"], "--replicas does not combine"),
    ],
)
def test_bad_alternative_settings_are_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _write_folder(tmp_path / "data")
    args = ["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "2", *ONE]
    assert main([*args, *flags, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_run_without_rounds_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _write_folder(tmp_path / "data")
    args = ["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", *ONE]
    assert main([*args, "--graft-every", "50", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "warning: no graft round will run: 1 epochs x 6 steps" in out
    # The progress line names each network's loss and counts the rounds.
    assert re.search(r"batch 6/6  loss grafted0 \d\.\d{3}  grafted1 \d\.\d{3}  rounds 0", out), out


def test_python_m_graftopt_is_the_command() -> None:
    import subprocess
    import sys

    run = [sys.executable, "-m", "graftopt"]
    proc = subprocess.run([*run, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--model-ema" in proc.stdout, proc.stderr
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)  # the commands
    assert proc.returncode == 0 and "{train,report,inspect}" in proc.stdout, proc.stderr


def test_resume_follows_moved_data_and_refuses_changed_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = _write_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "2", *ONE]
    assert main([*args, "--output", str(out), "--stop-after", "1"]) == 0
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    changed = _write_folder(tmp_path / "changed")
    next(p for p in (changed / "train").rglob("*.png")).unlink()
    resume = ["train", "--resume", str(out), "--no-report", "--data-dir"]
    assert main([*resume, str(changed)]) == 2
    err = capsys.readouterr().err
    assert "the data differ from the run's: train_images 47 (the run had 48)" in err, err
    assert main([*resume, str(moved)]) == 0
    assert len(read_csv(out / "metrics.csv")) == 2 * 3 + 1  # 2 x (2 networks, ensemble), soup


def test_help_shows_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for flag, default in (("--epochs EPOCHS", "30"), ("--lr LR", "0.1"), ("--seed SEED", "42")):
        assert f"{flag} (default: {default})" in text, flag
    assert "(default: None)" not in text
    assert "mutual distillation alone) (default" not in text  # --no-graft: a switch
    assert "(default: 1) (default" not in text and text.count("--replicas D") >= 1


def test_a_fixed_size_model_is_refused_naming_img_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _write_folder(tmp_path / "data")
    args = ["train", "--dataset", "folder", "--data-dir", str(folder), "--epochs", "1", *ONE]
    model = ["--model", "vit_tiny_patch16_224", "--output", str(tmp_path / "o")]
    assert main([*args, *model]) == 2
    err = capsys.readouterr().err
    assert "--model vit_tiny_patch16_224 does not take 3x16x16 images" in err, err
    assert "Give --img-size to resize the data (its default input is 3x224x224)" in err
    assert len(err.strip().splitlines()) == 1


def test_member_draws_give_each_lane_its_own_regularisation(tmp_path: Path) -> None:
    """--member-draws: a lane's mixup and label smoothing come from (seed, lane); the lane's
    baseline trains on the same mixed batches, so with one start and no rounds they are equal."""
    from graftopt.train.loop import MemberDraws

    draws = [MemberDraws.of(0, lane) for lane in range(6)]
    assert draws == [MemberDraws.of(0, lane) for lane in range(6)]
    assert len(set(draws)) > 1
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    mixed = x.clone()
    torch.manual_seed(3)
    loss_of = MemberDraws(1.0, 0.1).batch(mixed, y)
    assert not torch.equal(mixed, x)
    logits = torch.randn(6, 3)
    torch.manual_seed(3)
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(6)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    want = lam * F.cross_entropy(logits, y, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
        logits, y[perm], label_smoothing=0.1
    )
    torch.testing.assert_close(loss_of(logits), want)

    folder = _write_folder(tmp_path / "data")
    flags = ["--dataset", "folder", "--data-dir", str(folder), "--in-chans", "1", "--epochs", "1"]
    flags += [a for a in TINY if a != "--diverse-lr"] + ["--member-draws", "--no-graft"]
    out = tmp_path / "run"
    assert main(["train", *flags, "--output", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    loss = {r["network"]: r["train_loss"] for r in rows if r["train_loss"] is not None}
    assert loss["peer0"] == loss["baseline0"] and loss["peer1"] == loss["baseline1"]
    assert loss["peer0"] != loss["peer1"]  # each lane its own draws (and data order)
    assert main(["train", *flags, "--replicas", "2", "--output", str(tmp_path / "r")]) == 2
