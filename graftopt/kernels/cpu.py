"""CPU kernels for the round: a segmented histogram and a multi-tensor mix, in C via ctypes.

The C source (``cpu.c`` beside this file, shipped as package data) is compiled on first use with
the system C compiler (``cc -O3 -fopenmp``) into a private cache directory (``$GRAFTOPT_CACHE``
or ``$XDG_CACHE_HOME/graftopt``, by default ``~/.cache/graftopt``), one file per source, flags,
compiler and machine, under a file lock, and loaded with :mod:`ctypes`. Only a library this
installation built is loaded: the folder must belong to the user and be writable by nobody
else, and the library's SHA-256, recorded at build time in a file beside it, must match. No
torch headers and no build step at install time are needed
(``python -m graftopt.kernels build`` builds ahead of time). Where it cannot be built, or
``GRAFTOPT_NO_CKERNEL=1`` is set, :func:`library` returns ``None``, callers use pure torch, and
:func:`status` says why; a build that fails warns once.

The kernels link the process's OpenMP runtime (the one torch already loaded) and run on
``torch.get_num_threads()`` threads. On x86-64 CPUs with AVX-512 the histogram takes a
vectorized path chosen at run time (one multiply and one exact edge lookup per value instead of
one compare per bin edge); ``GRAFTOPT_CKERNEL_PORTABLE=1`` builds without it. Both give
``torch.histc``'s counts exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

SOURCE_FILE = Path(__file__).with_name("cpu.c")

__all__ = [
    "DTYPES",
    "Finite",
    "GroupMix",
    "Histogram",
    "Mix",
    "available",
    "finite",
    "library",
    "mix_into",
    "segment_histogram",
    "status",
]

# dtype codes shared with the C source.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}
_P = ctypes.c_void_p
_I64, _I32 = ctypes.c_int64, ctypes.c_int32
# Argument types of the C functions, in the order of their C signatures in cpu.c.
_SIGNATURES = {
    "graft_segment_hist": [_I64, _P, _P, _P, _P, _I32, _P, _P, _I32],
    "graft_mix": [_I64, *[_P] * 7, _I64, _I32, _I32, _P, _I32],
    "graft_group_mix": [_I64, _P, _P, _I64, *[_P] * 7, _P, _I64, _P, _I32, _I32],
    "graft_finite": [_I64, _P, _P, _P, _P, _I32],
}
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]


def _cache_dir() -> Path:
    root = os.environ.get("GRAFTOPT_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "graftopt"
    return Path(root)


class _Untrusted(Exception):
    """A cache folder or library that graftopt will not load code from."""


def _check_private(path: Path) -> None:
    """Refuse a file or folder that another user owns or that others may write to."""
    if os.name != "posix":
        return
    st = path.stat()
    if st.st_uid != os.getuid():
        raise _Untrusted(f"{path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o022:
        raise _Untrusted(
            f"{path} can be written by others (mode {oct(st.st_mode & 0o777)}): chmod go-w it, "
            "or set GRAFTOPT_CACHE to a folder only you can write"
        )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path) -> bool:
    """Whether ``target`` is the library graftopt built: False when it or its digest is
    missing (build it); raises :class:`_Untrusted` when it differs from what was built."""
    record = target.with_suffix(".sha256")
    if not target.exists() or not record.exists():
        return False
    for p in (target, record):
        _check_private(p)
    if _digest(target) != record.read_text().strip():
        raise _Untrusted(
            f"{target} differs from the library graftopt built there (SHA-256 mismatch): "
            "delete it to rebuild"
        )
    return True


def _on(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")


# Why the last call of library() gave what it gave.
_STATUS = "not built yet"


def status() -> str:
    """Which CPU path rounds take and why: ``"built"``, ``"switched off ..."``,
    ``"no compiler ..."``, ``"compile failed: <stderr>"`` or ``"cache not writable ..."``."""
    library()
    return _STATUS


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` where the platform has one (ranks build once)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the file whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unavailable(reason: str, hint: str) -> None:
    global _STATUS
    _STATUS = reason
    warnings.warn(
        f"graftopt's C kernels are unavailable ({reason}); graft rounds on CPU use pure torch, "
        f"which is several times slower. {hint}",
        RuntimeWarning,
        stacklevel=3,
    )


def _build_plan() -> tuple[list[str], list[str], Path]:
    """The compiler command words, the flags, and the library's path in the cache: one file
    per source, flags, compiler and machine."""
    # CC may carry arguments ("ccache gcc", "gcc -std=gnu11"), as make reads it.
    cc_words = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or "gcc"]
    # GRAFTOPT_CKERNEL_PORTABLE=1 builds without the AVX-512 paths (what other CPUs run).
    flags = _FLAGS + (["-DGRAFT_PORTABLE_ONLY"] if _on("GRAFTOPT_CKERNEL_PORTABLE") else [])
    source = SOURCE_FILE.read_text()
    ident = "\0".join(
        [source, " ".join(flags), " ".join(cc_words), platform.machine(), platform.system()]
    )
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cc_words, flags, _cache_dir() / f"graftopt_cpu_{key}.so"


def needs_build() -> bool:
    """Whether the next :func:`library` call compiles (seconds): switched on, not loaded yet,
    and not in the cache."""
    if _on("GRAFTOPT_NO_CKERNEL") or library.cache_info().currsize:
        return False
    _, _, target = _build_plan()
    return not (target.exists() and target.with_suffix(".sha256").exists())


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (or are switched off).

    The first failure warns once (:func:`status` keeps the reason); ``library.cache_clear()``
    tries again.
    """
    global _STATUS
    if _on("GRAFTOPT_NO_CKERNEL"):
        _STATUS = "switched off (GRAFTOPT_NO_CKERNEL=1)"
        return None
    cc_words, flags, target = _build_plan()
    if shutil.which(cc_words[0]) is None:
        _unavailable(
            f"no compiler: {cc_words[0]} not found",
            "Install a C compiler with OpenMP (gcc), or set CC; GRAFTOPT_NO_CKERNEL=1 silences "
            "this.",
        )
        return None
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(target.parent)
        with _locked(target.with_suffix(".lock")):
            if not _verified(target):
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    out = Path(tmp) / target.name
                    cmd = [*cc_words, *flags, str(SOURCE_FILE), "-o", str(out), "-lm"]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
                        _unavailable(
                            f"compile failed: {tail}",
                            f"The command was: {' '.join(cmd)}.",
                        )
                        return None
                    record = Path(tmp) / "digest"
                    record.write_text(_digest(out) + "\n")
                    # The digest last: a reader never finds one that does not match.
                    os.replace(out, target)  # atomic: readers never see a partial file
                    os.replace(record, target.with_suffix(".sha256"))
            _verified(target)
    except _Untrusted as e:
        _unavailable(f"refused to load: {e}", "")
        return None
    except OSError as e:
        _unavailable(
            f"cache not writable: {e}",
            "Set GRAFTOPT_CACHE to a writable folder.",
        )
        return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        _unavailable(f"could not load {target}: {e}", "Delete the file to rebuild it.")
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = args
    _STATUS = "built"
    return lib


def available() -> bool:
    """Whether the C kernels are built and loadable."""
    return library() is not None


def _addresses(tensors: Sequence[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps with dim 0 outermost, so that slice ``j``
    of dim 0 is one contiguous block (contiguous and channels_last tensors)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


class Histogram:
    """:func:`segment_histogram`'s argument arrays, built once for sources of one layout.

    Run it again while the sources keep their layout and data pointers; a source replaced by a
    new tensor of the same layout (a fresh copy each round) is swapped in with :meth:`point`.
    """

    def __init__(self, sources: Sequence[Tensor], rows: Sequence[int]) -> None:
        self.count = len(sources)
        self.total = sum(rows)
        self.ptrs = _addresses(sources)
        self.nrows = torch.tensor(list(rows), dtype=torch.int64)
        self.row_len = torch.tensor(
            [t.numel() // r if r else 0 for t, r in zip(sources, rows, strict=True)],
            dtype=torch.int64,
        )
        self.codes = torch.tensor([DTYPES[t.dtype] for t in sources], dtype=torch.int32)

    def point(self, k: int, source: Tensor) -> None:
        """Read source ``k`` from ``source`` (of the layout it was built with) from now on."""
        self.ptrs[k] = source.data_ptr()

    def run(self, bins: int) -> tuple[Tensor, Tensor]:
        """``counts`` and ``finite`` as :func:`segment_histogram` returns them."""
        lib = library()
        if lib is None:
            raise RuntimeError("the graftopt C kernels are not available")
        counts = torch.empty(self.total, bins, dtype=torch.int64)
        finite = torch.empty(self.total, dtype=torch.uint8)
        rc = lib.graft_segment_hist(
            self.count, self.ptrs.data_ptr(), self.nrows.data_ptr(), self.row_len.data_ptr(),
            self.codes.data_ptr(), bins, counts.data_ptr(), finite.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"graft_segment_hist failed with code {rc}")
        return counts, finite.bool()


def segment_histogram(
    sources: Sequence[Tensor], rows: Sequence[int], *, bins: int
) -> tuple[Tensor, Tensor]:
    """Per-row histograms of CPU tensors over each row's ``[min, max]``, all in one call.

    Args:
        sources: CPU tensors in :data:`DTYPES`, each :func:`dense`; the order of values
            inside a row does not change its histogram.
        rows: per source, how many equal rows (segments) it splits into along its memory.
        bins: number of bins.

    Returns:
        ``counts`` int64 ``(S, bins)`` and ``finite`` bool ``(S,)`` (no NaN or Inf in the row),
        with ``S = sum(rows)``.
    """
    if library() is None:
        raise RuntimeError("the graftopt C kernels are not available")
    return Histogram(sources, rows).run(bins)


class Mix:
    """:func:`mix_into`'s argument arrays, built once for tensors of one layout.

    Run it again while hosts and peers keep their layout and data pointers; new destinations
    are taken with :meth:`aim`.
    """

    def __init__(
        self,
        out: Sequence[Tensor],
        hosts: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        offsets: Sequence[int],
        row_len: Sequence[int],
    ) -> None:
        self.count, self.peers = len(hosts), len(peers)
        self.out = _addresses(out)
        self.hosts = _addresses(hosts)
        self.peer_ptrs = _addresses([t for p in peers for t in p])
        self.numel = torch.tensor([t.numel() for t in hosts], dtype=torch.int64)
        self.row_len = torch.tensor(list(row_len), dtype=torch.int64)
        self.offsets = torch.tensor(list(offsets), dtype=torch.int64)
        self.code = DTYPES[hosts[0].dtype] if hosts else 0

    def aim(self, out: Sequence[Tensor]) -> None:
        """Write into ``out`` (of the hosts' layout) from now on."""
        self.out = _addresses(out)

    def run(self, alpha: Tensor) -> Tensor:
        """The blend into the destinations; the finite flags as :func:`mix_into` returns them."""
        lib = library()
        if lib is None:
            raise RuntimeError("the graftopt C kernels are not available")
        alpha = alpha.detach().to(torch.float32).contiguous()
        finite = torch.empty(self.count, dtype=torch.uint8)
        arrays = (self.out, self.hosts, self.peer_ptrs, self.numel, self.row_len, self.offsets)
        rc = lib.graft_mix(
            self.count, *(k.data_ptr() for k in arrays), alpha.data_ptr(), alpha.shape[1],
            self.peers, self.code, finite.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"graft_mix failed with code {rc}")
        return finite.bool()


def mix_into(
    out: Sequence[Tensor],
    hosts: Sequence[Tensor],
    peers: Sequence[Sequence[Tensor]],
    alpha: Tensor,
    offsets: Sequence[int],
    row_len: Sequence[int],
) -> Tensor:
    """``out[t] = mean_j(a_j * hosts[t] + (1 - a_j) * peers[j][t])`` for same-layout CPU tensors.

    Args:
        out: destinations, of the hosts' dtype (float32 or float64, one dtype for all) and strides.
        hosts: the host tensors, :func:`dense`.
        peers: per peer, tensors of the hosts' dtype and strides.
        alpha: float32 ``(m, K)``; tensor ``t``'s row ``r`` against peer ``j`` uses
            ``alpha[j, offsets[t] + r]``.
        offsets: per tensor, its first column in ``alpha``.
        row_len: per tensor, elements per alpha row (0: one alpha for the whole tensor).

    Returns:
        bool ``(T,)``: per tensor, whether the host and every peer were finite.
    """
    if library() is None:
        raise RuntimeError("the graftopt C kernels are not available")
    return Mix(out, hosts, peers, offsets, row_len).run(alpha)


class Finite:
    """:func:`finite`'s argument arrays, built once for tensors of one layout (run it again while
    they keep their layout and data pointers)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.count = len(tensors)
        self.ptrs = _addresses(tensors)
        self.numel = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
        self.codes = torch.tensor([DTYPES[t.dtype] for t in tensors], dtype=torch.int32)

    def run(self) -> Tensor:
        """bool ``(T,)`` as :func:`finite` returns it."""
        lib = library()
        if lib is None:
            raise RuntimeError("the graftopt C kernels are not available")
        out = torch.empty(self.count, dtype=torch.uint8)
        if self.count:
            lib.graft_finite(
                self.count, self.ptrs.data_ptr(), self.numel.data_ptr(), self.codes.data_ptr(),
                out.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        return out.bool()


def finite(tensors: Sequence[Tensor]) -> Tensor:
    """bool ``(T,)``: per dense CPU tensor (dtype in :data:`DTYPES`), whether it holds no NaN or
    Inf."""
    return Finite(tensors).run()


class GroupMix:
    """Blends of several hosts written into the hosts' own tensors, reading pre-round values.

    Job ``i`` blends ``live[i]`` with ``peers[i]`` using column ``columns[i]`` onward of table
    ``table_of[i]`` (passed to :meth:`run`), ``row_len[i]`` elements per alpha (0: one alpha).
    ``sets`` partitions the jobs: every tensor a job reads is either the live tensor of a job of
    its own set or memory that no job writes, and all jobs of a set have one numel. All tensors
    are dense, of one dtype (float32 or float64) and of their set's strides.
    """

    def __init__(
        self,
        live: Sequence[Tensor],
        peers: Sequence[Sequence[Tensor]],
        table_of: Sequence[int],
        columns: Sequence[int],
        row_len: Sequence[int],
        sets: Sequence[Sequence[int]],
    ) -> None:
        order = [i for s in sets for i in s]
        if sorted(order) != list(range(len(live))):
            raise ValueError("sets must partition the jobs")
        if any(not p for p in peers):
            raise ValueError("every job needs at least one peer")
        self.order = torch.tensor(order, dtype=torch.long)
        self.count = len(order)
        self.maxm = max((len(peers[i]) for i in order), default=1)
        self.live = _addresses([live[i] for i in order])
        rows = [[t.data_ptr() for t in peers[i]] for i in order]
        self.peer_ptrs = torch.tensor(
            [r + [0] * (self.maxm - len(r)) for r in rows], dtype=torch.int64
        ).reshape(-1)
        self.npeer = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        self.numel = torch.tensor([live[i].numel() for i in order], dtype=torch.int64)
        self.row_len = torch.tensor([row_len[i] for i in order], dtype=torch.int64)
        self.table_of = torch.tensor([table_of[i] for i in order], dtype=torch.int64)
        self.columns = torch.tensor([columns[i] for i in order], dtype=torch.int64)
        self.set_start = torch.tensor(
            [0, *itertools.accumulate(len(s) for s in sets)], dtype=torch.int64
        )
        self.code = DTYPES[live[0].dtype] if live else 0

    def run(self, tables: Sequence[Tensor], skip: Tensor) -> None:
        """Write every job's blend; jobs with ``skip[i]`` (bool, in job order) stay as they were.

        ``tables``: float32 ``(m_k, K_k)`` alpha tables, contiguous, indexed by ``table_of``.
        """
        lib = library()
        if lib is None:
            raise RuntimeError("the graftopt C kernels are not available")
        tables = [t.detach().to(torch.float32).contiguous() for t in tables]
        ptrs = _addresses(tables)
        strides = torch.tensor([t.shape[1] for t in tables], dtype=torch.int64)
        flags = skip.to(torch.uint8)[self.order].contiguous()
        rc = lib.graft_group_mix(
            self.count, self.live.data_ptr(), self.peer_ptrs.data_ptr(), self.maxm,
            self.npeer.data_ptr(), self.numel.data_ptr(), self.row_len.data_ptr(),
            ptrs.data_ptr(), self.table_of.data_ptr(), self.columns.data_ptr(),
            strides.data_ptr(), flags.data_ptr(), len(self.set_start) - 1,
            self.set_start.data_ptr(), self.code, torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"graft_group_mix failed with code {rc}")
