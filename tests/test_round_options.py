"""Round options: gentle rates, a late start, the optimizer state after a round, and norm
statistics re-estimated after it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import graftopt
from graftopt import GraftOptimizer, Recalibration, recalibrate_norms

from .conftest import make_net


def _batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 6, 6, generator=g) for _ in range(count)]


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _graft_once(host: nn.Module, peers: list[nn.Module], **kw) -> GraftOptimizer:
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), peers, every=1, **kw)
    opt.step()
    return opt


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- rate ---------------------------------------------------------------------------------


def test_rate_one_is_the_paper_round_bit_for_bit() -> None:
    a, b = make_net(0), make_net(0)
    peers = [make_net(1), make_net(2)]
    _graft_once(a, peers)
    _graft_once(b, peers, rate=1.0)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("level", ["layer", "filter"])
@pytest.mark.parametrize("rate", [0.5, 0.01])
def test_rate_moves_the_host_that_fraction_of_the_way(level: str, rate: float) -> None:
    host, peers = make_net(0), [make_net(1), make_net(2)]
    full, gentle = copy.deepcopy(host), copy.deepcopy(host)
    before = _state(host)
    _graft_once(full, peers, level=level)
    _graft_once(gentle, peers, level=level, rate=rate)
    for k, v in gentle.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        expected = before[k] + rate * (full.state_dict()[k] - before[k])
        torch.testing.assert_close(v, expected, atol=1e-6, rtol=1e-5, msg=k)


def test_graft_function_takes_a_rate() -> None:
    host, peer = make_net(0), make_net(1)
    full = copy.deepcopy(host)
    before = _state(host)
    graftopt.graft_(full, [peer])
    graftopt.graft_(host, [peer], rate=0.25)
    w = "conv1.weight"
    expected = before[w] + 0.25 * (full.state_dict()[w] - before[w])
    torch.testing.assert_close(host.state_dict()[w], expected, atol=1e-6, rtol=1e-5)


def test_rate_by_lr_follows_the_schedule() -> None:
    host, peer = make_net(0), make_net(1)
    inner = torch.optim.SGD(host.parameters(), lr=0.2)
    opt = GraftOptimizer(inner, [peer], every=1, rate=0.5, rate_by_lr=True)
    assert opt.current_rate() == pytest.approx(0.5)
    inner.param_groups[0]["lr"] = 0.05
    assert opt.current_rate() == pytest.approx(0.125)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf"), True])
def test_bad_rates_are_refused(bad: float) -> None:
    host, peer = make_net(0), make_net(1)
    with pytest.raises(ValueError, match="rate must lie in"):
        GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=1, rate=bad)


# -- start --------------------------------------------------------------------------------


def test_first_round_waits_for_start() -> None:
    host, peer = make_net(0), make_net(1)
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.01), [peer], every=2, start=5)
    steps_with_rounds = []
    for i in range(10):
        before = opt.rounds
        _step(host, opt, i)
        if opt.rounds > before:
            steps_with_rounds.append(opt.steps)
    assert steps_with_rounds == [6, 8, 10]
    assert opt.rounds == 3


def test_ring_with_start_runs_in_lockstep() -> None:
    models = [make_net(s) for s in range(3)]
    opts = graftopt.ring(
        models,
        [torch.optim.SGD(m.parameters(), lr=0.01) for m in models],
        every=3,
        start=4,
        same_init=False,
    )
    for i in range(12):
        for m, o in zip(models, opts, strict=True):
            _step(m, o, i)
    assert [o.rounds for o in opts] == [3, 3, 3]  # at steps 6, 9 and 12


def test_negative_start_is_refused() -> None:
    host, peer = make_net(0), make_net(1)
    with pytest.raises(ValueError, match="start must be an integer >= 0"):
        GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=1, start=-1)


def test_start_and_policy_resume_bit_for_bit() -> None:
    def run(split: int | None) -> dict[str, torch.Tensor]:
        host, peer = make_net(0), make_net(1)
        kw = {"every": 2, "start": 3, "rate": 0.5, "optimizer_state": "reset"}
        opt = GraftOptimizer(
            torch.optim.SGD(host.parameters(), lr=0.05, momentum=0.9), [peer], **kw
        )
        for i in range(8):
            if i == split:
                saved_model, saved_opt = _state(host), copy.deepcopy(opt.state_dict())
                host, peer2 = make_net(0), make_net(1)
                host.load_state_dict(saved_model)
                peer2.load_state_dict(peer.state_dict())
                peer = peer2
                opt.close()
                inner = torch.optim.SGD(host.parameters(), lr=0.05, momentum=0.9)
                opt = GraftOptimizer(inner, [peer], **kw)
                opt.load_state_dict(saved_opt)
            _step(host, opt, i)
            _step(peer, torch.optim.SGD(peer.parameters(), lr=0.0), i)
        assert opt.state_dict()["graft"]["start"] == 3
        return _state(host)

    a, b = run(None), run(5)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


# -- optimizer state ----------------------------------------------------------------------


def test_reset_clears_the_momentum_of_written_tensors() -> None:
    host, peer = make_net(0), make_net(1)
    inner = torch.optim.SGD(host.parameters(), lr=0.01, momentum=0.9)
    opt = GraftOptimizer(inner, [peer], every=2, optimizer_state="reset")
    _step(host, opt, 0)
    assert len(inner.state) > 0  # momentum after the first step
    _step(host, opt, 1)  # the round
    assert opt.rounds == 1
    assert all(len(inner.state[p]) == 0 for p in host.parameters())
    other = make_net(2)
    kept = GraftOptimizer(torch.optim.SGD(other.parameters(), lr=0.01), [peer], every=1)
    assert kept.optimizer_state == "keep"
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        GraftOptimizer(
            torch.optim.SGD(other.parameters(), lr=0.01), [peer], every=1, model=other,
            optimizer_state="zero",
        )  # fmt: skip


# -- recalibration ------------------------------------------------------------------------


def test_recalibration_matches_update_bn() -> None:
    model, ref = make_net(0), make_net(0)
    data = _batches(4)
    model.train()
    ref.train()
    assert recalibrate_norms(model, data) == 4
    update_bn(data, ref)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], msg=k)


def test_recalibration_restores_modes_and_momenta() -> None:
    model = make_net(0)
    model.eval()
    model.bn1.momentum = 0.3
    before_w = model.conv1.weight.detach().clone()
    recalibrate_norms(model, _batches(2), limit=1)
    assert not any(m.training for m in model.modules())
    assert model.bn1.momentum == 0.3
    assert torch.equal(model.conv1.weight, before_w)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_norms(model, [])


def test_round_recalibrates_the_host_from_the_round_batches() -> None:
    host, peer = make_net(0), make_net(1)
    expected = copy.deepcopy(host)
    graftopt.graft_(expected, [peer])
    seen = []

    def data(r: int) -> list[torch.Tensor]:
        seen.append(r)
        return _batches(3, seed=r)

    recalibrate_norms(expected, data(1))
    _graft_once(host, [peer], recalibrate=Recalibration(data, batches=3))
    assert seen == [1, 1]
    for k, v in host.state_dict().items():
        torch.testing.assert_close(v, expected.state_dict()[k], msg=k)
    other = make_net(2)
    with pytest.raises(TypeError, match="Recalibration"):
        GraftOptimizer(
            torch.optim.SGD(other.parameters(), lr=0.1), [peer], every=1, model=other,
            recalibrate=_batches(1),
        )  # fmt: skip
    with pytest.raises(ValueError, match="batches must be an integer"):
        Recalibration(_batches(1), batches=0)


# -- validation and what the wrapper forwards ---------------------------------------------


@pytest.mark.parametrize(("kw", "message"), [({"c": float("inf")}, "c must be a finite"),
                                             ({"c": float("nan")}, "c must be a finite"),
                                             ({"A": float("nan")}, "A must lie in")])  # fmt: skip
def test_non_finite_curve_settings_are_refused(kw: dict, message: str) -> None:
    host, peer = make_net(0), make_net(1)
    with pytest.raises(ValueError, match=message):
        GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=1, **kw)


def test_inner_optimizer_attributes_reach_the_caller() -> None:
    host, peer = make_net(0), make_net(1)
    inner = torch.optim.SGD(host.parameters(), lr=0.1)
    inner.is_second_order = True
    inner.sync_lookahead = lambda: "synced"
    opt = GraftOptimizer(inner, [peer], every=1)
    assert opt.is_second_order is True
    assert opt.sync_lookahead() == "synced"
    assert hasattr(opt, "is_second_order")
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = opt.no_such_thing


def test_create_graft_optimizer_takes_a_peer_source() -> None:
    from graftopt import ModulePeers
    from graftopt.train import create_graft_optimizer

    host, peer = make_net(0), make_net(1)
    opt = create_graft_optimizer(host, ModulePeers([peer]), every=1, opt="sgd", lr=0.1)
    _step(host, opt, 0)
    assert opt.rounds == 1 and opt.peers.num_peers == 1


# -- a failed round -----------------------------------------------------------------------


def test_a_failed_round_leaves_models_and_counters_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    models = [make_net(s) for s in range(3)]
    opts = graftopt.ring(
        models, [torch.optim.SGD(m.parameters(), lr=0.0) for m in models], every=1, same_init=False
    )
    source = opts[0].peers
    real = type(source).fetch
    calls = {"n": 0}

    def flaky(self, names, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("peer source briefly unavailable")
        return real(self, names, *args)

    monkeypatch.setattr(type(source), "fetch", flaky)
    before = [{k: v.detach().clone() for k, v in m.named_parameters()} for m in models]
    _step(models[0], opts[0], 0)
    _step(models[1], opts[1], 0)
    with pytest.raises(ConnectionError, match="briefly unavailable") as info:
        _step(models[2], opts[2], 0)  # the round commits (and fails) here
    notes = getattr(info.value, "__notes__", [""])
    assert "was not applied" in notes[0] or not hasattr(info.value, "add_note")
    for m, b in zip(models, before, strict=True):  # lr 0: only a round could move them
        for k, v in m.named_parameters():
            assert torch.equal(v, b[k]), k
    for i, (m, o) in enumerate(zip(models, opts, strict=True)):
        _step(m, o, i)  # the next round runs
    assert [o.rounds for o in opts] == [2, 2, 2]


def test_values_that_overflow_the_hosts_dtype_are_skipped() -> None:
    host, peer = make_net(0), make_net(1).double()
    with torch.no_grad():
        peer.fc.weight[0, 0] = 1e300  # finite in float64, inf in float32
    before = host.fc.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        record = graftopt.graft_(host, [peer])
    assert "fc" in record.skipped
    assert torch.equal(host.fc.weight, before)
    assert all(torch.isfinite(v).all() for v in host.state_dict().values())


@pytest.mark.parametrize("shape", [(3, 1), (1,)])
def test_a_peer_tensor_replaced_by_a_broadcastable_one_is_refused(shape: tuple) -> None:
    host, peer = make_net(0), make_net(1)
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    opt.step()
    peer.fc.bias = nn.Parameter(torch.zeros(shape))
    before = _state(host)
    with pytest.raises(ValueError, match=r"peer 0 of SmallNet: fc.bias has shape"):
        opt.step()
    for k, v in host.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- settings that cannot go stale --------------------------------------------------------


def test_every_is_read_only() -> None:
    host, peer = make_net(0), make_net(1)
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=2)
    with pytest.raises(AttributeError, match="fixed at construction"):
        opt.every = 3
    assert opt.every == 2 and opt.state_dict()["graft"]["every"] == 2


@pytest.mark.parametrize(
    ("counters", "message"),
    [
        ({"steps": 4, "arrived": 1, "committed": 2}, "committed but only round 1 reached"),
        ({"steps": 3, "arrived": 3, "committed": 3}, "at most round 1"),
        ({"steps": 6, "arrived": 1, "committed": 0}, "waits while round 3 is already due"),
        ({"steps": -1, "arrived": 0, "committed": 0}, "negative"),
    ],
)
def test_contradictory_counters_are_refused(counters: dict, message: str) -> None:
    host, peer = make_net(0), make_net(1)
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=2)
    state = opt.state_dict()
    state["graft"].update(counters)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert opt.steps == 0  # nothing loaded


def test_l1_criterion_scores_by_mean_absolute_value() -> None:
    host, peer = make_net(0), make_net(1)
    record = graftopt.graft_(copy.deepcopy(host), [peer], criterion="l1")
    w_h, w_p = host.conv1.weight.abs().mean(), peer.conv1.weight.abs().mean()
    torch.testing.assert_close(record.host_scores[0], w_h.float())
    torch.testing.assert_close(record.peer_scores[0, 0], w_p.float())


def test_peers_that_are_copies_of_the_host_warn_once() -> None:
    models = [make_net(0) for _ in range(3)]  # one start, and the same batches below
    opts = graftopt.ring(
        models,
        [torch.optim.SGD(m.parameters(), lr=0.01) for m in models],
        every=1,
        same_init=False,
    )
    with pytest.warns(RuntimeWarning, match="look like copies of it") as caught:
        for i in range(3):
            for m, o in zip(models, opts, strict=True):
                _step(m, o, i)
    assert len([w for w in caught if "copies" in str(w.message)]) == 3  # once per host
    different = [make_net(s) for s in range(3)]
    opts = graftopt.ring(
        different,
        [torch.optim.SGD(m.parameters(), lr=0.01) for m in different],
        every=1,
        same_init=False,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m, o in zip(different, opts, strict=True):
            _step(m, o, 0)


@pytest.mark.parametrize("bad", ["100", 2.5, -1, None])
def test_history_of_the_wrong_type_is_refused(bad) -> None:
    host, peer = make_net(0), make_net(1)
    with pytest.raises(ValueError, match="history must be an integer >= 0"):
        GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=1, history=bad)
