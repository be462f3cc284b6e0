"""Every option of a graft round, written once: its default, its meaning, its rule.

:class:`GraftSettings` is the schema. :class:`~graftopt.GraftOptimizer`, :func:`~graftopt.ring`,
:func:`~graftopt.graft_`, ``graftopt train`` (its config fields, flags, choices and help) and
:mod:`graftopt.timm` take their defaults, choices and checks from it. Each field's
:class:`Option` (in the field's metadata) names the ``graftopt train`` setting that carries it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULTS",
    "LEVELS",
    "MAX_BINS",
    "ROUTES",
    "GraftSettings",
    "Option",
    "check",
    "criteria",
    "options",
]

MAX_BINS = 256  # the round kernels' histogram size (kernels/cpu.c MAXBINS)
LEVELS = ("layer", "filter")
ROUTES = ("auto", "c", "triton", "torch")  # auto: the fastest that runs here


def criteria() -> tuple[str, ...]:
    """The registered criteria (:mod:`graftopt.criteria`), read when a value is checked."""
    from .criteria import CRITERIA

    return tuple(CRITERIA)


_Names = tuple[str, ...] | Callable[[], tuple[str, ...]]


@dataclass(frozen=True)
class Option:
    """What the command line and the checks need to know about one setting.

    Attributes:
        help: one line for ``--help`` and the docs.
        flag: the ``graftopt train`` setting (``TrainConfig`` field) carrying it; ``None``:
            Python API only.
        rule: returns what is wrong with a value (``"must lie in [0, 1]"``), or ``None``.
        choices: the accepted values, for a setting that is one of a few names (or a function
            giving them, for a registry).
        api: whether :class:`~graftopt.GraftOptimizer` takes it as a keyword (the peer timeout
            belongs to the peer sources over torch.distributed).
    """

    help: str
    flag: str | None
    rule: Callable[[Any], str | None]
    choices: _Names | None = None
    api: bool = True

    def allowed(self) -> tuple[str, ...] | None:
        """The accepted values (``None``: any value its rule accepts)."""
        return self.choices() if callable(self.choices) else self.choices


def _int(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        if ok and (high is None or value <= high):
            return None
        return f"must be an integer in [{low}, {high}]" if high else f"must be an integer >= {low}"

    return rule


def _number(test: Callable[[float], bool], text: str) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) and test(value) else text

    return rule


def _one_of(
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]],
) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        names = choices() if callable(choices) else choices
        return None if value in names else f"must be one of {names}"

    return rule


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def _option(default: Any, help: str, flag: str | None, rule: Callable, **extra: Any) -> Any:
    choices = extra.get("choices")
    meta = Option(help, flag, rule if choices is None else _one_of(choices), **extra)
    return field(default=default, metadata={"option": meta})


@dataclass(frozen=True)
class GraftSettings:
    """The options of a graft round, validated on construction (``ValueError`` naming the first
    one that cannot work)."""

    # A round every 10 steps from one start: the recipe the accuracy study found to pay
    # (docs/accuracy.md); the paper's is once an epoch from independent starts.
    every: int = _option(10, "optimizer steps between graft rounds", "graft_every", _int(1))
    A: float = _option(
        0.4, "amplitude of the alpha curve (alpha in 0.5 +- A/2)", "graft_A",
        _number(lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    )  # fmt: skip
    # Finite: c = inf makes tied scores give alpha = inf * 0 = NaN.
    c: float = _option(
        500.0, "steepness of the alpha curve", "graft_c",
        _number(lambda v: v >= 0, "must be a finite number >= 0"),
    )  # fmt: skip
    bins: int = _option(10, "histogram bins of the entropy", "graft_bins", _int(2, MAX_BINS))
    level: str = _option(
        "layer", "one alpha per unit (layer) or per output filter (filter)", "graft_level",
        None, choices=LEVELS,
    )  # fmt: skip
    criterion: str = _option(
        "entropy", "what weighs the host against a peer (graftopt.criteria)", "graft_criterion",
        None, choices=criteria,
    )  # fmt: skip
    rate: float = _option(
        1.0, "each round moves a network this fraction of the way to its blend (1: the paper)",
        "graft_rate", _number(lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    )  # fmt: skip
    rate_by_lr: bool = _option(
        False, "scale the rate by the learning rate over its initial value (or max_lr)",
        "graft_rate_lr", _bool,
    )  # fmt: skip
    start: int = _option(0, "optimizer steps before the first round", "graft_start", _int(0))
    optimizer_state: str = _option(
        "keep", "the optimizer state (momentum) of grafted tensors after a round: keep (the "
        "paper) or reset", "graft_optimizer_state", None, choices=("keep", "reset"),
    )  # fmt: skip
    frozen: str = _option(
        "blend", "blend units whose weights do not require grad (the paper), or keep them out",
        None, None, choices=("blend", "keep"),
    )  # fmt: skip
    align: bool = _option(
        False, "match each peer's filters to the host's (weight matching) before every blend: "
        "for peers from different starts", "graft_align", _bool,
    )  # fmt: skip
    route: str = _option(
        "auto", "the kernels a round runs on (graftopt.kernels.route): auto (the fastest here), "
        "c, triton or torch", None, None, choices=ROUTES,
    )  # fmt: skip
    timeout: float = _option(
        300.0, "under torch.distributed: seconds a rank waits for its peers at a round before "
        "it fails with the peers that did not answer", "peer_timeout",
        _number(lambda v: v > 0, "must be a number of seconds > 0"), api=False,
    )  # fmt: skip

    def __post_init__(self) -> None:
        problem = check(dataclasses.asdict(self))
        if problem:
            raise ValueError(problem)

    def keywords(self) -> dict[str, Any]:
        """The settings as :class:`~graftopt.GraftOptimizer` keywords."""
        return {f.name: getattr(self, f.name) for f, o in options() if o.api}


def options() -> Iterator[tuple[dataclasses.Field, Option]]:
    """Each setting's field and :class:`Option`, in declaration order."""
    for f in dataclasses.fields(GraftSettings):
        yield f, f.metadata["option"]


def check(values: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with the first setting of ``values`` that cannot work (settings absent from
    ``values`` are not checked), or ``None``. The text names a setting by its keyword, or by its
    flag in ``flags`` (the command line's)."""

    def said(name: str, value: Any) -> str:
        return f"{name}={value!r}" if flags is None else f"{flags[name]} {value}"

    for f, option in options():
        if f.name in values:
            problem = option.rule(values[f.name])
            if problem:
                name = f.name if flags is None else flags[f.name]
                return f"{name} {problem}, got {values[f.name]!r}"
    name = values.get("criterion")
    if name is not None and values.get("level", "filter") != "filter":
        from .criteria import CRITERIA

        if CRITERIA[name].filter_level:
            return (
                f"{said('criterion', name)} weighs each filter on its own: use "
                f"{said('level', 'filter')}"
            )
    return None


DEFAULTS = GraftSettings()
