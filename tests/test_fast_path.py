"""The round's fast paths equal the straightforward implementation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)
from graftopt import functional as F
from graftopt.adapters import GenericAdapter
from graftopt.grafter import Grafter
from graftopt.kernels import cpu
from graftopt.peers import ModulePeers
from graftopt.settings import GraftSettings

from .conftest import make_net

needs_c = pytest.mark.usefixtures("c_kernels")


def _straight(t: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """One tensor through the pure-torch path."""
    x = t.detach().float().reshape(-1)
    return F._segment_entropy_torch(x, [x.numel()], bins)[0]


def _cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = [
        torch.randn(64, 32, 3, 3, generator=g),
        torch.randn(300_001, generator=g) * 3 + 1,  # long segment, split in chunks
        torch.rand(7, generator=g),
        torch.full((5, 5), 0.25),  # constant
        torch.tensor([1.5]),  # one element
        torch.tensor([2.0, -1.0]),  # two elements
        torch.randint(-3, 4, (50, 20), generator=g).float(),  # many values on bin edges
        torch.randn(16, 8, 5, 5, generator=g).to(memory_format=torch.channels_last),
        torch.randn(20, 30, generator=g).t(),  # non-contiguous
        torch.randn(40, 40, generator=g)[::2, 1::3],  # strided view
        torch.randn(33, 17, generator=g).bfloat16(),
        torch.randn(33, 17, generator=g).double(),
        torch.randn(33, 17, generator=g).half(),
    ]
    return base


@pytest.mark.parametrize("bins", [10, 3])
def test_entropies_equal_the_straightforward_path(bins):
    cases = _cases()
    fast = F.entropies(cases, bins=bins)
    slow = torch.stack([_straight(t, bins) for t in cases])
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert fast[3] == 0 and fast[4] == 0


def test_entropies_per_row_equal_row_entropy():
    g = torch.Generator().manual_seed(1)
    cases = [
        torch.randn(12, 4, 3, 3, generator=g),
        torch.randn(12, 4, 3, 3, generator=g).to(memory_format=torch.channels_last),
        torch.randn(9, 70_000, generator=g),  # rows longer than a chunk
        torch.randn(6, 5, generator=g).t(),
        torch.ones(3, 4),
    ]
    fast = F.entropies(cases, rows=[t.shape[0] for t in cases])
    slow = torch.cat(
        [
            F._segment_entropy_torch(
                t.reshape(t.shape[0], -1).reshape(-1), [t[0].numel()] * t.shape[0], 10
            )
            for t in cases
        ]
    )
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def test_segment_entropy_matches_histc():
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(n, generator=g) for n in (1, 2, 10, 1000, 70_000)]
    got = F.segment_entropy(torch.cat(parts), [p.numel() for p in parts])
    for h, p in zip(got, parts, strict=True):
        c = torch.histc(p, 10, float(p.min()), float(p.max())) / p.numel()
        assert abs(float(h) - float(-torch.special.xlogy(c, c).sum())) < 1e-6


@needs_c
def test_c_histogram_is_histc_exactly():
    g = torch.Generator().manual_seed(3)
    for scale in (1e-30, 1.0, 1e20):
        x = torch.randn(5000, generator=g) * scale + scale
        counts, finite = cpu.segment_histogram([x], [1], bins=10)
        assert torch.equal(counts[0].float(), torch.histc(x, 10, float(x.min()), float(x.max())))
        assert finite.all()
    bad = torch.tensor([1.0, float("nan"), 2.0])
    assert not cpu.segment_histogram([bad], [1], bins=10)[1].any()


def _histc_rows(x: torch.Tensor, rows: int, bins: int) -> torch.Tensor:
    r = x.float().reshape(rows, -1)
    out = []
    for row in r:
        lo, hi = float(row.min()), float(row.max())
        if lo == hi:
            out.append(torch.tensor([row.numel()] + [0] * (bins - 1)).float())
        else:
            out.append(torch.histc(row, bins, lo, hi))
    return torch.stack(out)


def _edge_rows(g: torch.Generator) -> list[torch.Tensor]:
    """Rows whose values sit on or a few ulps around the bin edges, rows centred on 0 (fine
    floats near the middle edge), ties, and rows that fill one bin."""
    edges = torch.linspace(-1.0, 1.0, 11)
    near = torch.cat([edges, *(torch.nextafter(edges, edges + s) for s in (-1.0, 1.0))])
    return [
        near[torch.randint(0, near.numel(), (3000,), generator=g)],
        torch.randn(4096 + 17, generator=g) * 1e-3,
        torch.randint(-5, 6, (999,), generator=g).float(),
        torch.cat([torch.full((2000,), 3.0), torch.tensor([-1.0, 7.0])]),
        torch.randn(200_000, generator=g),  # longer than one chunk
    ]


@needs_c
@pytest.mark.parametrize("bins", [2, 7, 10, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_c_histogram_equals_histc_on_edges_and_rows(bins, dtype):
    g = torch.Generator().manual_seed(bins)
    sources = [t.to(dtype) for t in _edge_rows(g)]
    filters = (torch.randn(24, 3, 3, 3, generator=g) * 0.1).to(dtype)  # a row per filter
    counts, finite = cpu.segment_histogram(
        [*sources, filters], [1] * len(sources) + [24], bins=bins
    )
    want = torch.cat([*(_histc_rows(t, 1, bins) for t in sources), _histc_rows(filters, 24, bins)])
    assert torch.equal(counts.float(), want)
    assert finite.all()


@needs_c
def test_portable_build_gives_the_same_histograms(monkeypatch):
    g = torch.Generator().manual_seed(5)
    sources = [*_edge_rows(g), torch.randn(64, 27, generator=g)]
    rows = [1] * (len(sources) - 1) + [64]
    results = []
    for portable in ("0", "1"):
        monkeypatch.setenv("GRAFTOPT_CKERNEL_PORTABLE", portable)
        cpu.library.cache_clear()
        results.append(cpu.segment_histogram(sources, rows, bins=10))
    monkeypatch.delenv("GRAFTOPT_CKERNEL_PORTABLE")
    cpu.library.cache_clear()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@needs_c
def test_c_histogram_of_empty_rows_and_non_finite_rows():
    empty = torch.zeros(3, 0)
    bad = torch.randn(2, 70_000)
    bad[1, 69_999] = float("inf")
    counts, finite = cpu.segment_histogram([empty, bad], [3, 2], bins=10)
    assert torch.equal(counts[:3], torch.zeros(3, 10, dtype=torch.int64))
    assert finite.tolist() == [True, True, True, True, False]
    assert torch.equal(counts[3].float(), _histc_rows(bad[0], 1, 10)[0])


def _tensors(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(8, 4, 3, 3, generator=g, dtype=dtype),
        torch.randn(8, generator=g, dtype=dtype),
        torch.randn(8, 4, 3, 3, generator=g, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(3, 8, generator=g, dtype=dtype).t(),  # non-contiguous: per-tensor path
        torch.randn((), generator=g, dtype=dtype),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_mix_many_equals_mix(dtype, m):
    hosts = _tensors(0, dtype)
    peers = [_tensors(j + 1, dtype) for j in range(m)]
    alphas = torch.rand(m, 20, generator=torch.Generator().manual_seed(9)) * 0.4 + 0.3
    columns, axes = [0, 10, 1, 2, 3], [0, None, 0, 1, None]
    got, finite = F.mix_many(hosts, peers, alphas, columns, axes)
    assert finite.all()
    for i, h in enumerate(hosts):
        ax = axes[i]
        per = [
            alphas[j, columns[i] : columns[i] + h.shape[ax]]
            if ax is not None
            else alphas[j, columns[i]]
            for j in range(m)
        ]
        want = F.mix(h, [p[i] for p in peers], per, axis=ax)
        assert got[i].dtype == h.dtype and got[i].stride() == want.stride()
        tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[i], want, **tol)


def test_mix_many_flags_non_finite():
    hosts, peers = _tensors(0), [_tensors(1)]
    hosts[0][0, 0, 0, 0] = float("inf")
    peers[0][3][1, 1] = float("nan")
    _, finite = F.mix_many(hosts, peers, torch.full((1, 20), 0.5), [0, 1, 2, 3, 4], [None] * 5)
    assert finite.tolist() == [False, True, True, False, True]


def _straight_round(host, peers, units, level):
    """Scores and blends unit by unit with the per-tensor functions."""
    table = dict(host.named_parameters()) | dict(host.named_buffers())
    ptables = [dict(p.named_parameters()) | dict(p.named_buffers()) for p in peers]
    alphas, out = [], {}
    for u in units:
        w = u.scored[0]
        if level == "layer":
            a = [F.graft_alpha(_straight(table[w]), _straight(pt[w])) for pt in ptables]
        else:
            rows = [
                F._segment_entropy_torch(
                    t[w].detach().reshape(-1), [t[w][0].numel()] * t[w].shape[0], 10
                )
                for t in [table, *ptables]
            ]
            a = [F.graft_alpha(rows[0], r) for r in rows[1:]]
        alphas.append(torch.stack(a).reshape(len(peers), -1))
        for name, ax in zip(u.members, u.axes, strict=True):
            t = table[name]
            if level == "filter" and ax is not None and t.dim() and t.shape[ax] == a[0].numel():
                out[name] = F.mix(t, [pt[name] for pt in ptables], a, axis=ax)
            else:
                out[name] = F.mix(t, [pt[name] for pt in ptables], [x.mean() for x in a])
    return torch.cat(alphas, 1), out


@pytest.mark.parametrize("level", ["layer", "filter"])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grafter_equals_straightforward_round(level, m, layout):
    nets = [make_net(s) for s in range(m + 1)]
    if layout == "channels_last":
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    host, peers = nets[0], nets[1:]
    units = GenericAdapter().units(host)
    g = Grafter(host, units, ModulePeers(peers), GraftSettings(level=level))
    names = g.names
    tables = [dict(n.named_parameters()) | dict(n.named_buffers()) for n in nets]
    blend = g.blend([tables[0][k] for k in names], [[t[k] for k in names] for t in tables[1:]])
    want_alphas, want = _straight_round(host, peers, units, level)
    torch.testing.assert_close(blend.record.alphas, want_alphas, atol=1e-6, rtol=0)
    assert blend.unit_ok.all()
    for name, v in zip(names, blend.values, strict=True):
        torch.testing.assert_close(v, want[name], atol=1e-6, rtol=1e-6)
        assert v.stride() == tables[0][name].stride()


def test_grafter_on_a_timm_model_equals_the_torch_path(c_kernels):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    models = [timm.create_model("resnet18", pretrained=False, num_classes=10) for _ in range(2)]
    units = GenericAdapter().units(models[0])
    results = []
    for route in ("c", "torch"):
        g = Grafter(models[0], units, ModulePeers(models[1:]), GraftSettings(route=route))
        results.append(g.blend(g.live(), g.peers.fetch(g.names)))
    torch.testing.assert_close(
        results[0].record.alphas, results[1].record.alphas, atol=1e-6, rtol=0
    )
    for a, b in zip(results[0].values, results[1].values, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_round_writes_bf16_models():
    a, b = make_net(0).bfloat16(), make_net(1).bfloat16()
    before = a.conv1.weight.detach().clone()
    g = Grafter(a, GenericAdapter().units(a), ModulePeers([b]), GraftSettings())
    blend = g.blend(g.live(), g.peers.fetch(g.names))
    g.write(blend)
    assert a.conv1.weight.dtype == torch.bfloat16 and not torch.equal(a.conv1.weight, before)
    assert g.skipped(blend) == ()


def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from graftopt import functional as F
        from graftopt.kernels import triton as tk
        g = torch.Generator().manual_seed(0)
        parts = [torch.randn(n, generator=g) for n in (1, 2, 5, 1500, 3000)]
        parts.append(torch.full((7,), 2.0))
        parts.append(torch.randint(-3, 4, (2100,), generator=g).float())
        lengths = [p.numel() for p in parts]
        x = torch.cat(parts)
        counts = tk.segment_histogram(x, lengths, bins=10)
        ent = F._entropy_of_counts(counts, torch.tensor(lengths))
        ref = F._segment_entropy_torch(x, lengths, 10)
        assert (ent - ref).abs().max() < 1e-6, (ent, ref)
        assert counts.sum(1).tolist() == lengths
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_equal_cpu():
    parts = [torch.randn(n) for n in (1, 2, 10, 5000)]
    x = torch.cat(parts)
    lengths = [p.numel() for p in parts]
    torch.testing.assert_close(
        F.segment_entropy(x.cuda(), lengths).cpu(), F.segment_entropy(x, lengths), atol=1e-6, rtol=0
    )
    a, b = make_net(0), make_net(1)
    host = [t.detach() for t in nn.ModuleList([a]).parameters()]
    peer = [t.detach() for t in nn.ModuleList([b]).parameters()]
    alphas = torch.rand(1, len(host))
    want, _ = F.mix_many(host, [peer], alphas, list(range(len(host))), [None] * len(host))
    got, ok = F.mix_many(
        [t.cuda() for t in host],
        [[t.cuda() for t in peer]],
        alphas.cuda(),
        list(range(len(host))),
        [None] * len(host),
    )
    assert ok.all()
    for g_, w in zip(got, want, strict=True):
        torch.testing.assert_close(g_.cpu(), w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_round_plan_follows_changed_tensors(level):
    """A grafter reuses its per-layout work round after round, never for tensors it no longer
    fits: each round equals a new grafter's, bit for bit, whatever changed in between."""
    host, peer = make_net(0), make_net(1)
    units = GenericAdapter().units(host)
    settings = GraftSettings(level=level)
    g = Grafter(host, units, ModulePeers([peer]), settings)

    def check() -> None:
        got = g.blend(g.live(), g.peers.fetch(g.names))
        fresh = Grafter(host, units, ModulePeers([peer]), settings)
        want = fresh.blend(fresh.live(), fresh.peers.fetch(fresh.names))
        # A unit holding NaN scores NaN: its alpha is NaN in both.
        torch.testing.assert_close(
            got.record.alphas, want.record.alphas, rtol=0, atol=0, equal_nan=True
        )
        assert torch.equal(got.unit_ok, want.unit_ok)
        for a, b in zip(got.values, want.values, strict=True):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
        g.write(got)

    check()
    check()  # same tensors, new values (the write)
    with torch.no_grad():
        host.conv1.weight.mul_(1.5)  # in place: same memory
    check()
    host.to(memory_format=torch.channels_last)  # new memory and strides
    check()
    peer.double()  # new dtype on one side
    check()
    w = host.fc.weight
    w.data = w.data.t().contiguous().t()  # same tensor object, new strides (not dense)
    check()
    w.data = w.data.clone()  # same tensor object and layout, new memory
    check()
    with torch.no_grad():
        peer.conv1.weight[0, 0, 0, 0] = float("nan")
    check()
    with torch.no_grad():
        peer.conv1.weight[0, 0, 0, 0] = 0.0
    check()
