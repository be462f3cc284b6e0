"""Measure the exchange of one model's units: ``torchrun ... -m graftopt.distributed``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from graftopt import models as _models  # noqa: F401  (registers the CIFAR networks with timm)

from .groups import init_from_env


def main(argv: Sequence[str] | None = None) -> None:
    """Time the rounds of one model's exchange (random weights, no training)."""
    import timm  # the package's import registered the CIFAR networks with it

    from ..adapters import get_adapter
    from ..settings import GraftSettings

    parser = argparse.ArgumentParser(prog="python -m graftopt.distributed", description=__doc__)
    parser.add_argument("--model", default="cifar_resnet56", help="a timm model name")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--source", choices=("ring", "all"), default="ring")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (after one more)")
    parser.add_argument(
        "--all-reduce",
        action="store_true",
        help="also time the all-reduce of every gradient that DDP runs at each step",
    )
    args = parser.parse_args(argv)
    ctx = init_from_env()
    if ctx is None:
        parser.error("launch with torchrun --nproc-per-node K (K >= 2)")
    torch.manual_seed(ctx.peer)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(ctx.device)
    source = ctx.ring_peers() if args.source == "ring" else ctx.all_peers()
    adapter = get_adapter(model)
    units = adapter.units(model)
    source.bind(model, units, adapter)
    names = [n for u in units for n in u.members]
    for r in range(1, args.rounds + 2):
        source.begin_round(r, GraftSettings(), 1)
        source.fetch(names)
    if ctx.rank == 0:
        runs = list(source.stats)[1:]  # round 1 includes the handshake and connection set-up
        mb = runs[0].bytes_received / 1e6
        ex = sorted(s.exchange_s for s in runs)[len(runs) // 2]
        co = sorted(s.confirm_s for s in runs)[len(runs) // 2]
        print(
            f"{args.model} {args.source} K={ctx.num_peers} {dist.get_backend()}: "
            f"{mb:.2f} MB received per round, median exchange {ex * 1e3:.1f} ms "
            f"({mb / ex:.0f} MB/s), confirmation {co * 1e3:.2f} ms over {len(runs)} rounds"
        )
    if args.all_reduce:
        grads = torch.cat([p.detach().flatten() for p in model.parameters()])
        times = []
        for _ in range(args.rounds + 1):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(grads)
            times.append(time.perf_counter() - start)
        if ctx.rank == 0:
            mb = grads.numel() * grads.element_size() / 1e6
            ar = sorted(times[1:])[len(times[1:]) // 2]
            print(
                f"{args.model} all-reduce K={ctx.num_peers} {dist.get_backend()}: {mb:.2f} MB of "
                f"gradients, median {ar * 1e3:.1f} ms over {args.rounds} steps"
            )
    ctx.close()


if __name__ == "__main__":
    main()
