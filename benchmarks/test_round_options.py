"""What the payoff options cost: a round with and without norm recalibration, and a training
step with and without mutual distillation (cifar_resnet20, 2 models, batch 32), side by side."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import graftopt
import graftopt.models
from graftopt.train.loop import distill_loss

from .common import describe, synced


def _models(device: torch.device, k: int = 2) -> list[nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(timm.create_model("cifar_resnet20", num_classes=10).to(device))
    return out


def _batches(device: torch.device, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(32, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (32,), generator=g).to(device),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("batches", [0, 5, 20], ids=["plain", "recal5", "recal20"])
def test_round_with_recalibration(benchmark, batches, device):
    """One round of a ring of 2 (lr 0, so only the round counts), recalibrating from N batches."""
    models = _models(device)
    data = [x for x, _ in _batches(device, max(batches, 1))]
    kw = {"recalibrate": graftopt.Recalibration(data, batches)} if batches else {}
    opts = graftopt.ring(
        models,
        [torch.optim.SGD(m.parameters(), lr=0.0) for m in models],
        every=1,
        **kw,
        same_init=False,
    )

    def run():
        for o in opts:
            o.step()

    benchmark.group = "round options: one round of cifar_resnet20, ring of 2, batch 32"
    benchmark.extra_info.update(impl=f"recalibrate={batches}", device=describe(device))
    try:
        benchmark.pedantic(synced(run), rounds=5, warmup_rounds=1)
    finally:
        for o in opts:
            o.close()


@pytest.mark.parametrize("weight", [0.0, 1.0], ids=["plain", "distill"])
def test_step_with_distillation(benchmark, weight, device):
    """One training iteration of 2 networks, with the peers' logits as distillation targets."""
    models = _models(device)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    x, y = _batches(device, 1)[0]

    def run():
        with torch.enable_grad():
            for i, (m, o) in enumerate(zip(models, opts, strict=True)):
                o.zero_grad()
                logits = m(x)
                loss = nn.functional.cross_entropy(logits, y)
                if weight:
                    with torch.no_grad():
                        targets = [p(x) for j, p in enumerate(models) if j != i]
                    loss = loss + weight * distill_loss(logits, targets, 1.0)
                loss.backward()
                o.step()

    benchmark.group = "round options: one training iteration, cifar_resnet20 x 2, batch 32"
    benchmark.extra_info.update(impl=f"distill={weight}", device=describe(device))
    benchmark.pedantic(synced(run), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("model", ["cifar_resnet20", "resnet50"])
@pytest.mark.parametrize("align", [False, True], ids=["plain", "matched"])
def test_round_with_matching(benchmark, model, align, device):
    """One round of a ring of 2 networks from different starts, with and without matching each
    peer's filters to the host's first (weight matching)."""
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(timm.create_model(model, num_classes=10).to(device))
    opts = graftopt.ring(
        models,
        [torch.optim.SGD(m.parameters(), lr=0.0) for m in models],
        every=1,
        align=align,
        same_init=False,
    )
    starts = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]

    def restart():  # every timed round blends the two different starts again
        for m, sd in zip(models, starts, strict=True):
            m.load_state_dict(sd)

    def run():
        for o in opts:
            o.step()

    benchmark.group = f"round options: one round of {model}, ring of 2, filter matching"
    benchmark.extra_info.update(impl=f"align={align}", device=describe(device))
    try:
        benchmark.pedantic(synced(run), setup=restart, rounds=3, warmup_rounds=1)
    finally:
        for o in opts:
            o.close()
