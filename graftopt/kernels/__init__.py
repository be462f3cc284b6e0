"""Fast paths of the round's tensor math: C kernels for CPU, Triton kernels for CUDA.

Each module says when it applies; :mod:`graftopt.functional` picks one and falls back to pure
torch otherwise.
"""

from __future__ import annotations

__all__ = ["status"]


def status() -> dict[str, str]:
    """Which fast path each device's rounds take, and why: ``{"cpu": ..., "cuda": ...}``."""
    from . import cpu, triton

    return {"cpu": cpu.status(), "cuda": triton.status()}
