"""CUDA kernels for the round in Triton: a segmented histogram over a flat tensor.

Two launches cover every segment at once, whatever their number and sizes: the first takes
the min and max of each block of ``BLOCK`` values, the second bins each block with the bounds
of its segment (reduced in between by one ``scatter_reduce``). Bins use torch.histc's float32
arithmetic, with a correctly rounded division (``div_rn``) as torch's CUDA kernels use.

The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check them
without a GPU). :func:`available` is False when triton is not installed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: callers fall back to pure torch
    triton = None

__all__ = ["BLOCK", "available", "segment_histogram", "status"]

BLOCK = 1024


def available() -> bool:
    """Whether triton is importable."""
    return triton is not None


def status() -> str:
    """Which CUDA path rounds take: the Triton histogram, or torch's ops and why."""
    if triton is None:
        return "torch (triton is not installed)"
    if not torch.cuda.is_available():
        return "triton installed; no CUDA device here"
    return "triton"


if triton is not None:

    @triton.jit
    def _block_range(x_ptr, blk_start_ptr, blk_end_ptr, lo_ptr, hi_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        start = tl.load(blk_start_ptr + pid)
        end = tl.load(blk_end_ptr + pid)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(lo_ptr + pid, tl.min(tl.where(mask, x, float("inf")), axis=0))
        tl.store(hi_ptr + pid, tl.max(tl.where(mask, x, float("-inf")), axis=0))

    @triton.jit
    def _block_hist(
        x_ptr, blk_start_ptr, blk_end_ptr, blk_seg_ptr, lo_ptr, hi_ptr, counts_ptr,
        BINS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        start = tl.load(blk_start_ptr + pid)
        end = tl.load(blk_end_ptr + pid)
        seg = tl.load(blk_seg_ptr + pid)
        lo = tl.load(lo_ptr + seg)
        hi = tl.load(hi_ptr + seg)
        width = hi - lo
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        safe = tl.where(width > 0, width, 1.0)
        pos = tl.math.div_rn((x - lo) * BINS, safe)
        # Clamped before the cast (NaN to bin 0): a NaN or Inf value has no integer bin.
        pos = tl.where(pos >= 0.0, pos, 0.0)
        pos = tl.where(width > 0, pos, 0.0)
        pos = tl.where(pos < BINS, pos, BINS - 1.0)
        idx = pos.to(tl.int32)  # truncation, as torch's .long()
        for b in tl.static_range(BINS):
            n = tl.sum(((idx == b) & mask).to(tl.int32), axis=0)
            tl.atomic_add(counts_ptr + seg * BINS + b, n)


@functools.lru_cache(maxsize=64)
def _blocks(lengths: tuple[int, ...], device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block table of a segmentation (built once per layout: a host-to-device copy)."""
    starts, ends, segs = [], [], []
    offset = 0
    for s, n in enumerate(lengths):
        nb = max(1, math.ceil(n / BLOCK))
        for b in range(nb):
            starts.append(offset + b * BLOCK)
            ends.append(min(offset + (b + 1) * BLOCK, offset + n))
            segs.append(s)
        offset += n
    as_t = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    return as_t(starts), as_t(ends), as_t(segs), as_t(list(lengths))


def segment_histogram(values: Tensor, lengths: Sequence[int], *, bins: int) -> Tensor:
    """int32 ``(len(lengths), bins)`` counts of each contiguous segment of a flat tensor.

    A constant segment puts all its values in bin 0 (its entropy is 0 either way).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    x = values.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    n = len(lengths)
    starts, ends, segs, _ = _blocks(tuple(int(v) for v in lengths), str(x.device))
    nblk = starts.numel()
    blk_lo = torch.empty(nblk, dtype=torch.float32, device=x.device)
    blk_hi = torch.empty_like(blk_lo)
    _block_range[(nblk,)](x, starts, ends, blk_lo, blk_hi, BLOCK=BLOCK)
    lo = torch.full((n,), math.inf, device=x.device).scatter_reduce_(0, segs, blk_lo, "amin")
    hi = torch.full((n,), -math.inf, device=x.device).scatter_reduce_(0, segs, blk_hi, "amax")
    counts = torch.zeros(n * bins, dtype=torch.int32, device=x.device)
    _block_hist[(nblk,)](x, starts, ends, segs, lo, hi, counts, BINS=bins, BLOCK=BLOCK)
    return counts.view(n, bins)
