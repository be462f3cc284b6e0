"""Filter matching: channel spaces that keep a network's function, assignment, weight matching."""

from __future__ import annotations

import copy
import itertools
import sys

import pytest
import timm
import torch
from torch import nn

import graftopt
import graftopt.models
from graftopt import matching
from graftopt.adapters.channels import channel_spaces
from graftopt.matching import ChannelSpaces, linear_assignment, match_peer, permute

from .conftest import make_net


def _best(gain: torch.Tensor) -> float:
    n = gain.shape[0]
    return max(
        sum(gain[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n))
    )


@pytest.mark.parametrize("solver", ["default", "built-in"])
@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_assignment_is_optimal(solver, n, monkeypatch):
    if solver == "built-in":
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails: built-in path
    g = torch.Generator().manual_seed(n)
    for trial in range(5):
        gain = torch.randn(n, n, generator=g)
        if trial == 4:
            gain = gain.round()  # ties
        p = linear_assignment(gain)
        assert sorted(p.tolist()) == list(range(n))
        assert sum(gain[i, p[i]].item() for i in range(n)) == pytest.approx(_best(gain))


def test_built_in_solver_matches_on_larger_matrices():
    gain = torch.randn(40, 40, generator=torch.Generator().manual_seed(0))
    cost = -gain.double().numpy()
    ours = matching._assign(cost)
    assert sorted(ours.tolist()) == list(range(40))
    scipy_opt = pytest.importorskip("scipy.optimize")
    theirs = scipy_opt.linear_sum_assignment(cost)[1]
    assert cost[range(40), ours].sum() == pytest.approx(cost[range(40), theirs].sum())


def test_assignment_refuses_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        linear_assignment(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        linear_assignment(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))


def test_permute_moves_each_space_along_its_axes():
    spaces = ChannelSpaces((2, 3), {"w": ((0, 0, 0), (1, 1, 1)), "b": ((0, 0, 0),)})
    w = torch.arange(8.0).reshape(2, 4)
    perms = [torch.tensor([1, 0]), torch.tensor([2, 0, 1])]
    out = permute(spaces, {"w": w, "b": torch.tensor([5.0, 6.0]), "other": w}, perms)
    # rows swapped; columns 1..3 reordered as (3, 1, 2); column 0 is in no space
    assert out["w"].tolist() == [[4.0, 7.0, 5.0, 6.0], [0.0, 3.0, 1.0, 2.0]]
    assert out["b"].tolist() == [6.0, 5.0]
    assert out["other"] is w


class Shuffle(nn.Module):
    """A channel shuffle: an operation the walk does not know, so its channels stay put."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class Mixed(nn.Module):
    """Residual sums, concatenation, a gate, a layer scale, a shuffle and a flattening head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.gate = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(12, 12, 1)
        self.shuffle = Shuffle()
        self.d = nn.Conv2d(12, 6, 1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.a(x) * self.gamma.reshape(1, -1, 1, 1)
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        x = torch.cat([x, self.b(x)], dim=1)
        x = self.d(self.shuffle(self.c(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.ln(x))


def _randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


MODELS = {
    "mixed": (lambda: Mixed(), (2, 3, 8, 8)),
    "small": (lambda: make_net(0), (2, 1, 8, 8)),
    "cifar_resnet20": (lambda: timm.create_model("cifar_resnet20", num_classes=10), (2, 3, 32, 32)),
    "cifar_mobilenetv2": (lambda: timm.create_model("cifar_mobilenetv2"), (2, 3, 32, 32)),
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=10), (2, 3, 32, 32)),
    "efficientnet_b0": (
        lambda: timm.create_model("efficientnet_b0", num_classes=10),
        (1, 3, 32, 32),
    ),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), (2, 3, 32, 32)),
    "densenet121": (lambda: timm.create_model("densenet121", num_classes=10), (1, 3, 32, 32)),
    "vit_tiny": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10),
        (2, 3, 32, 32),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_permuted_network_computes_the_same_function(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = _randomized(build())
    spaces = channel_spaces(model)
    assert spaces.sizes, "no channel space found"
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(n, generator=g) for n in spaces.sizes]
    state = model.state_dict()
    moved = permute(spaces, state, perms)
    assert any(not torch.equal(moved[k], state[k]) for k in state)
    other = copy.deepcopy(model)
    other.load_state_dict(moved)
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        a, b = model(x), other(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    # weight matching finds the permutation back (exact copies, up to its order)
    back = permute(spaces, moved, match_peer(spaces, state, moved))
    if name in ("small", "cifar_resnet20", "resnet18"):  # elsewhere it may stop at a local optimum
        assert all(torch.equal(back[k], state[k]) for k in state)
    distance = sum(((back[k] - state[k]).float() ** 2).sum() for k in state)
    assert distance <= sum(((moved[k] - state[k]).float() ** 2).sum() for k in state)


def test_unknown_operations_fix_their_channels():
    spaces = channel_spaces(Mixed())
    covered = {name for name in spaces.axes}
    # the shuffled space (c's outputs, d's inputs) keeps its order; the others move
    assert not any(axis == 0 for axis, _, _ in spaces.axes.get("c.weight", ()))
    assert not any(axis == 1 for axis, _, _ in spaces.axes.get("d.weight", ()))
    assert {
        "stem.weight",
        "bn.running_var",
        "gamma",
        "gate.bias",
        "b.weight",
        "ln.weight",
    } <= covered
    assert not any(axis == 0 for axis, _, _ in spaces.axes.get("fc.weight", ()))  # the logits


def test_channel_spaces_of_option_a_shortcuts():
    spaces = channel_spaces(timm.create_model("cifar_resnet20", num_classes=10))
    # stage 2's stream: 8 padded channels, stage 1's 16, 8 padded: three spaces in one axis
    entries = spaces.axes["layer2.0.conv2.weight"]
    assert [(a, o, spaces.sizes[s]) for a, o, s in entries if a == 0] == [
        (0, 0, 8),
        (0, 8, 16),
        (0, 24, 8),
    ]
    stage1 = {s for a, o, s in spaces.axes["layer1.0.conv2.weight"] if a == 0}
    assert {s for a, o, s in entries if o == 8 and a == 0} == stage1


def test_untraceable_model_is_refused():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    with pytest.raises(ValueError, match="cannot be traced"):
        channel_spaces(Branchy())


def _permuted_copy(model: nn.Module, seed: int) -> nn.Module:
    spaces = channel_spaces(model)
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    other.load_state_dict(
        permute(spaces, model.state_dict(), [torch.randperm(n, generator=g) for n in spaces.sizes])
    )
    return other


def test_graft_with_matching_blends_like_with_like():
    host = make_net(0)
    peer = _permuted_copy(host, 3)
    before = copy.deepcopy(host.state_dict())
    matched = copy.deepcopy(host)
    graftopt.graft_(matched, [peer], A=0.0, align=True)
    for k, v in before.items():
        torch.testing.assert_close(matched.state_dict()[k], v)  # the mean of a net with itself
    plain = copy.deepcopy(host)
    graftopt.graft_(plain, [peer], A=0.0)
    assert any(not torch.allclose(plain.state_dict()[k], v) for k, v in before.items())
    assert all(
        torch.equal(peer.state_dict()[k], v)
        for k, v in _permuted_copy(host, 3).state_dict().items()
    )


@pytest.mark.filterwarnings("ignore:graft round 1")
def test_optimizer_matches_in_rounds_and_checkpoints_the_setting():
    host, peer = make_net(0), None
    peer = _permuted_copy(host, 5)
    opt = graftopt.GraftOptimizer(
        torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1, A=0.0, align=True
    )
    before = copy.deepcopy(host.state_dict())
    opt.step()
    assert opt.rounds == 1 and opt.align
    for k, v in before.items():
        torch.testing.assert_close(host.state_dict()[k], v)
    state = opt.state_dict()
    assert state["graft"]["align"] is True
    assert "align=True" in repr(opt)
    opt.close()
    other = graftopt.GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1)
    with pytest.warns(UserWarning, match="align"):
        other.load_state_dict(state)
    other.close()
    with pytest.raises(ValueError, match="align must be True or False"):
        graftopt.GraftOptimizer(
            torch.optim.SGD(host.parameters(), lr=0.0), [peer], every=1, align=1
        )


def test_matching_ignores_non_finite_peers():
    host = make_net(0)
    peer = _permuted_copy(host, 2)
    with torch.no_grad():
        peer.conv1.weight[0, 0, 0, 0] = float("nan")
    spaces = channel_spaces(host)
    perms = match_peer(spaces, host.state_dict(), peer.state_dict())
    assert all(sorted(p.tolist()) == list(range(len(p))) for p in perms)
