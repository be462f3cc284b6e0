"""The settings schema is the one source of the round options' defaults, choices and rules."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import graftopt
from graftopt.settings import DEFAULTS, GraftSettings, check, options
from graftopt.train.cli import build_parser
from graftopt.train.config import ROUND_FIELDS, TrainConfig

from .conftest import make_net


def _train_actions() -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"]  # type: ignore[attr-defined]
    return {a.dest: a for a in train._actions}


def test_every_default_passes_its_own_rule():
    for f, option in options():
        assert option.help, f.name
        assert option.rule(f.default) is None, f.name
    assert check(dataclasses.asdict(DEFAULTS)) is None


@pytest.mark.parametrize("fn", [graftopt.GraftOptimizer.__init__, graftopt.graft_])
def test_api_defaults_come_from_the_schema(fn):
    params = inspect.signature(fn).parameters
    for f, _ in options():
        if f.name in params:
            assert params[f.name].default == f.default, f.name
    if fn is graftopt.GraftOptimizer.__init__:
        assert {f.name for f, o in options() if o.api} <= set(params)
    assert inspect.signature(graftopt.ring).parameters["every"].default == DEFAULTS.every


def test_train_config_and_flags_come_from_the_schema():
    config, actions = TrainConfig(), _train_actions()
    for name, flag in ROUND_FIELDS.items():
        assert getattr(config, flag) == getattr(DEFAULTS, name), flag
        action = actions[flag]
        assert action.default == getattr(DEFAULTS, name), flag  # type: ignore[attr-defined]
        option = dict((f.name, o) for f, o in options())[name]
        assert action.choices == option.allowed(), flag  # type: ignore[attr-defined]
        assert option.help in (action.help or ""), flag  # type: ignore[attr-defined]
    assert config.round_settings() == {n: getattr(DEFAULTS, n) for n in ROUND_FIELDS}


@pytest.mark.parametrize(
    ("values", "api", "cli"),
    [
        ({"A": 1.5}, "A must lie in [0, 1], got 1.5", "--graft-A must lie in [0, 1], got 1.5"),
        ({"bins": 300}, "bins must be an integer in [2, 256]", "--graft-bins must be"),
        ({"every": 0}, "every must be an integer >= 1", "--graft-every must be an integer"),
        ({"rate": 0.0}, "rate must lie in (0, 1]", "--graft-rate must lie in (0, 1]"),
        ({"c": float("inf")}, "c must be a finite number", "--graft-c must be a finite"),
        ({"timeout": -1.0}, "timeout must be a number", "--peer-timeout must be a number"),
        (
            {"criterion": "bn", "level": "layer"},
            "criterion='bn' weighs each filter on its own: use level='filter'",
            "--graft-criterion bn weighs each filter on its own: use --graft-level filter",
        ),
    ],
)
def test_one_rule_two_wordings(values, api, cli):
    with pytest.raises(ValueError) as e:
        GraftSettings(**values)
    assert api in str(e.value)
    flagged = {**TrainConfig().to_dict(), **{ROUND_FIELDS[k]: v for k, v in values.items()}}
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict(flagged).validate()
    assert cli in str(e.value)


def test_types_are_checked():
    for bad in ({"every": True}, {"bins": 10.0}, {"align": 1}, {"rate_by_lr": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GraftSettings(**bad)


def test_keywords_feed_the_optimizer():
    host, peer = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    settings = GraftSettings(every=3, rate=0.5, optimizer_state="reset")
    opt = graftopt.GraftOptimizer(
        torch.optim.SGD(host.parameters(), lr=0.1), [peer], **settings.keywords()
    )
    assert opt.settings == dataclasses.replace(settings, timeout=DEFAULTS.timeout)
    assert (opt.every, opt.rate, opt.optimizer_state) == (3, 0.5, "reset")
    opt.close()


def test_a_new_criterion_is_one_registry_entry(monkeypatch):
    from graftopt import criteria

    def largest(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(values.float().abs(), "max", lengths=lengths)

    new = criteria.Criterion("max", "the largest |w|", row_score=largest)
    monkeypatch.setitem(criteria.CRITERIA, "max", new)  # what register() does, undone after
    with pytest.raises(ValueError, match="registered already"):
        criteria.register(new)
    assert "max" in _train_actions()["graft_criterion"].choices  # type: ignore[attr-defined]
    host, peer = make_net(0), make_net(1)
    with torch.no_grad():
        peer.fc.weight.mul_(10.0)  # the peer's largest weight wins the classifier
    record = graftopt.graft_(host, [peer], criterion="max")
    assert record.alphas[0, record.units.index("fc")] < 0.5
    with pytest.raises(ValueError, match="criterion must be one of"):
        GraftSettings(criterion="median")
