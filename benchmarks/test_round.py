"""One graft round of a ring of timm models: the authors' algorithm, graftopt, and the floor.

Each case times the three side by side on the same tensors; ``benchmarks/ratios.py`` turns the
saved JSON into the ratio table of docs/benchmarks.md.
"""

from __future__ import annotations

import pytest

from .common import Round, describe, make_models, synced

MODELS = ["resnet18", "resnet50", "mobilenetv2_100", "convnext_tiny", "vit_small_patch16_224"]
IMPLS = ["reference", "graftopt", "floor"]


@pytest.fixture(
    scope="module", params=[(m, k) for m in MODELS for k in (2, 4)], ids=lambda p: f"{p[0]}-k{p[1]}"
)
def ring_models(request, device):
    name, k = request.param
    return name, k, make_models(name, k, device)


@pytest.mark.parametrize("level", ["layer", "filter"])
@pytest.mark.parametrize("impl", IMPLS)
def test_round(benchmark, ring_models, level, impl, device):
    name, k, models = ring_models
    r = Round(models, level)
    benchmark.group = f"round {name} k={k} {level}"
    benchmark.extra_info.update(model=name, k=k, level=level, impl=impl, device=describe(device))
    benchmark.extra_info["params"] = sum(t.numel() for t in r.tables[0].values())
    benchmark.extra_info["tensors"] = len(r.tables[0])
    try:
        benchmark.pedantic(
            synced(getattr(r, impl)), rounds=3 if impl == "reference" else 10, warmup_rounds=1
        )
    finally:
        r.close()
