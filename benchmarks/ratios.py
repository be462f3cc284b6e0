"""Print the ratio table of a saved pytest-benchmark JSON.

Usage: ``python3 benchmarks/ratios.py results.json``. Ratios use each case's minimum time
(the least disturbed by other load on the machine).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = dict(b["extra_info"])
        impl = info.pop("impl", b["name"])
        # Cases of one group that differ in more than the implementation get their own row.
        extra = {k: v for k, v in info.items() if k in ("layers", "peers")}
        label = b["group"] + "".join(f", {k}={v}" for k, v in extra.items())
        groups[label][impl] = b["stats"]["min"] * 1e3
    machine = data.get("machine_info", {})
    devices = sorted({b["extra_info"].get("device", "cpu") for b in data["benchmarks"]})
    lines = [
        f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, torch threads as configured; "
        f"device: {', '.join(devices)}",
        "",
    ]
    lines += [
        "| case | reference ms | graftopt ms | floor ms | ref/graftopt | graftopt/floor |",
        "|---|---|---|---|---|---|",
    ]
    other = []
    for group, t in groups.items():
        if "graftopt" in t and "floor" in t:
            ref = t.get("reference")
            lines.append(f"| {group} | {ref:.1f} | " if ref else f"| {group} | - | ")
            lines[-1] += f"{t['graftopt']:.1f} | {t['floor']:.1f} | " + (
                f"{ref / t['graftopt']:.1f}x" if ref else "-"
            )
            lines[-1] += f" | {t['graftopt'] / t['floor']:.2f}x |"
        else:
            other.append((group, t))
    for group, t in other:
        base = min(t.values())
        lines += ["", f"{group}:"] + [
            f"  {k}: {v:.1f} ms ({v / base:.2f}x)"
            for k, v in sorted(t.items(), key=lambda kv: kv[1])
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
