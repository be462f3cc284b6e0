"""Models a round cannot blend as they are get an error naming the layer and the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graftopt
from graftopt import GraftOptimizer


def _wrap(host: nn.Module, peer: nn.Module) -> GraftOptimizer:
    return GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [peer], every=1, model=host)


def _tied() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    m[2].weight = m[0].weight
    return m


def _old_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3)))


CASES = [
    (_tied, "0.weight and 2.weight are the same tensor (tied weights)"),
    (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))),
     "layer '0' is parametrized"),
    (lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3))),
     "layer '0' is parametrized"),
    (_old_weight_norm, "layer '0' uses the old weight_norm / spectral_norm hooks"),
    (lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 3))), "old weight_norm"),
    (lambda: nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2)), "run one forward pass first"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "message"), CASES)
def test_unblendable_models_are_refused_by_name(make, message: str) -> None:
    host, peer = make(), make()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _wrap(host, peer)
    with pytest.raises(ValueError):
        graftopt.graft_(host, [peer])


@pytest.mark.parametrize("make", [lambda: nn.Linear(4, 3), lambda: nn.Conv2d(3, 4, 3)])
def test_a_bare_layer_is_a_model(make) -> None:
    torch.manual_seed(0)
    host, peer = make(), make()
    expected = 0.5 * (host.weight.detach() + peer.weight.detach())  # A=0: plain mean
    opt = GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1, A=0.0)
    opt.step()
    assert opt.rounds == 1
    torch.testing.assert_close(host.weight.detach(), expected)


def test_lazy_layers_work_after_one_forward() -> None:
    host, peer = (nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2)) for _ in range(2))
    for m in (host, peer):
        m(torch.randn(2, 5))
    opt = _wrap(host, peer)
    opt.step()
    assert opt.rounds == 1 and [u.name for u in opt.units] == ["0", "1"]


def test_frozen_layers_can_be_left_alone() -> None:
    from .conftest import make_net

    host, peer = make_net(0), make_net(1)
    host.conv1.weight.requires_grad_(False)
    frozen = host.conv1.weight.detach().clone()
    trained = [p for p in host.parameters() if p.requires_grad]
    opt = GraftOptimizer(torch.optim.SGD(trained, lr=0.0), [peer], every=1, model=host,
                         frozen="keep")  # fmt: skip
    assert "conv1" not in [u.name for u in opt.units]
    opt.step()
    assert torch.equal(host.conv1.weight, frozen)
    assert not torch.equal(host.fc.weight, make_net(0).fc.weight)
    opt.close()
    blended = GraftOptimizer(torch.optim.SGD(trained, lr=0.0), [peer], every=1, model=host)
    blended.step()  # the default blends every layer, frozen or not, as the paper does
    assert not torch.equal(host.conv1.weight, frozen)


def test_meta_layers_are_refused_by_name() -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"unit '0': 0.weight is on the meta device"):
        graftopt.GraftOptimizer(torch.optim.SGD(meta.parameters(), lr=0.1), [meta], every=1)
