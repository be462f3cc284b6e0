"""The adapter registry, the generic adapter, wrappers, and the coverage command."""

from __future__ import annotations

import csv
import warnings

import pytest
import timm
import torch
from torch import nn

import graftopt.models
from graftopt import GraftOptimizer
from graftopt.adapters import (
    Adapter,
    CifarAdapter,
    GenericAdapter,
    TimmAdapter,
    Unit,
    adapter_for,
    family_of,
    get_adapter,
    list_adapters,
    register_adapter,
)
from graftopt.adapters import registry as reg
from graftopt.adapters.base import tensor_table
from graftopt.adapters.coverage import check_units, main, measure


@pytest.fixture
def clean_registry():
    saved = dict(reg._BY_CLASS), dict(reg._BY_FAMILY)
    yield
    reg._BY_CLASS.clear()
    reg._BY_CLASS.update(saved[0])
    reg._BY_FAMILY.clear()
    reg._BY_FAMILY.update(saved[1])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pre = nn.BatchNorm2d(8)  # normalizes the sum below, not one conv's output
        self.conv2 = nn.Conv2d(8, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.conv2(self.pre(x + 1))
        return self.fc(x.mean((2, 3)))


class One(Adapter):
    def units(self, model: nn.Module) -> list[Unit]:
        return [Unit("conv", ("conv.weight",), ("conv.weight",))]


def test_generic_pairs_each_layer_with_the_norm_consuming_it() -> None:
    units = {u.name: u for u in GenericAdapter().units(Net())}
    assert list(units) == ["conv", "conv2", "fc"]
    assert units["conv"].members == (
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
    )
    assert units["conv"].gamma == "bn.weight"
    assert units["conv2"].members == ("conv2.weight",)


def test_plain_models_get_the_generic_adapter() -> None:
    assert isinstance(get_adapter(Net()), GenericAdapter)
    assert family_of(Net()) is None


def test_registry_prefers_class_then_family(clean_registry) -> None:
    register_adapter(Net)(One)
    assert isinstance(get_adapter(Net()), One)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    assert family_of(model) == "resnet"
    assert isinstance(get_adapter(model), TimmAdapter)
    with pytest.warns(UserWarning, match="replacing"):
        register_adapter("resnet")(One)
    assert isinstance(get_adapter(model), One)
    assert list_adapters()["resnet"] == "One"


def test_family_comes_from_timm_metadata() -> None:
    # DeiT models are built from ViT's class but registered in timm.models.deit.
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    assert type(model).__module__ == "timm.models.vision_transformer"
    assert family_of(model) == "deit"
    cifar = timm.create_model("cifar_resnet20", pretrained=False)
    assert family_of(cifar) == "cifar"
    assert isinstance(get_adapter(cifar), CifarAdapter)


def test_overwrite_warns_at_the_caller(clean_registry) -> None:
    with pytest.warns(UserWarning, match="replacing the adapter registered for 'resnet'") as rec:
        register_adapter("resnet")(One)
    assert rec[0].filename == __file__


def test_unknown_family_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'no_such_family'"):
        adapter_for("no_such_family")
    assert isinstance(adapter_for("resnet"), TimmAdapter)


def test_register_rejects_other_targets() -> None:
    with pytest.raises(TypeError, match="model classes or family names"):
        register_adapter(3)
    with pytest.raises(TypeError, match="at least one"):
        register_adapter()


def test_wrappers_are_stripped() -> None:
    model = timm.create_model("cifar_resnet20", pretrained=False)
    plain = get_adapter(model).units(model)
    assert isinstance(get_adapter(nn.DataParallel(model)), CifarAdapter)
    assert isinstance(get_adapter(torch.compile(model)), CifarAdapter)
    assert family_of(torch.compile(model)) == "cifar"
    # GraftOptimizer unwraps both host and peers: units are named without prefixes.
    peer = timm.create_model("cifar_resnet20", pretrained=False)
    opt = GraftOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), [torch.compile(peer)], every=1, model=model
    )
    assert opt.adapter.units(opt.model) == plain


def test_channels_last_changes_nothing_and_grafts() -> None:
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", pretrained=False)
    peer = timm.create_model("cifar_resnet20", pretrained=False).to(
        memory_format=torch.channels_last
    )
    units = get_adapter(model).units(model)
    model = model.to(memory_format=torch.channels_last)
    assert get_adapter(model).units(model) == units
    before = model.conv1.weight.detach().clone()
    opt = GraftOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), [peer], every=1)
    opt.step()
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(model.conv1.weight, before)


def test_tracing_leaves_the_model_untouched() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = dict(vars(model))
    TimmAdapter().units(model)
    assert vars(model).keys() == attrs.keys()
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, state[k])


def test_untraceable_models_pair_by_registration_order() -> None:
    class Branchy(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = x * 2
            return super().forward(x)

    units, traced = TimmAdapter().build(Branchy())
    assert not traced
    assert "bn.weight" in units[0].members
    check_units(Branchy(), units)


def test_check_units_names_the_problem() -> None:
    model = Net()
    with pytest.raises(ValueError, match=r"'conv\.nope'"):
        check_units(model, [Unit("conv", ("conv.weight",), ("conv.weight", "conv.nope"))])
    twice = [
        Unit("a", ("conv.weight",), ("conv.weight",)),
        Unit("b", ("bn.weight",), ("conv.weight", "bn.weight")),
    ]
    with pytest.raises(ValueError, match=r"'conv\.weight' is in units 'a' and 'b'"):
        check_units(model, twice)
    with pytest.raises(ValueError, match="disagree on filters"):
        check_units(model, [Unit("c", ("conv.weight", "fc.weight"), ("conv.weight", "fc.weight"))])


def test_measure_reports_a_cifar_model() -> None:
    row = measure("cifar_resnet32")
    assert row.aligned and row.traced, row.error
    assert (row.family, row.kind, row.adapter) == ("cifar", "conv", "CifarAdapter")
    assert row.units == 32 and row.in_units == 1.0


def test_coverage_command_writes_csv(tmp_path, capsys) -> None:
    out = tmp_path / "cov.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--filter", "cifar_resnet2*", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["model"] for r in rows] == ["cifar_resnet20"]
    assert rows[0]["aligned"] == "True"
    assert "1 models, 1 aligned, 0 failed" in capsys.readouterr().out


def test_frozen_tensors_are_never_members() -> None:
    model = timm.create_model("cifar_resnet20", pretrained=False)
    members = {n for u in get_adapter(model).units(model) for n in u.members}
    table = tensor_table(model)
    assert not any(n.endswith("num_batches_tracked") for n in members)
    assert {n for n, t in table.items() if t.is_floating_point()} == members


def test_generic_adapter_names_what_no_unit_covers() -> None:
    """Recurrent and attention weights are in no unit: the wrapper says so, with the share."""

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.rnn = nn.LSTM(8, 8)
            self.head = nn.Linear(8, 3)

    class Attender(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2)
            self.scale = nn.Parameter(torch.ones(8))

    host = Tagger()
    with pytest.warns(RuntimeWarning, match=r"97 % of its parameters \(embed\.weight, rnn\."):
        opt = graftopt.GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [Tagger()])
    assert [u.name for u in opt.units] == ["head"]
    host = Attender()
    with pytest.warns(RuntimeWarning, match=r"of Attender: 77 % .*\(attn\.in_proj_weight, "):
        graftopt.GraftOptimizer(torch.optim.SGD(host.parameters(), lr=0.1), [Attender()])
