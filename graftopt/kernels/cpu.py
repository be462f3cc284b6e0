"""CPU kernels for the round: a segmented histogram and a multi-tensor mix, in C via ctypes.

The C source is compiled on first use with the system C compiler (``cc -O3 -fopenmp``) into a
cache directory (``$GRAFTOPT_CACHE`` or ``~/.cache/graftopt``) and loaded with :mod:`ctypes`, so
no torch headers and no build step at install time are needed. Where no compiler is found or
``GRAFTOPT_NO_CKERNEL=1`` is set, :func:`library` returns ``None`` and callers use pure torch.

The kernels link the process's OpenMP runtime (the one torch already loaded) and run on
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ._cpu_src import SOURCE

__all__ = [
    "DTYPES",
    "Histogram",
    "Mix",
    "available",
    "library",
    "mix_into",
    "segment_histogram",
]

# dtype codes shared with the C source.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}
_P = ctypes.c_void_p
_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]


def _cache_dir() -> Path:
    root = os.environ.get("GRAFTOPT_CACHE") or Path.home() / ".cache" / "graftopt"
    return Path(root)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (or are switched off)."""
    if os.environ.get("GRAFTOPT_NO_CKERNEL", "") not in ("", "0"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256((SOURCE + " ".join(_FLAGS) + cc).encode()).hexdigest()[:16]
    target = _cache_dir() / f"graftopt_cpu_{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / "graft.c"
                src.write_text(SOURCE)
                out = Path(tmp) / target.name
                subprocess.run(
                    [cc, *_FLAGS, str(src), "-o", str(out), "-lm"], check=True, capture_output=True
                )
                os.replace(out, target)  # atomic: concurrent builders never see a partial file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError):
        return None
    lib.graft_segment_hist.restype = ctypes.c_int
    lib.graft_segment_hist.argtypes = [
        ctypes.c_int64,
        _P,
        _P,
        _P,
        _P,
        ctypes.c_int32,
        _P,
        _P,
        ctypes.c_int32,
    ]
    lib.graft_mix.restype = ctypes.c_int
    lib.graft_mix.argtypes = [
        ctypes.c_int64,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_int32,
        _P,
        ctypes.c_int32,
    ]
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
