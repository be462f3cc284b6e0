"""Fast paths of the round's tensor math: C kernels for CPU, Triton kernels for CUDA.

:func:`route` is the one place that decides which path a round takes, from the device of its
tensors and an optional choice of the caller (``GraftOptimizer(route=...)``); every scoring,
mixing and probing call asks it.
"""

from __future__ import annotations

import os

import torch

from ..settings import ROUTES

__all__ = ["ROUTES", "route", "status"]


def status() -> dict[str, str]:
    """Which fast path each device's rounds take, and why: ``{"cpu": ..., "cuda": ...}``."""
    from . import cpu, triton

    return {"cpu": cpu.status(), "cuda": triton.status()}


def route(device: torch.device | str, choice: str = "auto") -> str:
    """The route (``"c"``, ``"triton"`` or ``"torch"``) of a round on tensors of ``device``.

    ``"auto"``: the environment's ``GRAFTOPT_ROUTE`` when set, else the C kernels for CPU tensors
    once built (``GRAFTOPT_NO_CKERNEL=1`` switches them off), Triton for CUDA tensors when
    installed, torch otherwise. A named route is checked:
    ``"c"`` needs CPU tensors and the built kernels, ``"triton"`` needs triton and CUDA tensors
    (or CPU tensors under ``TRITON_INTERPRET=1``, how the tests run it); ``"torch"`` runs
    everywhere. ``ValueError`` says why a named route cannot run.
    """
    kind = torch.device(device).type
    if choice == "auto":  # a process-wide choice, as the test jobs of each route make it
        choice = os.environ.get("GRAFTOPT_ROUTE") or "auto"
    if choice == "torch":
        return "torch"
    if choice in ("auto", "c") and kind == "cpu":
        from . import cpu

        if cpu.available():
            return "c"
        if choice == "c":
            raise ValueError(f"route='c' cannot run here: the C kernels are {cpu.status()}")
        return "torch"
    if choice in ("auto", "triton") and (
        kind == "cuda" or (choice == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
    ):
        from . import triton

        if triton.available():
            return "triton"
        if choice == "triton":
            raise ValueError("route='triton' cannot run here: triton is not installed")
        return "torch"
    if choice == "auto":
        return "torch"
    if choice not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {choice!r}")
    where = "CPU tensors" if choice == "c" else "CUDA tensors (or TRITON_INTERPRET=1)"
    raise ValueError(f"route={choice!r} runs {where}, not {kind} tensors")
