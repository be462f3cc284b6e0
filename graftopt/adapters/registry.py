"""Which adapter serves a model: a registry keyed by model class or timm family."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from .base import Adapter, unwrap
from .generic import GenericAdapter

__all__ = ["family_of", "get_adapter", "list_adapters", "register_adapter"]

A = TypeVar("A", bound=type[Adapter])

_BY_CLASS: dict[type, Adapter] = {}
_BY_FAMILY: dict[str, Adapter] = {}
_GENERIC = GenericAdapter()


def register_adapter(target: type | str) -> Callable[[A], A]:
    """Class decorator registering an adapter for a model class or a timm family.

    Args:
        target: an ``nn.Module`` subclass (matches it and its subclasses) or the name of a
            timm family, the module a timm model class lives in (``"resnet"`` for
            ``timm.models.resnet``).

    Example::

        @register_adapter(MyNet)
        class MyNetAdapter(Adapter):
            def units(self, model): ...
    """
    if not isinstance(target, (type, str)):
        raise TypeError(f"register_adapter() takes a model class or a family name, got {target!r}")

    def decorator(cls: A) -> A:
        table = _BY_CLASS if isinstance(target, type) else _BY_FAMILY
        if target in table:
            warnings.warn(f"replacing the adapter registered for {target!r}", stacklevel=2)
        table[target] = cls()
        return cls

    return decorator


def family_of(model: nn.Module) -> str | None:
    """The timm family of a model (its class's module under ``timm.models``), or None."""
    module = type(model).__module__
    for prefix in ("timm.models.", "graftopt.models."):
        if module.startswith(prefix):
            return module[len(prefix) :].split(".")[0]
    return None


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``: its class's, else its timm family's, else the generic one."""
    model = unwrap(model)
    for cls in type(model).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    family = family_of(model)
    if family is not None and family in _BY_FAMILY:
        return _BY_FAMILY[family]
    return _GENERIC


def list_adapters() -> dict[str, str]:
    """Every registered key (class name or family) with its adapter's class name."""
    out = {f"{k.__module__}.{k.__qualname__}": type(v).__name__ for k, v in _BY_CLASS.items()}
    out.update({k: type(v).__name__ for k, v in _BY_FAMILY.items()})
    return out
