"""Benchmarks run only when asked for: ``python3 -m pytest benchmarks --benchmark-enable``.

The repository's ``testpaths`` is ``tests``, so a bare ``python3 -m pytest`` never collects
these; ``--benchmark-disable`` (the project default) turns each into a single plain call.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.benchmark_suite)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", help="where the benchmarks' models live (cpu, cuda, cuda:1)"
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    d = torch.device(request.config.getoption("--device"))
    if d.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device here")
    return d


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "benchmark_suite: a timing benchmark (benchmarks/)")
