"""Which adapter serves a model: a registry keyed by model class or timm family."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from .base import Adapter, unwrap
from .generic import GenericAdapter
from .timm_adapter import TimmAdapter

__all__ = ["adapter_for", "family_of", "get_adapter", "list_adapters", "register_adapter"]

A = TypeVar("A", bound=type[Adapter])

_BY_CLASS: dict[type, Adapter] = {}
_BY_FAMILY: dict[str, Adapter] = {}
_GENERIC = GenericAdapter()
# A timm family nobody registered still has timm's structure: the data-flow adapter fits it.
_TIMM_DEFAULT = TimmAdapter()
_MODEL_PACKAGES = ("timm.models.", "graftopt.models.")


def register_adapter(*targets: type | str) -> Callable[[A], A]:
    """Class decorator registering an adapter for model classes and/or timm families.

    Args:
        targets: ``nn.Module`` subclasses (each matches itself and its subclasses) or names
            of timm families: the module a timm model is registered in (``"resnet"`` for
            ``timm.models.resnet``, ``"deit"`` for the DeiT variants). One adapter instance,
            built with no arguments, serves all of them.

    Example::

        @register_adapter(MyNet)
        class MyNetAdapter(Adapter):
            def units(self, model): ...
    """
    if not targets:
        raise TypeError("register_adapter() needs at least one model class or family name")
    for target in targets:
        if not isinstance(target, (type, str)):
            raise TypeError(
                f"register_adapter() takes model classes or family names, got {target!r}"
            )

    def decorator(cls: A) -> A:
        adapter = cls()
        for target in targets:
            table = _BY_CLASS if isinstance(target, type) else _BY_FAMILY
            if target in table:
                warnings.warn(
                    f"replacing the adapter registered for {target!r} "
                    f"({type(table[target]).__name__}) with {cls.__name__}",
                    stacklevel=2,
                )
            table[target] = adapter
        return cls

    return decorator


def _timm_family(architecture: str) -> str | None:
    registry = sys.modules.get("timm.models._registry")
    table = getattr(registry, "_model_to_module", None)
    return table.get(architecture) if isinstance(table, dict) else None


def family_of(model: nn.Module) -> str | None:
    """The timm family of a model, or None for a model timm did not build.

    The family is the module the model's architecture is registered in, read from its
    ``pretrained_cfg`` (so DeiT models, built from ViT's class, are ``"deit"``); failing that,
    the module its class lives in under ``timm.models`` or ``graftopt.models``.
    """
    model = unwrap(model)
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if isinstance(arch, str):
        family = _timm_family(arch)
        if family is not None:
            return family
    module = type(model).__module__
    for prefix in _MODEL_PACKAGES:
        if module.startswith(prefix):
            return module[len(prefix) :].split(".")[0]
    return None


def adapter_for(family: str) -> Adapter:
    """The adapter registered for a timm family; a ValueError naming it when there is none."""
    if family not in _BY_FAMILY:
        raise ValueError(
            f"no adapter registered for family {family!r}; registered: {sorted(_BY_FAMILY)}"
        )
    return _BY_FAMILY[family]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``.

    In this order: the adapter registered for its class (or a base class), for its timm
    family, the data-flow :class:`TimmAdapter` for any other timm model, else the
    :class:`GenericAdapter`.
    """
    model = unwrap(model)
    for cls in type(model).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    family = family_of(model)
    if family is None:
        return _GENERIC
    return _BY_FAMILY.get(family, _TIMM_DEFAULT)


def list_adapters() -> dict[str, str]:
    """Every registered key (qualified class name or family) with its adapter's class name."""
    out = {f"{k.__module__}.{k.__qualname__}": type(v).__name__ for k, v in _BY_CLASS.items()}
    out.update({k: type(v).__name__ for k, v in sorted(_BY_FAMILY.items())})
    return out
