"""The C kernels' build: status, loud fallbacks, and the torch path for several rounds."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import graftopt
from graftopt.kernels import cpu

from .conftest import make_net


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("GRAFTOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRAFTOPT_NO_CKERNEL", raising=False)
    cpu.library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu.library.cache_clear()


def test_switched_off_says_so_without_warning(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv("GRAFTOPT_NO_CKERNEL", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.library() is None
    assert cpu.status() == "switched off (GRAFTOPT_NO_CKERNEL=1)"
    assert graftopt.kernels.status()["cpu"] == cpu.status()


def test_missing_compiler_warns_once(fresh: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="no compiler") as caught:
        assert cpu.library() is None
        assert cpu.library() is None
    assert len(caught) == 1
    assert cpu.status().startswith("no compiler")


def test_failed_compile_reports_its_stderr(fresh: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cc = tmp_path / "bad-cc"
    cc.write_text("#!/bin/sh\necho 'cpu.c:1: error: this compiler is broken' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    fresh.setenv("CC", str(cc))
    with pytest.warns(RuntimeWarning, match="compile failed"):
        assert cpu.library() is None
    assert cpu.status() == "compile failed: cpu.c:1: error: this compiler is broken"


def test_unwritable_cache_is_reported(fresh: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    fresh.setenv("GRAFTOPT_CACHE", str(blocker / "cache"))  # a folder under a file
    with pytest.warns(RuntimeWarning, match="cache not writable"):
        assert cpu.library() is None
    assert cpu.status().startswith("cache not writable")


def test_build_command_builds_ahead_of_time(built: Path) -> None:
    """``python -m graftopt.kernels build`` (the ``built`` fixture runs it) leaves the library
    and its digest."""
    lib = next(built.glob("graftopt_cpu_*.so"))
    assert lib.with_suffix(".sha256").read_text().strip() == cpu._digest(lib)


def test_ring_of_three_runs_rounds_on_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several rounds without the C kernels equal the rounds with them (where they build)."""

    def run() -> list[dict[str, torch.Tensor]]:
        models = [make_net(s) for s in range(3)]
        opts = graftopt.ring(
            models, [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models],
            every=2,
        same_init=False,
    )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            for m, o in zip(models, opts, strict=True):
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                o.step()
        assert [o.rounds for o in opts] == [3, 3, 3]
        return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]

    monkeypatch.setenv("GRAFTOPT_NO_CKERNEL", "1")
    cpu.library.cache_clear()
    try:
        torch_path = run()
    finally:
        monkeypatch.delenv("GRAFTOPT_NO_CKERNEL")
        cpu.library.cache_clear()
    if not cpu.available():
        return
    c_path = run()
    for a, b in zip(torch_path, c_path, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding a library graftopt built, with its digest."""
    from .conftest import require_c

    require_c()
    cache = tmp_path_factory.mktemp("built") / "cache"
    env = {**os.environ, "GRAFTOPT_CACHE": str(cache)}
    env.pop("GRAFTOPT_NO_CKERNEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "graftopt.kernels", "build"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "cpu: built" in done.stdout, done.stderr
    return cache


def _copy_cache(built: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(built, to)
    to.chmod(0o700)
    return next(to.glob("graftopt_cpu_*.so"))


def test_a_library_that_differs_from_its_digest_is_never_loaded(
    fresh: pytest.MonkeyPatch, built: Path, tmp_path: Path
) -> None:
    lib = _copy_cache(built, tmp_path / "cache")
    lib.write_bytes(lib.read_bytes() + b"\0")  # what graftopt built, changed afterwards
    with pytest.warns(RuntimeWarning, match="SHA-256 mismatch"):
        assert cpu.library() is None
    assert cpu.status().startswith("refused to load")


def test_a_planted_library_without_digest_is_replaced_by_a_build(
    fresh: pytest.MonkeyPatch, built: Path, tmp_path: Path
) -> None:
    lib = _copy_cache(built, tmp_path / "cache")
    lib.with_suffix(".sha256").unlink()
    lib.write_bytes(b"planted: not a library graftopt built")
    assert cpu.library() is not None and cpu.status() == "built"
    assert lib.read_bytes() != b"planted: not a library graftopt built"


def test_a_cache_others_can_write_is_refused(
    fresh: pytest.MonkeyPatch, built: Path, tmp_path: Path
) -> None:
    _copy_cache(built, tmp_path / "cache")
    (tmp_path / "cache").chmod(0o777)
    with pytest.warns(RuntimeWarning, match="can be written by others"):
        assert cpu.library() is None
    assert cpu.status().startswith("refused to load")


def test_cc_with_arguments_is_a_compiler(fresh: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cc = tmp_path / "my-cc"
    cc.write_text('#!/bin/sh\necho "cc got $1" >&2\nexit 1\n')
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    fresh.setenv("CC", f"{cc} --wrapped")
    with pytest.warns(RuntimeWarning, match="compile failed"):
        assert cpu.library() is None
    assert cpu.status() == "compile failed: cc got --wrapped"


def test_needs_build_says_whether_a_compile_is_coming(
    fresh: pytest.MonkeyPatch, built: Path, tmp_path: Path
) -> None:
    assert cpu.needs_build()  # an empty cache
    _copy_cache(built, tmp_path / "cache")
    assert not cpu.needs_build()
    assert cpu.library() is not None and not cpu.needs_build()
    fresh.setenv("GRAFTOPT_NO_CKERNEL", "1")
    cpu.library.cache_clear()
    assert not cpu.needs_build()
