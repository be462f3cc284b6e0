"""End-to-end tests of ``graftopt train / report / inspect`` on tiny generated datasets."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)
from graftopt.train.cli import main
from graftopt.train.config import TrainConfig, diverse_lr
from graftopt.train.data import DataError, read_idx
from graftopt.train.summary import read_csv

SIZE = 16
CLASSES = 3
# Small enough to run in seconds on two CPU cores: 48 training images, batch 8, 6 steps/epoch.
TINY = [
    "--model",
    "cifar_resnet20",
    "--img-size",
    str(SIZE),
    "-b",
    "8",
    "--peers",
    "2",
    "--baseline",
    "--graft-every",
    "3",
]
TINY += ["--progress", "plain", "--no-report", "--diverse-lr"]


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class sets the brightness of one third of the picture."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 60, size=(n, SIZE, SIZE)).astype(np.uint8)
    for i, c in enumerate(labels):
        band = slice(c * SIZE // CLASSES, (c + 1) * SIZE // CLASSES)
        images[i, band, :] += 150
    return images, labels.astype(np.uint8)


def _write_folder(root: Path) -> Path:
    for split, n, seed in (("train", 48, 0), ("val", 24, 1)):
        images, labels = _images(n, seed)
        for i, (img, c) in enumerate(zip(images, labels, strict=True)):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").convert("RGB").save(d / f"{i}.png")
    return root


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_idx(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", 48, 2), ("t10k", 24, 3)):
        images, labels = _images(n, seed)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))  # not gzipped
    return root


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def runs(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-epoch run, and the same run stopped after epoch 1 and resumed."""
    base = tmp_path_factory.mktemp("runs")
    data = ["--dataset", "folder", "--data-dir", str(folder), "--in-chans", "1", "--epochs", "2"]
    full, split = base / "full", base / "split"
    assert main(["train", *data, *TINY, "--output", str(full)]) == 0
    assert main(["train", *data, *TINY, "--output", str(split), "--stop-after", "1"]) == 0
    assert len(read_csv(split / "metrics.csv")) == 6  # one epoch: 4 networks + 2 ensembles
    assert main(["train", "--resume", str(split), "--no-report"]) == 0
    return {"full": full, "split": split}


def test_csv_and_table_are_consistent(runs: dict[str, Path]) -> None:
    run = runs["full"]
    rows = read_csv(run / "metrics.csv")
    nets = [
        "grafted0",
        "baseline0",
        "grafted1",
        "baseline1",
        "ensemble_grafted",
        "ensemble_baseline",
    ]
    soups = ["soup_grafted", "soup_baseline"]  # after the last round only
    assert [r["network"] for r in rows] == nets * 2 + soups
    assert [r["epoch"] for r in rows] == [1] * 6 + [2] * 8
    for r in rows:
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
        if r["kind"] == "grafted":
            assert r["graft_rounds"] == 2 * r["epoch"]  # 6 steps per epoch, a round every 3
            assert 0.3 < r["mean_alpha"] < 0.7
        if r["kind"] == "baseline":
            assert r["graft_rounds"] is None and r["mean_alpha"] is None
        if r["kind"] not in ("ensemble", "soup"):
            assert 0 <= r["invalid_0.01"] <= r["invalid_0.1"] <= r["filters"]
    # Identical recipe per lane: the baseline starts at the grafted peer's learning rate.
    first = {r["network"]: r for r in rows[:6]}
    assert first["grafted0"]["lr"] == first["baseline0"]["lr"] < first["grafted1"]["lr"]

    summary = json.loads((run / "summary.json").read_text())
    for name, s in summary["networks"].items():
        mine = [r for r in rows if r["network"] == name]
        assert s["best_top1"] == pytest.approx(max(r["top1"] for r in mine), abs=1e-5)
        assert s["last_top1"] == pytest.approx(mine[-1]["top1"], abs=1e-5)
    grafted = [summary["networks"][n]["last_top1"] for n in ("grafted0", "grafted1")]
    assert summary["groups"]["grafted"]["last"][0] == pytest.approx(np.mean(grafted))
    assert summary["groups"]["grafted"]["last"][1] == pytest.approx(np.std(grafted, ddof=1))
    table = (run / "summary.md").read_text()
    for label in ("grafted0", "baseline1", "grafted mean ± std", "ensemble of the baselines"):
        assert label in table
    assert "At K = 2 a full round leaves the two grafted networks equal" in table
    alphas = read_csv(run / "alphas.csv")
    assert {r["network"] for r in alphas} == {"grafted0", "grafted1"}
    assert sorted({r["round"] for r in alphas}) == list(range(1, 5))


def test_resumed_run_equals_uninterrupted(runs: dict[str, Path]) -> None:
    full, split = runs["full"], runs["split"]
    for name in ("metrics.csv", "alphas.csv", "summary.md"):
        assert (full / name).read_text() == (split / name).read_text(), name
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    for net, state in a["nets"].items():
        for key, value in state["model"].items():
            assert torch.equal(value, b["nets"][net]["model"][key]), (net, key)
        assert (
            state["optimizer"]["graft"] == b["nets"][net]["optimizer"]["graft"]
            if ("graft" in state["optimizer"])
            else True
        )


def test_rank_checkpoint_sets(tmp_path: Path) -> None:
    """Under torchrun the newest epoch that every rank holds is the one to resume."""
    from graftopt.train import checkpoint as ck

    for rank, epoch in [(0, 1), (1, 1), (0, 2), (2, 1), (2, 2)]:
        (tmp_path / ck.rank_checkpoint_name(rank, epoch)).write_bytes(b"")
    (tmp_path / "checkpoint-rank1-epoch2.pth.bak").write_bytes(b"")  # not a checkpoint
    assert ck.rank_epochs(tmp_path, 0) == [1, 2]
    assert [p.name for p in ck.rank_checkpoints(tmp_path)] == [
        "checkpoint-rank0-epoch1.pth",
        "checkpoint-rank1-epoch1.pth",
        "checkpoint-rank2-epoch1.pth",
    ]
    assert ck.newest_common_epoch([[1, 2], [1], [1, 2]]) == 1
    assert ck.newest_common_epoch([[2], [1]]) is None
    ck.prune_rank_checkpoints(tmp_path, 0, keep=2)
    assert ck.rank_epochs(tmp_path, 0) == [2] and ck.rank_epochs(tmp_path, 2) == [1, 2]
    assert ck.rank_checkpoints(tmp_path) == []  # rank 0 has dropped what rank 1 still needs
    (tmp_path / ".checkpoint-rank1-epoch2.pth.ab12.tmp").write_bytes(b"torn")
    (tmp_path / ".metrics.csv.cd34.tmp").write_bytes(b"torn")
    gone = ck.remove_stale_writes(tmp_path, ["checkpoint-rank1-epoch*.pth"])
    assert [p.name for p in gone] == [".checkpoint-rank1-epoch2.pth.ab12.tmp"]
    assert (tmp_path / ".metrics.csv.cd34.tmp").exists()  # another writer's: left alone


def test_report_writes_valid_pngs(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    code, out, _ = _run(["report", str(runs["full"])], capsys)
    assert code == 0
    assert "ensemble of the baselines" in out
    plots = sorted((runs["full"] / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["accuracy.png", "alphas.png", "invalid_filters.png"]
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as img:
            img.verify()


def test_inspect_prints_layers(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["inspect", str(runs["full"]), "--network", "grafted1"], capsys)
    assert code == 0
    assert "== grafted1" in out and "grafted0" not in out
    assert "conv1" in out and "fc" in out and out.rstrip().splitlines()[-1].startswith("total")
    # A bare state dict works too.
    state = torch.load(runs["full"] / "checkpoint.pth", weights_only=True)["nets"]["baseline0"]
    path = runs["full"] / "bare.pth"
    torch.save(state["model"], path)
    code, out, _ = _run(["inspect", str(path)], capsys)
    assert code == 0 and "conv1" in out


def test_idx_files_end_to_end(tmp_path: Path) -> None:
    """``python -m graftopt.train`` on IDX files, output not a terminal: plain lines."""
    data = _write_idx(tmp_path / "idx")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "graftopt.train", "--data-dir", str(data), "--epochs", "1"]
    args += [*TINY, "--output", str(out), "--progress", "auto", "--log-interval", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1  batch 2/6" in proc.stdout  # plain progress lines
    assert (
        "recipe: cifar_resnet20 on torch/fashion_mnist (48 train / 24 val images, 1x16x16"
        in proc.stdout
    )
    assert "| grafted mean ± std |" in proc.stdout
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 8 and rows[0]["graft_rounds"] == 2  # 4 networks, 2 ensembles, 2 soups


def test_missing_fashion_mnist_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        ["train", "--data-dir", str(tmp_path), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "fashion_mnist not found" in err
    assert "apt-get install -y dataset-fashion-mnist" in err and "--data-dir" in err
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--peers", "1"], "--peers must be >= 2"),
        (["--model", "no_such_net"], "is not a timm model"),
        (["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs must lie in [0, --epochs)"),
        (["--graft-criterion", "bn"], "use --graft-level filter"),
        (["--dataset", "nonsense"], "unknown --dataset 'nonsense'"),
        (
            ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
            "--device",
        ),
    ],
)
def test_bad_settings_give_clear_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_idx(tmp_path / "idx")
    code, _, err = _run(
        ["train", "--data-dir", str(data), *flags, "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert message in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "expected an integer >= 1"),
        (["--graft-level", "unit"], "invalid choice"),
        (["--batch-size", "x"], "expected an integer"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_folder_without_val_and_resume_clashes(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["train", "--dataset", "folder"], capsys)
    assert code == 2 and "needs --data-dir" in err
    (tmp_path / "train" / "a").mkdir(parents=True)
    code, _, err = _run(["train", "--dataset", "folder", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "val/ not found" in err
    code, _, err = _run(["train", "--resume", str(runs["full"]), "--lr", "0.5"], capsys)
    assert code == 2 and "--lr 0.5 (the run has 0.1)" in err
    data = ["--dataset", "folder", "--data-dir", str(tmp_path)]
    code, _, err = _run(["train", *data, "--output", str(runs["full"])], capsys)
    assert code == 2 and "already holds a run" in err
    code, _, err = _run(["train", "--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no checkpoint" in err


def test_read_idx(tmp_path: Path) -> None:
    images, _ = _images(5, 0)
    (tmp_path / "a").write_bytes(_idx_bytes(images))
    assert np.array_equal(read_idx(tmp_path / "a"), images)
    (tmp_path / "b").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(_idx_bytes(images)[:-3])
    with pytest.raises(DataError, match="header says shape"):
        read_idx(tmp_path / "c")


def test_diverse_lr_matches_the_formula() -> None:
    assert [diverse_lr(0.1, i, 2) for i in range(2)] == pytest.approx([0.05, 0.1])
    assert diverse_lr(0.1, 3, 4) == pytest.approx(0.1)
    assert TrainConfig().dataset == "torch/fashion_mnist"


def test_create_graft_optimizer_with_timm_arguments() -> None:
    import timm
    from timm.optim import optimizer_kwargs

    from graftopt.train import create_graft_optimizer

    class Args:
        opt, lr, weight_decay, momentum = "sgd", 0.05, 5e-4, 0.9

    torch.manual_seed(0)
    models = [timm.create_model("cifar_resnet20", num_classes=3, in_chans=1) for _ in range(2)]
    opts = [
        create_graft_optimizer(
            m, [models[i - 1]], every=2, graft={"c": 100.0}, **optimizer_kwargs(cfg=Args)
        )
        for i, m in enumerate(models)
    ]
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        for m, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    assert [o.rounds for o in opts] == [1, 1]
    assert opts[0].settings.c == 100.0
    assert len(opts[0].param_groups) == 2  # timm's decay / no-decay split, shared with the wrapper


class _Payload:
    """A pickle that, loaded unsafely, writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_checkpoints_run_no_code(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    state = torch.load(runs["full"] / "checkpoint.pth", weights_only=True)
    state["rows"].append(_Payload(marker))
    torch.save(state, evil / "checkpoint.pth")
    torch.save({"conv.weight": torch.ones(2, 2, 3, 3), "x": _Payload(marker)}, tmp_path / "sd.pth")
    code, _, err = _run(["inspect", str(tmp_path / "sd.pth")], capsys)
    assert code == 2 and "safe loader" in err and "refuses" in err, err
    code, _, err = _run(["train", "--resume", str(evil), "--no-report"], capsys)
    assert code == 2 and "safe loader" in err, err
    code, _, err = _run(["inspect", str(evil)], capsys)
    assert code == 2 and "safe loader" in err, err
    assert not marker.exists()
    (tmp_path / "empty.pth").write_bytes(b"")
    code, _, err = _run(["inspect", str(tmp_path / "empty.pth")], capsys)
    assert code == 2 and "corrupt, truncated or empty" in err, err
    assert len(err.strip().splitlines()) == 1


def test_folder_splits_share_the_training_class_map(tmp_path: Path) -> None:
    from graftopt.train.data import build_data

    root = _write_folder(tmp_path / "f")
    shutil.rmtree(root / "val" / "class0")  # val/ lacks a class: labels keep train's indices
    cfg = TrainConfig(dataset="folder", data_dir=str(root), in_chans=1, img_size=SIZE)
    spec = build_data(cfg, {})
    labels = {int(spec.val[i][1]) for i in range(len(spec.val))}
    assert labels == {1, 2} and spec.num_classes == 3
    (root / "val" / "zebra").mkdir()
    Image.fromarray(_images(1, 0)[0][0], mode="L").save(root / "val" / "zebra" / "z.png")
    with pytest.raises(DataError, match=r"classes that .* does not: \['zebra'\]"):
        build_data(cfg, {})


def test_a_diverged_run_says_so_and_fails(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--dataset", "folder", "--data-dir", str(folder), "--in-chans", "1", "--epochs", "1"]
    code, out, err = _run(
        ["train", *data, *TINY, "--lr", "1e10", "--output", str(tmp_path / "o")], capsys
    )
    assert code == 3, err
    assert "DIVERGED (non-finite training loss)" in out
    assert "diverged" in err and "lower --lr" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["networks"]["grafted0"]["diverged"] is True


def test_resume_refuses_explicit_recipe_flags_even_at_their_default(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["train", "--resume", str(runs["full"]), "--epochs", "30"], capsys)
    assert code == 2 and "--epochs 30 (the run has 2)" in err, err
    from graftopt.train.config import merge_resumed

    saved = TrainConfig(epochs=4, stop_after=1).to_dict()
    again = merge_resumed(saved, TrainConfig(resume="x"), {"resume"})
    assert again.stop_after is None and again.epochs == 4  # --stop-after applies once


def test_bad_idx_files_give_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = _images(6, 0)
    good = gzip.compress(_idx_bytes(images))
    (tmp_path / "a.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cannot be read whole"):
        read_idx(tmp_path / "a.gz")
    (tmp_path / "b").write_bytes(_idx_bytes(images)[:6])
    with pytest.raises(DataError, match="shorter than its IDX header"):
        read_idx(tmp_path / "b")
    root = _write_idx(tmp_path / "idx")
    bad = labels.copy()
    bad[2] = 12
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.resize(bad, 24)))
    code, _, err = _run(["train", "--data-dir", str(root), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "holds label 12, outside 0..9" in err, err
    assert len(err.strip().splitlines()) == 1
    # Images that are not bytes, labels that are not integers: refused, never truncated.
    for name, array, said in (
        ("t10k-labels-idx1-ubyte", np.resize(labels, 24).astype(">f4"), "holds >f4 labels"),
        ("train-images-idx3-ubyte.gz", images.astype(">f4") / 255, "holds >f4 images"),
        ("train-images-idx3-ubyte.gz", images.astype(">i2"), "holds >i2 images"),
    ):
        root = _write_idx(tmp_path / f"idx-{len(said)}-{array.dtype.kind}")
        kind = {"f": 0x0D, "i": 0x0B}[array.dtype.kind]
        raw = struct.pack(">BBBB", 0, 0, kind, array.ndim) + struct.pack(
            f">{array.ndim}I", *array.shape
        )
        body = raw + array.tobytes()
        (root / name).write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
        code, _, err = _run(
            ["train", "--data-dir", str(root), "--output", str(tmp_path / "o")], capsys
        )
        assert code == 2 and said in err and "Traceback" not in err, err


def test_unwritable_output_is_refused_before_training(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    data = ["--dataset", "folder", "--data-dir", str(folder), "--in-chans", "1", "--epochs", "1"]
    code, _, err = _run(["train", *data, *TINY, "--output", str(blocker / "run")], capsys)
    assert code == 2 and "cannot write to the output folder" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_args": {"num_classes": 3, "checkpoint_path": "/etc/passwd"}}, "checkpoint_path"),
        ({"model_args": {"num_classes": 400_000_000}}, "num_classes=400000000 is not in"),
        ({"model_args": {"in_chans": 1.5}}, "in_chans=1.5"),
        ({"model": "hf-hub:someone/x"}, "'hf-hub:someone/x', which is not a timm architecture"),
    ],
)
def test_inspect_builds_nothing_a_checkpoint_names(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], change, message
) -> None:
    state = torch.load(runs["full"] / "checkpoint.pth", weights_only=True)
    if "model" in change:
        state["config"]["model"] = change["model"]
    else:
        state["model_args"] = change["model_args"]
    torch.save(state, tmp_path / "crafted.pth")
    code, _, err = _run(["inspect", str(tmp_path / "crafted.pth")], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
