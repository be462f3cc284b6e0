"""``import graftopt`` against ``import torch``, each in a fresh interpreter, side by side."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _import(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


@pytest.mark.parametrize("module", ["torch", "graftopt", "graftopt.train.loop"])
def test_import(benchmark, module: str) -> None:
    benchmark.pedantic(_import, args=(module,), rounds=3, iterations=1)
