"""What an adapter tells the grafter: the units of a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.utils.parametrize
from torch import Tensor, nn

__all__ = ["Adapter", "TensorRefs", "Unit", "qualified", "tensor_table", "unwrap", "validate_units"]


@dataclass(frozen=True)
class Unit:
    """A group of tensors scored together and blended with one alpha (or one per filter).

    Names are qualified names in the unwrapped model's parameters and buffers.

    Args:
        name: the unit's name, usually the qualified name of its conv or linear module.
        scored: tensors whose values are scored; at filter level, filter ``j`` is slice ``j``
            of each along its axis.
        members: every tensor blended with this unit's alpha, the scored ones included.
        axes: per member, the axis that runs over the unit's filters, or ``None`` where the
            member has no per-filter structure (it then gets the mean of the filter alphas).
        gamma: the normalization scale that consumes the unit's output, for ``criterion="bn"``.
    """

    name: str
    scored: tuple[str, ...]
    members: tuple[str, ...]
    axes: tuple[int | None, ...] = field(default=())
    gamma: str | None = None

    def __post_init__(self) -> None:
        if not self.axes:
            object.__setattr__(self, "axes", (0,) * len(self.members))
        if len(self.axes) != len(self.members):
            raise ValueError(
                f"unit {self.name!r}: {len(self.members)} members but {len(self.axes)} axes"
            )
        missing = [s for s in self.scored if s not in self.members]
        if missing:
            raise ValueError(f"unit {self.name!r}: scored tensors {missing} are not members")

    def axis_of(self, member: str) -> int | None:
        return self.axes[self.members.index(member)]


class Adapter(ABC):
    """Decides which tensors of a model are scored and blended together.

    Subclasses implement :meth:`units`; it receives the unwrapped model (no DDP ``module.``
    or ``torch.compile`` ``_orig_mod.`` prefixes) and must return the same units, in the same
    order, for two instances of one architecture.
    """

    name: str = "adapter"

    @abstractmethod
    def units(self, model: nn.Module) -> list[Unit]:
        """The model's units, in a deterministic order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel/DataParallel, ``torch.compile`` and weight-average
    wrappers (``swa_utils.AveragedModel``, timm's ``ModelEma*``: their ``module`` is the
    averaged network)."""
    from torch.optim.swa_utils import AveragedModel

    while True:
        wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel, AveragedModel)
        ema = type(model).__name__.startswith("ModelEma")
        if isinstance(model, wrappers) or (ema and isinstance(model.module, nn.Module)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def tensor_table(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of a model by qualified name (tied ones under each name)."""
    table: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    table.update(model.named_buffers(remove_duplicate=False))
    return table


def qualified(module_name: str, tensor: str) -> str:
    """``module_name.tensor``, or ``tensor`` for the model itself (a bare ``nn.Linear``)."""
    return f"{module_name}.{tensor}" if module_name else tensor


def _why_missing(model: nn.Module, name: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        return f"the model has no submodule {prefix!r}"
    label = prefix or type(model).__name__
    if torch.nn.utils.parametrize.is_parametrized(module, leaf):
        return (
            f"layer {label!r} is parametrized (torch.nn.utils.parametrize: weight_norm, "
            f"spectral_norm, ...): its {leaf} is computed from other tensors at every forward, "
            "so a round cannot blend it; remove the parametrization "
            "(torch.nn.utils.parametrize.remove_parametrizations) or give an adapter without "
            "this layer"
        )
    if any(f"{leaf}{suffix}" in module._parameters for suffix in ("_g", "_v", "_orig")):
        return (
            f"layer {label!r} uses the old weight_norm / spectral_norm hooks: its {leaf} is "
            "recomputed from other tensors at every forward, so a round cannot blend it; "
            "remove them (torch.nn.utils.remove_weight_norm / remove_spectral_norm) or give an "
            "adapter without this layer"
        )
    return f"the model has no tensor {name!r}"


def nonempty(model: nn.Module, units: Sequence[Unit]) -> list[Unit]:
    """``units`` without those whose scored tensors hold no element (a layer with zero
    filters or zero inputs): there is nothing to score, and a round leaves them as they are."""
    table = tensor_table(model)
    return [u for u in units if any(table[n].numel() for n in u.scored)]


def validate_units(model: nn.Module, units: Sequence[Unit]) -> None:
    """Refuse, naming the layer and the reason, units a round could not blend: lazy layers not
    yet initialized, parametrized weights, missing tensors, and a tensor in two places (tied
    weights would be blended twice per round)."""
    lazy = [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if isinstance(p, torch.nn.parameter.UninitializedParameter)
    ]
    if lazy:
        raise ValueError(
            f"{type(model).__name__} has lazy layers not initialized yet ({lazy[:3]}): run one "
            "forward pass first, then wrap it"
        )
    table = tensor_table(model)
    first: dict[int, str] = {}
    for unit in units:
        for name in unit.members:
            t = table.get(name)
            if t is None:
                raise ValueError(f"cannot graft unit {unit.name!r}: {_why_missing(model, name)}")
            why = unreadable(t)
            if why:
                raise ValueError(f"cannot graft unit {unit.name!r}: {name} {why}")
            other = first.setdefault(id(t), name)
            if other != name:
                raise ValueError(
                    f"{other} and {name} are the same tensor (tied weights): a round would blend "
                    "it twice; untie them, or give an adapter whose units list it once"
                )


def unreadable(t: Tensor) -> str | None:
    """Why a round cannot read ``t`` (its kernels read dense, materialized, unsharded memory),
    or ``None``."""
    if t.is_meta:
        return (
            "is on the meta device (no values yet); materialize the model first "
            "(to_empty(device=...) and initialize, or load its weights), then wrap it"
        )
    if t.layout is not torch.strided:
        return f"has layout {t.layout} (sparse or nested); rounds read dense tensors"
    if hasattr(t, "to_local"):  # a DTensor
        return (
            "is a DTensor (FSDP2's fully_shard or tensor parallel): rounds read and write whole "
            "tensors, and sharded ones are not supported"
        )
    return None


# Submodule registrations anywhere in the process, counted so that located tensors are checked
# again only after the module tree may have changed.
_REGISTRATIONS = [0]
_WATCH: list = []


def _count(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    if not _WATCH:
        _WATCH.append(nn.modules.module.register_module_module_registration_hook(_count))


class TensorRefs:
    """Named tensors of a module, located once and read without walking the module tree.

    Each name is kept as (the owning module's parameter or buffer dict, key), so a read sees a
    tensor that ``model.to()`` or ``load_state_dict`` put in place of the old one. A submodule
    replaced after locating (model surgery) is detected at the next read, which raises.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        _watch_registrations()
        self._model = type(model).__name__
        self._slots: list[tuple[dict[str, Tensor | None], str]] = []
        edges: dict[int, tuple[dict, str, nn.Module, str]] = {}
        for name in names:
            prefix, _, leaf = name.rpartition(".")
            owner = model.get_submodule(prefix) if prefix else model
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            if table.get(leaf) is None:
                raise KeyError(f"{type(model).__name__} has no tensor {name!r}")
            self._slots.append((table, leaf))
            parent, path = model, []
            for part in prefix.split(".") if prefix else []:
                child = parent._modules[part]
                path.append(part)
                edges.setdefault(id(child), (parent._modules, part, child, ".".join(path)))
                parent = child
        self._edges = list(edges.values())
        self._registrations = _REGISTRATIONS[0]

    def get(self) -> list[Tensor]:
        """The tensors, in the order of the names."""
        self.check()
        return [table[key] for table, key in self._slots]  # type: ignore[misc]

    def check(self) -> None:
        """Raise a RuntimeError if a submodule on the way to the tensors was replaced."""
        if self._registrations != _REGISTRATIONS[0]:
            self._check()

    def _check(self) -> None:
        for modules, name, child, path in self._edges:
            if modules.get(name) is not child:
                raise RuntimeError(
                    f"{self._model}.{path} was replaced after grafting was set up for this "
                    "model: close() its GraftOptimizer and wrap the model again"
                )
        self._registrations = _REGISTRATIONS[0]
