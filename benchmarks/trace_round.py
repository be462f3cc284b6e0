"""How much code one steady-state graft round runs through: graftopt modules, distinct
functions and call depth, traced with ``sys.setprofile`` over a ring of two CPU models.

    python benchmarks/trace_round.py [--route c|torch] [--list]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import graftopt

PACKAGE = str(Path(graftopt.__file__).resolve().parent)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def trace(route: str) -> tuple[dict[tuple[str, str], int], int]:
    """Distinct graftopt functions (module, name) of one steady-state round, with their call
    counts, and the deepest graftopt call chain."""
    torch.manual_seed(0)
    models = [_model(), _model()]
    inner = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    opts = graftopt.ring(models, inner, every=2, same_init=False, route=route)
    warnings.simplefilter("ignore")  # steps without gradients: the pair looks like copies
    for _ in range(5):  # two rounds first: every cache and kernel is built
        for o in opts:
            o.step()
    opts[0].step()  # step 6 of model 0: round 3 waits for model 1
    seen: dict[tuple[str, str], int] = {}
    depth = [0, 0]

    def profile(frame, event, _arg) -> None:
        path = frame.f_code.co_filename
        if not path.startswith(PACKAGE):
            return
        if event == "call":
            module = str(Path(path).relative_to(Path(PACKAGE).parent).with_suffix(""))
            key = (module.replace("/", "."), frame.f_code.co_qualname)
            seen[key] = seen.get(key, 0) + 1
            depth[0] += 1
            depth[1] = max(depth)
        elif event == "return":
            depth[0] -= 1

    sys.setprofile(profile)
    try:
        opts[1].step()  # the group's round
    finally:
        sys.setprofile(None)
    assert opts[1].rounds == 3
    return seen, depth[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--route", default="auto", choices=("auto", "c", "torch"))
    p.add_argument("--list", action="store_true", help="list the functions")
    args = p.parse_args(argv)
    seen, depth = trace(args.route)
    modules = sorted({m for m, _ in seen})
    named = [k for k in seen if "<" not in k[1]]  # comprehensions and lambdas left out
    print(
        f"one ring round (route {graftopt.kernels.route('cpu', args.route)}): "
        f"{len(modules)} graftopt modules, {len(seen)} distinct functions ({len(named)} named, "
        f"without comprehensions and lambdas), call depth {depth}"
    )
    print("modules: " + ", ".join(modules))
    if args.list:
        for (module, name), calls in sorted(seen.items()):
            print(f"  {module}.{name}  x{calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
