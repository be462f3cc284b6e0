"""`graftopt train`'s payoff options: same init, mutual distillation, soups, presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from graftopt.train.cli import build_parser, config_from_args, main
from graftopt.train.config import PRESETS, TrainConfig
from graftopt.train.data import build_data
from graftopt.train.loop import (
    build_nets,
    distill_loss,
    distill_weight,
    matched_states,
    peer_logits,
    soup,
)
from graftopt.train.summary import read_csv

from .conftest import make_net
from .test_train import TINY, _write_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("folder"))


def test_distill_loss_matches_a_straightforward_kl() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g)
    peers = [torch.randn(5, 4, generator=g) for _ in range(3)]
    T = 2.5
    expected = 0.0
    for p in peers:
        q, s = (p / T).softmax(1), (z / T).softmax(1)
        expected += float((q * (q.log() - s.log())).sum(1).mean())
    expected = T * T * expected / len(peers)
    assert float(distill_loss(z, peers, T)) == pytest.approx(expected, rel=1e-5)
    assert float(distill_loss(z, [z.clone()], 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_distill_weight_ramps_over_the_warmup() -> None:
    cfg = TrainConfig(distill_weight=2.0, distill_warmup=1.5)  # 10 steps per epoch: 15 updates
    assert [distill_weight(cfg, u, 10) for u in (1, 6, 15, 16, 40)] == pytest.approx(
        [2 / 15, 0.8, 2.0, 2.0, 2.0]
    )
    cfg.distill_warmup = 0.0
    assert distill_weight(cfg, 1, 10) == 2.0


def test_peer_logits_leave_norm_statistics_alone() -> None:
    from graftopt.train.loop import Net

    model = make_net(0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = Net("grafted0", 0, True, model, torch.optim.SGD(model.parameters(), lr=0.1), 0.1)
    x = torch.randn(4, 1, 6, 6)
    (out,) = peer_logits([net], x)
    assert not out.requires_grad
    assert torch.allclose(out, model(x))  # train-mode normalization, as in its own steps
    model.load_state_dict(before)
    peer_logits([net], x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_soup_is_the_mean_of_the_networks() -> None:
    nets = [make_net(s) for s in range(3)]
    mixed = soup(nets)
    for k, v in mixed.state_dict().items():
        states = [n.state_dict()[k] for n in nets]
        if v.is_floating_point():
            torch.testing.assert_close(v, torch.stack(states).mean(0), msg=k)
        else:
            assert torch.equal(v, states[0]), k
    assert mixed is not nets[0]


def test_matched_soup_of_permuted_copies_is_the_network() -> None:
    from graftopt.adapters.channels import channel_spaces
    from graftopt.matching import permute

    net = make_net(0)
    spaces = channel_spaces(net)
    g = torch.Generator().manual_seed(4)
    state = net.state_dict()
    copies = [state] + [
        permute(spaces, state, [torch.randperm(n, generator=g) for n in spaces.sizes])
        for _ in range(2)
    ]
    mixed = soup([net], matched_states(net, copies)).state_dict()
    for k, v in state.items():
        torch.testing.assert_close(mixed[k], v, msg=k)
    assert any(not torch.allclose(soup([net], copies).state_dict()[k], v) for k, v in state.items())


def test_same_init_starts_every_lane_from_lane_0(folder: Path) -> None:
    cfg = TrainConfig(
        model="cifar_resnet20", dataset="folder", data_dir=str(folder), in_chans=1, img_size=16,
        peers=3, baseline=True, same_init=True,
    )  # fmt: skip
    spec = build_data(cfg, {})
    nets = build_nets(cfg, spec, torch.device("cpu"), [0, 1, 2])
    first = nets[0].model.state_dict()
    for net in nets[1:]:
        for k, v in net.model.state_dict().items():
            assert torch.equal(v, first[k]), (net.name, k)
    cfg.same_init = False
    other = build_nets(cfg, spec, torch.device("cpu"), [0, 1])
    assert not torch.equal(other[0].model.conv1.weight, other[2].model.conv1.weight)


def test_presets_set_defaults_and_flags_win() -> None:
    args = build_parser(PRESETS["papa"]).parse_args(["train", "--graft-every", "7"])
    cfg = config_from_args(args)
    assert (cfg.graft_A, cfg.graft_rate, cfg.graft_rate_lr) == (0.0, 0.01, True)
    assert cfg.graft_every == 7
    paper = config_from_args(build_parser(PRESETS["paper"]).parse_args(["train"]))
    assert (paper.graft_rate, paper.graft_recalibrate, paper.same_init) == (1.0, 0, False)
    assert paper.graft_A == 0.4 and paper.graft_every is None and not paper.graft_align
    aligned = config_from_args(
        build_parser(PRESETS["paper"]).parse_args(["train", "--graft-align"])
    )
    assert aligned.graft_align


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--graft-rate", "0"], "--graft-rate must lie in (0, 1]"),
        (["--graft-rate", "1.5"], "--graft-rate must lie in (0, 1]"),
        (["--graft-start", "-1"], "--graft-start must be an integer >= 0"),
        (["--graft-recalibrate", "-2"], "batch count >= 0"),
        (["--distill-weight", "-1"], "--distill-weight must be >= 0"),
        (["--distill-weight", "nan"], "--distill-weight must be >= 0"),
        (["--distill-T", "0"], "--distill-T must be > 0"),
        (["--distill-warmup", "-1"], "--distill-warmup must be >= 0 epochs"),
    ],
)
def test_bad_payoff_values_give_clear_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", *flags, "--output", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_options_train_and_resume_bit_for_bit(folder: Path, tmp_path: Path) -> None:
    data = ["--dataset", "folder", "--data-dir", str(folder), "--in-chans", "1", "--epochs", "2"]
    opts = ["--graft-rate", "0.5", "--graft-recalibrate", "2", "--same-init", "--graft-start"]
    opts += ["4", "--distill-weight", "0.5", "--distill-T", "2", "--graft-optimizer-state"]
    opts += ["reset", "--graft-rate-lr", "--graft-align"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", *data, *TINY, *opts, "--output", str(full)]) == 0
    assert main(["train", *data, *TINY, *opts, "--output", str(split), "--stop-after", "1"]) == 0
    assert main(["train", "--resume", str(split), "--no-report"]) == 0
    for name in ("metrics.csv", "alphas.csv", "summary.md"):
        assert (full / name).read_text() == (split / name).read_text(), name
    rows = read_csv(full / "metrics.csv")
    grafted = [r for r in rows if r["kind"] == "grafted"]
    # 6 steps per epoch, a round every 3 steps from step 4 on: rounds at 6, 9, 12.
    assert [r["graft_rounds"] for r in grafted] == [1, 1, 3, 3]
    soups = {r["network"] for r in rows if r["kind"] == "soup"}
    assert soups == {"soup_grafted", "soup_baseline"}
    assert all(0 <= r["top1"] <= 100 and not math.isnan(r["train_loss"]) for r in grafted)


def test_no_graft_trains_peers_without_rounds(folder: Path, tmp_path: Path) -> None:
    data = ["--dataset", "folder", "--data-dir", str(folder), "--in-chans", "1", "--epochs", "1"]
    out = tmp_path / "peers"
    assert main(["train", *data, *TINY, "--no-graft", "--output", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    kinds = {r["network"]: r["kind"] for r in rows}
    assert kinds["peer0"] == kinds["peer1"] == "peer"
    assert kinds["baseline0"] == "baseline" and kinds["soup_peer"] == "soup"
    assert all(r["graft_rounds"] is None for r in rows)
    assert not (out / "alphas.csv").read_text().strip().splitlines()[1:]
