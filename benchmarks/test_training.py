"""Training overhead of grafting: cifar_resnet20 on generated data, 2 models in a ring."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import graftopt
import graftopt.models

from .common import describe, synced

STEPS = 20


def _setup(every: int | None, device: torch.device):
    models, opts = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(timm.create_model("cifar_resnet20", num_classes=10).to(device))
        opts.append(torch.optim.SGD(models[-1].parameters(), lr=0.05, momentum=0.9))
    if every is not None:
        opts = graftopt.ring(models, opts, same_init=False, every=every)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(32, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (32,), generator=g).to(device),
        )
        for _ in range(4)
    ]
    return models, opts, data


@pytest.mark.parametrize("every", [1, 100, None], ids=["every1", "every100", "none"])
def test_training(benchmark, every, device):
    models, opts, data = _setup(every, device)

    def run():
        with torch.enable_grad():
            for step in range(STEPS):
                x, y = data[step % len(data)]
                for m, o in zip(models, opts, strict=True):
                    o.zero_grad()
                    nn.functional.cross_entropy(m(x), y).backward()
                    o.step()

    benchmark.group = f"training: cifar_resnet20, 2 models, {STEPS} iterations of batch 32"
    benchmark.extra_info.update(
        model="cifar_resnet20", every=every or 0, impl=f"every={every}", device=describe(device)
    )
    try:
        benchmark.pedantic(synced(run), rounds=3, warmup_rounds=1)
    finally:
        for o in opts:
            if isinstance(o, graftopt.GraftOptimizer):
                o.close()
