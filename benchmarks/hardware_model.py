"""When does grafting reach an accuracy before data parallel does? A wall-time model.

K workers either train K grafted networks (a ring round every ``every`` steps: each worker
sends and receives one copy of its model per round) or one network data-parallel (DDP: a ring
all-reduce of every gradient at every step, ``2 (K - 1) / K`` copies each way). Both take the
same steps at the same per-worker batch, so a worker's wall time to ``n`` steps is

    grafting:       n * t_step + (n / every) * S / B
    data parallel:  n * t_step + n * 2 (K - 1) / K * S / B      (no overlap with backward)
                    n * max(t_step, 2 (K - 1) / K * S / B)       (perfect overlap)

with ``S`` the model's bytes and ``B`` the link's bandwidth. The accuracies are the study's
(``benchmarks/accuracy_study.py``, configurations ``graft-10``/``graft-10-ema`` and ``dp``): the
grafted networks' last-epoch top-1, and the data-parallel network's top-1 epoch by epoch, from
which the first step that reaches the grafted accuracy is read (an upper bound for data
parallel: a schedule planned for fewer steps would get there sooner).

    OMP_NUM_THREADS=1 python3 benchmarks/hardware_model.py --k 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)
from graftopt.train.summary import read_csv

LINKS = {"10 Gb/s": 10e9 / 8, "1 Gb/s": 1e9 / 8, "100 Mb/s": 100e6 / 8}


def step_time(model: str, batch: int, size: int, chans: int, steps: int = 5) -> float:
    """Median seconds of one SGD training step on this machine."""
    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=10, in_chans=chans)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, chans, size, size), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def model_bytes(model: str, chans: int) -> int:
    net = timm.create_model(model, pretrained=False, num_classes=10, in_chans=chans)
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def curve(run: Path, kind: str) -> dict[int, float]:
    """Mean top-1 of the run's networks of ``kind``, by epoch."""
    rows = [r for r in read_csv(run / "metrics.csv") if r["kind"] == kind]
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        by_epoch.setdefault(int(r["epoch"]), []).append(float(r["top1"]))
    return {e: statistics.fmean(v) for e, v in by_epoch.items()}


def study_curves(study: Path, k: int) -> tuple[list[float], dict[int, float], int, int, int]:
    """The grafted last-epoch top-1 per seed, the mean data-parallel curve, its steps per
    epoch, and the grafted run's steps in all and per epoch."""
    grafted, dp = [], []
    for seed in range(10):
        for name in ("graft-10", "graft-10-ema"):
            run = study / f"{name}-k{k}-seed{seed}"
            if (run / "summary.json").is_file():
                c = curve(run, "grafted")
                grafted.append(c[max(c)])
                break
        run = study / f"dp-k{k}-seed{seed}"
        if (run / "summary.json").is_file():
            dp.append(curve(run, "peer"))
    if not grafted or not dp:
        raise SystemExit(f"{study} holds no finished graft-10 and dp runs at K = {k}")
    epochs = sorted(set.intersection(*(set(c) for c in dp)))
    mean_dp = {e: statistics.fmean(c[e] for c in dp) for e in epochs}
    dp_steps = 6000 // (128 * k)
    return grafted, mean_dp, dp_steps, 10 * (6000 // 128), 6000 // 128


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--study", default="output/accuracy_study/n6000-v5000-e10")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["cifar_resnet20:128:28:1", "resnet50:32:224:3"],
        help="model:batch:image size:channels whose step is timed here",
    )
    args = p.parse_args(argv)
    grafted, dp, dp_per_epoch, graft_steps, _ = study_curves(Path(args.study), args.k)
    target = statistics.fmean(grafted)
    reach = next((e for e in sorted(dp) if dp[e] >= target), None)
    final_epoch = max(dp)
    print(
        f"K = {args.k}: grafted last-epoch top-1 {target:.2f} (mean of {len(grafted)} seeds) "
        f"after {graft_steps} steps; data parallel {dp[final_epoch]:.2f} after "
        f"{final_epoch * dp_per_epoch} steps, first at or above {target:.2f} at "
        + (f"epoch {reach} ({reach * dp_per_epoch} steps)" if reach else "no epoch")
    )
    if reach is None:
        print("data parallel never reaches the grafted accuracy: grafting is first on any link")
        return 0
    # Data parallel needs a fraction f of the grafted run's steps. Per step, t computes and x
    # moves one model's bytes over the link (x = S / B). Grafting is first when
    #   N t + N g < f N (t + x)        (no overlap)  <=> x / t > (1 - f) / (f - g / x)
    #   N t + N g < f N max(t, x)      (overlap)     <=> x / t > 1 / (f - g / x)
    # with g = x / (factor * every) the ring round's share of a step.
    factor = 2 * (args.k - 1) / args.k  # a ring all-reduce moves this many copies each way
    f = reach * dp_per_epoch / graft_steps
    graft_share = 1 / (factor * args.every)  # a round moves one copy: x / factor per round
    lo = (1 - f) / (f - graft_share) if f > graft_share else math.inf
    hi = 1 / (f - graft_share) if f > graft_share else math.inf
    print(
        f"data parallel needs f = {f:.3f} of the grafted run's steps; grafting is first when "
        f"one step's all-reduce takes more than {lo:.3f} x the step's compute (no overlap) to "
        f"{hi:.3f} x (all-reduce hidden behind the backward pass)"
    )
    print(
        "\n| model | bytes | link | all-reduce per step | grafting first when a step computes "
        "in less than (overlap / no overlap) | step measured here (1 thread) | first here |"
        "\n|---|---|---|---|---|---|---|"
    )
    for spec in args.sizes:
        name, batch, size, chans = spec.split(":")
        size_b = model_bytes(name, int(chans))
        t = step_time(name, int(batch), int(size), int(chans))
        for link, bw in LINKS.items():
            x = factor * size_b / bw
            first = "grafting" if x / t > hi else "data parallel" if x / t < lo else "depends"
            print(
                f"| {name} | {size_b / 1e6:.1f} MB | {link} | {x * 1e3:.1f} ms "
                f"| {x / hi * 1e3:.1f} / {x / lo * 1e3:.1f} ms | {t * 1e3:.0f} ms (batch {batch}) "
                f"| {first} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
