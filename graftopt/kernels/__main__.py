"""``python -m graftopt.kernels build``: build the CPU kernels ahead of time; ``status``: say
which paths rounds take."""

from __future__ import annotations

import argparse
import sys

from . import status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graftopt.kernels", description=__doc__)
    p.add_argument("command", choices=("build", "status"))
    p.parse_args(argv)
    paths = status()
    for name, state in paths.items():
        print(f"{name}: {state}")
    return 0 if paths["cpu"] in ("built", "switched off (GRAFTOPT_NO_CKERNEL=1)") else 1


if __name__ == "__main__":
    sys.exit(main())
