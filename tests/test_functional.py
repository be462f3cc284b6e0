"""The pure math against a straightforward implementation, and its properties."""

from __future__ import annotations

import math

import pytest
import torch

from graftopt import functional as F
from graftopt.kernels.plans import EntropyPlan, MixPlan

from .conftest import ref_alpha, ref_entropy


@pytest.mark.parametrize("n", [1, 2, 7, 100, 4097])
@pytest.mark.parametrize("bins", [2, 10, 33])
def test_entropy_matches_histc(n, bins):
    g = torch.Generator().manual_seed(n * bins)
    t = torch.randn(n, generator=g) * 3
    assert F.entropy(t, bins=bins).item() == pytest.approx(ref_entropy(t, bins), abs=1e-6)


def test_segment_entropy_equals_one_by_one():
    g = torch.Generator().manual_seed(0)
    parts = [
        torch.randn(k, generator=g) * s for k, s in [(5, 1.0), (300, 0.01), (1, 4.0), (64, 100.0)]
    ]
    parts.append(torch.full((9,), 2.5))
    batched = F.segment_entropy(torch.cat(parts), [p.numel() for p in parts])
    single = torch.tensor([ref_entropy(p) for p in parts])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_entropy_edge_cases():
    assert F.entropy(torch.zeros(10)).item() == 0.0
    assert F.entropy(torch.full((3, 3), -7.0)).item() == 0.0
    assert F.entropy(torch.tensor([1.0])).item() == 0.0
    # two distinct values: half in the first bin, half (the max) in the last bin
    assert F.entropy(torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2))
    # uniform over all bins: ln(bins)
    assert F.entropy(torch.arange(10.0)).item() == pytest.approx(math.log(10), abs=1e-6)


def test_entropy_scores_in_float32_whatever_the_dtype():
    t = torch.randn(500, dtype=torch.float64)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        h = F.entropy(t.to(dtype))
        assert h.dtype == torch.float32
        assert math.isfinite(h.item())


def test_row_entropy_is_per_row():
    rows = torch.randn(4, 50)
    expected = torch.tensor([ref_entropy(r) for r in rows])
    torch.testing.assert_close(F.row_entropy(rows), expected, atol=1e-6, rtol=0)


def test_alpha_formula_and_range():
    hh, hp = torch.tensor(1.3), torch.tensor(1.2999)
    assert F.graft_alpha(hh, hp).item() == pytest.approx(ref_alpha(hh.item(), hp.item()), abs=1e-6)
    extreme = F.graft_alpha(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 0.0]), A=0.4, c=500)
    assert extreme.min() > 0.3 and extreme.max() < 0.7
    assert F.graft_alpha(hh, hh).item() == 0.5


def test_alpha_swap_gives_complement():
    a = torch.rand(20) * 3
    b = torch.rand(20) * 3
    torch.testing.assert_close(F.graft_alpha(a, b) + F.graft_alpha(b, a), torch.ones(20))


def test_bn_alpha():
    gh = torch.tensor([1.0, 0.0, -3.0, 0.0])
    gp = torch.tensor([1.0, 2.0, 1.0, 0.0])
    torch.testing.assert_close(F.bn_alpha(gh, gp), torch.tensor([0.5, 0.0, 0.75, 0.5]))


def test_mix_extremes_and_between():
    h, p = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(F.mix(h, [p], [torch.tensor(1.0)]), h)
    torch.testing.assert_close(F.mix(h, [p], [torch.tensor(0.5)]), (h + p) / 2)
    out = F.mix(h, [p], [torch.tensor(0.3)])
    assert torch.all(out >= torch.minimum(h, p) - 1e-6) and torch.all(
        out <= torch.maximum(h, p) + 1e-6
    )


def test_mix_mean_over_peers_and_filter_axis():
    h, p1, p2 = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    a1, a2 = torch.tensor([0.3, 0.5, 0.7]), torch.tensor([0.6, 0.4, 0.5])
    out = F.mix(h, [p1, p2], [a1, a2], axis=0)
    expected = (
        (a1[:, None] * h + (1 - a1[:, None]) * p1) + (a2[:, None] * h + (1 - a2[:, None]) * p2)
    ) / 2
    torch.testing.assert_close(out, expected)


def test_mix_keeps_dtype_and_memory_format():
    h = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last).bfloat16()
    p = torch.randn(4, 3, 5, 5)
    out = F.mix(h, [p], [torch.tensor(0.4)])
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), (0.4 * h.float() + 0.6 * p).bfloat16().float())


def test_plans_refuse_tensors_they_were_not_built_for() -> None:
    g = torch.Generator().manual_seed(0)
    h1, p1 = [torch.randn(4, 3, generator=g)], [[torch.randn(4, 3, generator=g)]]
    h2, p2 = [torch.randn(4, 3, generator=g)], [[torch.randn(4, 3, generator=g)]]
    alphas = torch.full((1, 1), 0.6)
    plan = MixPlan(h1, p1, [0], [None])
    first, _ = F.mix_many(h1, p1, alphas, [0], [None], plan=plan)
    torch.testing.assert_close(first[0], 0.6 * h1[0] + 0.4 * p1[0][0])
    with pytest.raises(ValueError, match="MixPlan was built for other tensors"):
        F.mix_many(h2, p2, alphas, [0], [None], plan=plan)
    entropy_plan = EntropyPlan(h1)
    entropy_plan(h1)
    if entropy_plan.ck is not None:  # the torch path keeps no pointers
        with pytest.raises(ValueError, match="EntropyPlan was built for other tensors"):
            entropy_plan(h2)
