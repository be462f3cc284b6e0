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

__all__ = ["DTYPES", "available", "library", "mix_into", "segment_histogram"]

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
    lib = library()
    if lib is None:
        raise RuntimeError("the graftopt C kernels are not available")
    total = sum(rows)
    counts = torch.empty(total, bins, dtype=torch.int64)
    finite = torch.empty(total, dtype=torch.uint8)
    ptrs = _addresses(sources)
    nrows = torch.tensor(list(rows), dtype=torch.int64)
    row_len = torch.tensor(
        [t.numel() // r if r else 0 for t, r in zip(sources, rows, strict=True)], dtype=torch.int64
    )
    codes = torch.tensor([DTYPES[t.dtype] for t in sources], dtype=torch.int32)
    rc = lib.graft_segment_hist(
        len(sources), ptrs.data_ptr(), nrows.data_ptr(), row_len.data_ptr(), codes.data_ptr(),
        bins, counts.data_ptr(), finite.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"graft_segment_hist failed with code {rc}")
    return counts, finite.bool()


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
    lib = library()
    if lib is None:
        raise RuntimeError("the graftopt C kernels are not available")
    n, m = len(hosts), len(peers)
    alpha = alpha.detach().to(torch.float32).contiguous()
    finite = torch.empty(n, dtype=torch.uint8)
    keep = (
        _addresses(out), _addresses(hosts), _addresses([t for p in peers for t in p]),
        torch.tensor([t.numel() for t in hosts], dtype=torch.int64),
        torch.tensor(list(row_len), dtype=torch.int64),
        torch.tensor(list(offsets), dtype=torch.int64),
    )  # fmt: skip
    code = DTYPES[hosts[0].dtype] if n else 0
    rc = lib.graft_mix(
        n, *(k.data_ptr() for k in keep), alpha.data_ptr(), alpha.shape[1], m, code,
        finite.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"graft_mix failed with code {rc}")
    return finite.bool()
