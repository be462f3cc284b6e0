"""Candidate CPU paths for the batched entropy of a model's weights, timed side by side.

Usage: ``python3 benchmarks/cpu_paths.py [model] [--compile]``. Prints the best of several
runs per path (ms) for one model's scored tensors (the conv/linear weights), layer level.
"""

from __future__ import annotations

import math
import sys
import time

import timm
import torch

import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)
from graftopt import functional as F
from graftopt.kernels import cpu


def best(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _bins(x: torch.Tensor, lengths: list[int], bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(lengths)
    sizes = torch.tensor(lengths)
    seg = torch.repeat_interleave(torch.arange(n), sizes, output_size=x.numel())
    lo = torch.full((n,), math.inf).scatter_reduce_(0, seg, x, "amin")
    hi = torch.full((n,), -math.inf).scatter_reduce_(0, seg, x, "amax")
    width = (hi - lo)[seg]
    idx = torch.where(width > 0, (x - lo[seg]) * bins / width, 0.0).long().clamp_(0, bins - 1)
    return seg, idx


def bincount(x, lengths, bins=10):
    seg, idx = _bins(x, lengths, bins)
    return torch.bincount(seg * bins + idx, minlength=len(lengths) * bins)


def sort_based(x, lengths, bins=10):
    seg, idx = _bins(x, lengths, bins)
    keys, _ = torch.sort(seg * bins + idx)
    edges = torch.arange(len(lengths) * bins + 1)
    return torch.diff(torch.searchsorted(keys, edges))


def histc_loop(ws, bins=10):
    return torch.stack([torch.histc(w.float(), bins) for w in ws])


def main() -> None:
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), "resnet50")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    ws = [p.detach() for p in model.parameters() if p.dim() > 1]
    lengths = [w.numel() for w in ws]
    x = torch.cat([w.reshape(-1) for w in ws])
    threads = torch.get_num_threads()
    print(f"{name}: {len(ws)} weight tensors, {x.numel() / 1e6:.1f}M values, {threads} threads")
    rows = {
        "floor: torch._foreach_lerp_ over the same tensors": lambda: torch._foreach_lerp_(
            ws, ws, 0.5
        ),
        "index_add (scatter min/max, segment ids)": lambda: F._segment_entropy_torch(
            x, lengths, 10
        ),
        "bincount (same bins)": lambda: bincount(x, lengths),
        "sort + searchsorted (same bins)": lambda: sort_based(x, lengths),
        "per-layer torch.histc loop": lambda: histc_loop(ws),
    }
    if cpu.available():
        rows["C kernel (graftopt.kernels.cpu), in place"] = lambda: F.entropies(ws)
    if "--compile" in sys.argv:
        compiled = torch.compile(F._segment_entropy_torch, dynamic=False)
        t0 = time.perf_counter()
        compiled(x, lengths, 10)
        print(f"torch.compile: first call (compile) {time.perf_counter() - t0:.1f} s")
        rows["torch.compile of the index_add path"] = lambda: compiled(x, lengths, 10)
    for label, fn in rows.items():
        print(f"{label:55s} {best(fn, 3 if 'sort' in label or 'index' in label else 7):9.1f} ms")


if __name__ == "__main__":
    main()
