"""Rounds that go wrong in a user's hands: each leaves the models usable and says what happened."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graftopt

from .conftest import make_net


def _huge_peer() -> tuple[nn.Linear, nn.Linear]:
    host, peer = nn.Linear(4, 4), nn.Linear(4, 4).double()
    with torch.no_grad():
        peer.weight[0, 0] = 1e300  # finite in float64: its blend overflows the float32 host
    return host, peer


@pytest.mark.parametrize("route", ["c", "torch"])
def test_a_round_whose_every_unit_is_skipped_leaves_the_host(route):
    host, peer = _huge_peer()
    before = {k: v.clone() for k, v in host.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"graft_: units \['\(the whole model\)'\]"):
        record = graftopt.graft_(host, [peer], route=route)
    assert record.skipped == ("",)
    opt = graftopt.GraftOptimizer(
        torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1, route=route
    )
    with pytest.warns(RuntimeWarning, match="graft round 1"):
        opt.step()
    assert opt.rounds == 1
    for k, v in host.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_raising_callback_does_not_cost_the_other_members_their_follow_up():
    models = [make_net(s) for s in range(3)]
    seen: list[int] = []

    def callback(i: int):
        def on_round(record: graftopt.RoundRecord) -> None:
            seen.append(i)
            if i == 0:
                raise KeyError("user callback")

        return on_round

    inner = [torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9) for m in models]
    opts = graftopt.ring(models, inner, every=1, same_init=False, optimizer_state="reset")
    for i, opt in enumerate(opts):
        opt.callback = callback(i)
    for m, opt in zip(models, inner, strict=True):  # momentum buffers to reset
        for p in m.parameters():
            opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    opts[0].step()
    opts[1].step()
    with pytest.raises(KeyError, match="user callback") as e:
        opts[2].step()  # the last member commits the group's round
    assert "group member 0" in "".join(getattr(e.value, "__notes__", []))
    assert sorted(seen) == [0, 1, 2]
    assert all(len(o.history) == 1 for o in opts)
    assert all(not opt.state for opt in inner)  # every member's state was reset


def test_recalibration_refuses_a_one_pass_iterator():
    batches = (torch.randn(4, 1, 8, 8) for _ in range(3))
    with pytest.raises(TypeError, match="one-pass generator"):
        graftopt.Recalibration(batches, 2)
    graftopt.Recalibration(lambda r: [torch.randn(4, 1, 8, 8)], 1)  # a function is fine


def test_a_checkpoint_of_another_every_loads_with_a_warning():
    a, b = make_net(0), make_net(1)
    saved = graftopt.GraftOptimizer(torch.optim.SGD(a.parameters(), lr=0.0), [b], every=2)
    for _ in range(10):
        saved.step()
    state = saved.state_dict()
    saved.close()
    opt = graftopt.GraftOptimizer(torch.optim.SGD(a.parameters(), lr=0.0), [b], every=5)
    with pytest.warns(UserWarning, match=r"'every': \(2, 5\)"):
        opt.load_state_dict(state)
    assert (opt.steps, opt.rounds) == (10, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            opt.step()
    assert (opt.steps, opt.rounds) == (15, 3)


def test_a_peer_the_kernels_cannot_read_is_refused_at_construction():
    host = nn.Linear(4, 4)
    peer = nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match=r"peer 0 \(Linear\): unit '': weight is on the meta"):
        graftopt.GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=1)


def test_the_group_a_wrapper_rounds_with_is_visible():
    a, b, c, d = (make_net(s) for s in range(4))
    opts = graftopt.ring([a, b], [torch.optim.SGD(m.parameters(), lr=0.0) for m in (a, b)])
    assert [m is n for m, n in zip(opts[0].group, (a, b), strict=True)] == [True, True]
    # A wrapper grafting from a ring member joins that ring's rounds: it says so.
    oc = graftopt.GraftOptimizer(torch.optim.SGD(c.parameters(), lr=0.0), [a])
    assert [m is n for m, n in zip(opts[1].group, (a, b, c), strict=True)] == [True] * 3
    od = graftopt.GraftOptimizer(torch.optim.SGD(d.parameters(), lr=0.0), [make_net(5)])
    assert len(od.group) == 1 and od.group[0] is d
    oc.close()
    assert len(opts[0].group) == 2
