"""Finding the host of ``GraftOptimizer(SGD(model.parameters()), peers=...)`` without ``model=``.

The wrapper finds the model from the optimizer's parameters with one pass over the live objects;
its cost grows with the number of live Python objects, so each case times it with none and with
ten million extra ones.
"""

from __future__ import annotations

import pytest
import timm
import torch

import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)
from graftopt.optimizer import _infer_host


@pytest.mark.parametrize("extra", [0, 10_000_000], ids=["heap", "heap+10M"])
def test_host_inference(benchmark, extra):
    model = timm.create_model("resnet50", pretrained=False)
    peer = timm.create_model("resnet50", pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    junk = [[] for _ in range(extra)]
    benchmark.group = "host inference resnet50"
    benchmark.extra_info.update(model="resnet50", extra_objects=extra)
    host = benchmark.pedantic(lambda: _infer_host(opt, [peer]), rounds=3, warmup_rounds=1)
    assert host is model
    del junk
