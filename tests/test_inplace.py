"""Rounds written straight into the live tensors equal rounds written through buffers."""

from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch
from torch import nn

import graftopt
from graftopt import GraftOptimizer
from graftopt import functional as F
from graftopt.inplace import InPlaceRound
from graftopt.kernels import cpu

from .conftest import make_net

pytestmark = pytest.mark.usefixtures("c_kernels")


def _ring(models, **kw):
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    return graftopt.ring(models, opts, same_init=False, every=1, **kw)


def _all_to_all(models, **kw):
    return [
        GraftOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.0),
            [p for p in models if p is not m],
            every=1,
            model=m,
            **kw,
        )
        for m in models
    ]


def _one_plain_peer(models, **kw):
    """The README's usage: one host, one peer that no round writes (each set is one job)."""
    host, peer = models[0], models[1]
    opt = torch.optim.SGD(host.parameters(), lr=0.0)
    return [GraftOptimizer(opt, [peer], every=1, model=host, **kw)]


def _models(k, layout, dtype):
    nets = [make_net(s).to(dtype) for s in range(k)]
    if layout == "channels_last":
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    return nets


def _round(wiring, layout, dtype, level, monkeypatch, in_place, poison=None):
    models = _models(3, layout, dtype)
    if poison is not None:
        poison(models)
    opts = wiring(models, level=level)
    with monkeypatch.context() as m:
        if not in_place:
            m.setattr(InPlaceRound, "possible", False)
        with contextlib.ExitStack() as stack:
            if poison is not None:
                stack.enter_context(pytest.warns(RuntimeWarning))
            for o in opts:
                o.step()
    used = opts[0]._participant.group.in_place[0]
    for o in opts:
        o.close()
    return models, opts, used


@pytest.mark.parametrize("wiring", [_ring, _all_to_all, _one_plain_peer])
@pytest.mark.parametrize("level", ["layer", "filter"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_equals_buffered_bit_for_bit(wiring, level, layout, dtype, monkeypatch):
    fast, fast_opts, used = _round(wiring, layout, dtype, level, monkeypatch, True)
    slow, _, _ = _round(wiring, layout, dtype, level, monkeypatch, False)
    assert used is not None and used.possible
    for a, b in zip(fast, slow, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
            assert x.stride() == y.stride(), name
    for o in fast_opts:  # no weight copy is kept between in-place rounds
        assert all(t is None for t in o._participant.grafter._out)


def _poison_running_var(models):
    with torch.no_grad():
        models[1].bn2.running_var[2] = float("inf")  # a member no score reads
        models[2].fc.weight[0, 0] = float("nan")  # a scored tensor


def test_in_place_skips_units_with_nan_or_inf_like_buffered(monkeypatch):
    args = (_ring, "contiguous", torch.float32, "layer", monkeypatch)
    fast, fast_opts, used = _round(*args, True, poison=_poison_running_var)
    slow, _, _ = _round(*args, False, poison=_poison_running_var)
    assert used.possible
    # Model i reads model i - 1; model 1 holds the bad dw, model 2 the bad fc.
    assert set(fast_opts[2].history[-1].skipped) == {"dw", "fc"}
    assert set(fast_opts[0].history[-1].skipped) == {"fc"}
    assert set(fast_opts[1].history[-1].skipped) == {"dw"}
    for a, b in zip(fast, slow, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), name
    fresh = make_net(0)
    assert torch.equal(fast[0].fc.weight, fresh.fc.weight)  # skipped: left as it was
    assert not torch.equal(fast[0].conv1.weight, fresh.conv1.weight)


def test_overlapping_memory_falls_back_to_buffers(monkeypatch):
    host, peer = make_net(0), make_net(1)
    # The peer's bias is a view into the host's fc weight: blending in place would read
    # values the round already wrote.
    peer.fc.bias.data = host.fc.weight.data.view(-1)[5:8]
    expected_host, expected_peer = make_net(0), make_net(1)
    expected_peer.fc.bias.data = expected_host.fc.weight.data.view(-1)[5:8]
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    opt.step()
    assert not opt._participant.group.in_place[0].possible
    with monkeypatch.context() as m:
        m.setattr(InPlaceRound, "possible", False)
        ref = GraftOptimizer(
            torch.optim.SGD(expected_host.parameters(), lr=0.0), [expected_peer], every=1
        )
        ref.step()
    for (name, x), y in zip(
        host.state_dict().items(), expected_host.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_mixed_dtypes_fall_back_to_buffers():
    host, peer = make_net(0), make_net(1).double()
    opts = _ring([host, peer])
    for o in opts:
        o.step()
    assert not opts[0]._participant.group.in_place[0].possible


def test_graft_function_writes_in_place_like_the_optimizer():
    host, peer = make_net(0), make_net(1)
    twin, twin_peer = make_net(0), make_net(1)
    graftopt.graft_(host, [peer])
    GraftOptimizer(torch.optim.SGD(twin.parameters(), lr=0.0), [twin_peer], every=1).step()
    for (name, x), y in zip(host.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(peer.fc.weight, make_net(1).fc.weight)  # peers are never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_kernel_across_chunks_rows_and_sets(dtype):
    g = torch.Generator().manual_seed(0)
    # Rows of 3000 cross the kernel's 4096-element chunks, rows of 3 its short-row blocks;
    # three hosts read each other.
    shapes = [(7, 3000), (10001,), (1,), (0,), (1500, 3)]
    k = 3
    live = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(k)]
    before = [[t.clone() for t in m] for m in live]
    tables = [torch.rand(k - 1, 1510, generator=g) for _ in range(k)]
    columns, axes = [0, 7, 8, 9, 10], [0, None, None, None, 0]
    row_len = [3000, 0, 0, 0, 3]
    skip = torch.zeros(k * len(shapes), dtype=torch.bool)
    skip[len(shapes) + 1] = True  # host 1's second tensor stays
    jobs, peers = [], []
    for h in range(k):
        for i in range(len(shapes)):
            jobs.append(live[h][i])
            peers.append([live[p][i] for p in range(k) if p != h])
    sets = [[h * len(shapes) + i for h in range(k)] for i in range(len(shapes))]
    kernel = cpu.GroupMix(
        jobs, peers, [h for h in range(k) for _ in shapes], columns * k, row_len * k, sets
    )
    kernel.run(tables, skip)
    for h in range(k):
        for i, shape in enumerate(shapes):
            if skip[h * len(shapes) + i]:
                assert torch.equal(live[h][i], before[h][i])
                continue
            ps = [before[p][i] for p in range(k) if p != h]
            if axes[i] is None:
                alphas = [tables[h][j, columns[i]] for j in range(k - 1)]
            else:
                n = shape[0]
                alphas = [tables[h][j, columns[i] : columns[i] + n] for j in range(k - 1)]
            want = F.mix(before[h][i], ps, alphas, axis=axes[i])
            assert torch.equal(live[h][i], want), (h, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_kernel_one_job_sets_blend_straight_into_the_tensor(dtype):
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 3000), (10001,), (1,), (0,), (1500, 3)]
    live = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    peer = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    before, peer_before = [t.clone() for t in live], [q.clone() for q in peer]
    table = torch.rand(1, 1510, generator=g)
    columns, row_len = [0, 7, 8, 9, 10], [3000, 0, 0, 0, 3]
    skip = torch.zeros(len(shapes), dtype=torch.bool)
    skip[1] = True
    n = len(shapes)
    kernel = cpu.GroupMix(
        live, [[q] for q in peer], [0] * n, columns, row_len, [[i] for i in range(n)]
    )
    kernel.run([table], skip)
    for i, shape in enumerate(shapes):
        if skip[i]:
            assert torch.equal(live[i], before[i])
            continue
        axis = 0 if row_len[i] else None
        alpha = table[0, columns[i] : columns[i] + shape[0]] if axis == 0 else table[0, columns[i]]
        assert torch.equal(live[i], F.mix(before[i], [peer[i]], [alpha], axis=axis)), i
    assert all(torch.equal(a, b) for a, b in zip(peer, peer_before, strict=True))  # only read


def _changes():
    """Changes to a pair of models between rounds: after each, the kept in-place round must be
    rebuilt or reused correctly."""

    def values(m):
        with torch.no_grad():
            m[0].conv1.weight.mul_(1.5)

    def channels_last(m):
        m[0].to(memory_format=torch.channels_last)

    def new_strides(m):
        w = m[1].fc.weight
        w.data = w.data.t().contiguous().t()

    def new_memory(m):
        w = m[1].fc.weight
        w.data = w.data.clone()

    return [lambda m: None, values, channels_last, new_strides, new_memory, lambda m: None]


def test_kept_in_place_round_follows_changed_tensors(monkeypatch):
    pairs = {mode: [make_net(0), make_net(1)] for mode in ("in place", "buffered")}
    opts = {mode: _ring(models) for mode, models in pairs.items()}
    for change in _changes():
        for mode, models in pairs.items():
            change(models)
            with monkeypatch.context() as m:
                if mode == "buffered":
                    m.setattr(InPlaceRound, "possible", False)
                for o in opts[mode]:
                    o.step()
        for a, b in zip(pairs["in place"], pairs["buffered"], strict=True):
            for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
                assert torch.equal(x, y), name


class _Partly(torch.nn.Module):
    """A transposed conv (filters along dim 1) and a float64 head beside float32 layers: at
    filter level the kernel takes only some tensors, the others are blended aside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.up = torch.nn.ConvTranspose2d(4, 6, 3)
        self.bn_up = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, 3).double()


def _partly(seed):
    torch.manual_seed(seed)
    return _Partly()


@pytest.mark.parametrize("poison", [False, True])
def test_tensors_outside_the_kernel_are_blended_aside(monkeypatch, poison):
    results = {}
    for mode in ("in place", "buffered"):
        models = [_partly(s) for s in range(3)]
        if poison:
            with torch.no_grad():
                models[1].up.weight[0, 0, 0, 0] = float("nan")
        opts = _ring(models, level="filter")
        with monkeypatch.context() as m, contextlib.ExitStack() as stack:
            if mode == "buffered":
                m.setattr(InPlaceRound, "possible", False)
            if poison:
                stack.enter_context(pytest.warns(RuntimeWarning, match="up"))
            for o in opts:
                o.step()
        if mode == "in place":
            used = opts[0]._participant.group.in_place[0]
            assert used.possible and any(idx for idx, _ in used.others)
        results[mode] = models
    for a, b in zip(results["in place"], results["buffered"], strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num()), name
    if poison:  # model 2 reads model 1: its transposed conv stays as it was
        assert torch.equal(results["in place"][2].up.weight, _partly(2).up.weight)


def test_in_place_round_bumps_version_counters():
    """Autograd sees the round as an in-place change: a graph saved before it refuses to run."""
    host, peer = make_net(0), make_net(1)
    opts = _ring([host, peer])
    host.eval()
    out = host(torch.randn(2, 1, 6, 6)).sum()  # eval-mode norms save running statistics
    before = host.bn1.running_var._version
    for o in opts:
        o.step()
    assert opts[0]._participant.group.in_place[0].possible
    assert host.bn1.running_var._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def _seq(seed, *sizes, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    return torch.nn.Sequential(*layers).to(dtype)


def _both_paths(build, run, monkeypatch):
    """``run(build())`` in place and through buffers; the two models' state dicts."""
    out = []
    for buffered in (False, True):
        models = build()
        with monkeypatch.context() as m:
            if buffered:
                m.setattr(InPlaceRound, "possible", False)
            run(models)
        out.append(models)
    return out


def test_buffers_kept_from_buffered_rounds_are_released_in_place():
    a, b, p = _seq(0, 64, 64, 8), _seq(1, 64, 64, 8), _seq(2, 64, 64, 8)
    oa = GraftOptimizer(torch.optim.SGD(a.parameters(), lr=0.0), [p], every=2)
    ob = GraftOptimizer(torch.optim.SGD(b.parameters(), lr=0.0), [a], every=2)
    for o in [ob, ob, ob, oa, oa, ob, ob, oa, oa, oa]:  # b a step ahead: buffered rounds
        o.step()
    for _ in range(4):  # lockstep: in place
        oa.step()
        ob.step()
    g = oa._participant.grafter
    assert oa._participant.group.in_place[0].possible
    assert all(t is None for t in g._out)
    assert all(group.kept is None for group in g._mix[1].fast)


def test_huge_finite_float64_values_blend_like_buffered(monkeypatch):
    def build():
        host, peer = _seq(0, 4, 4, 2, dtype=torch.float64), _seq(1, 4, 4, 2, dtype=torch.float64)
        with torch.no_grad():
            host[1].weight[0, 0] = 1e39  # finite in float64, beyond float32's range
        return host, peer

    records = []

    def run(models):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            records.append(graftopt.graft_(models[0], [models[1]]))

    fast, slow = _both_paths(build, run, monkeypatch)
    assert records[0].skipped == records[1].skipped == ()
    assert torch.equal(fast[0][1].weight, slow[0][1].weight)


def test_hosts_of_one_group_that_overlap_in_memory_are_refused():
    ms = [_seq(s, 8, 8, 8) for s in range(4)]
    base = torch.randn(32, generator=torch.Generator().manual_seed(5))
    ms[0][0].bias.data = torch.as_strided(base, (8,), (2,), 0)  # 0, 2, ..., 14: gaps
    ms[1][0].bias.data = torch.as_strided(base, (8,), (1,), 8)  # 8..15: overlapping
    sgd = [torch.optim.SGD(m.parameters(), lr=0.0) for m in ms[:2]]
    _first = GraftOptimizer(sgd[0], [ms[2], ms[1]], every=1)
    with pytest.raises(ValueError, match=r"'0\.bias' shares memory with '0\.bias'"):
        GraftOptimizer(sgd[1], [ms[3]], every=1)  # host 0 reads host 1: one group


def test_ring_members_sharing_a_layer_object_are_refused():
    shared = nn.Linear(8, 8)
    a, b = nn.Sequential(nn.Linear(8, 8), shared), nn.Sequential(nn.Linear(8, 8), shared)
    with pytest.raises(ValueError, match="one layer object in both"):
        graftopt.ring([a, b], [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b)])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
@pytest.mark.parametrize("level", ["layer", "filter"])
def test_zero_size_layers_stay_finite(shape, level):
    host, peer = _seq(0, 4, 6), _seq(1, 4, 6)
    for m, s in ((host, 2), (peer, 3)):
        torch.manual_seed(s)
        m.append(torch.nn.Linear(*shape))
        m.append(torch.nn.Linear(shape[1], 3))
    graftopt.graft_(host, [peer], level=level)
    assert all(torch.isfinite(v).all() for v in host.state_dict().values())
