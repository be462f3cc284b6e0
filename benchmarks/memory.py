"""Extra memory of graft rounds on CPU: the process's peak RSS around the first and later rounds.

Run: ``python3 benchmarks/memory.py resnet50 mobilenetv2_100 --peers 2``. Each model runs in a
fresh process, so the peak before the first round is the models' own footprint.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(name: str, k: int, level: str) -> dict[str, float | int | str]:
    import timm

    import graftopt

    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(timm.create_model(name, pretrained=False).eval())
    opts = graftopt.ring(
        models,
        [torch.optim.SGD(m.parameters(), lr=0.0) for m in models],
        every=1,
        level=level,
        same_init=False,
    )
    tables = [graftopt.adapters.base.tensor_table(m) for m in models]
    names = [n for u in opts[0].units for n in u.members]
    unit_mb = sum(tables[0][n].numel() * tables[0][n].element_size() for n in names) / 2**20
    base = _peak_mb()
    with torch.no_grad():
        for o in opts:
            o.step()
        first = _peak_mb()
        for _ in range(3):
            for o in opts:
                o.step()
    later = _peak_mb()
    return {
        "model": name,
        "k": k,
        "level": level,
        "unit_tensors_mb_per_model": round(unit_mb, 1),
        "first_round_peak_increase_mb": round(first - base, 1),
        "later_rounds_peak_increase_mb": round(later - first, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--peers", type=int, default=2, help="models in the ring")
    parser.add_argument("--level", default="layer", choices=["layer", "filter"])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.models[0], args.peers, args.level)))
        return
    print(
        "| model | k | level | unit tensors per model (MB) | first round: peak RSS increase (MB) "
        "| 3 later rounds: further increase (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.models:
        cmd = [
            sys.executable,
            __file__,
            name,
            "--peers",
            str(args.peers),
            "--level",
            args.level,
            "--one",
        ]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
