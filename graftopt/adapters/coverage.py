"""How well the adapters cover timm: ``python -m graftopt.adapters.coverage``.

Builds each architecture twice on the meta device (no memory, no weights), asks the registry
for its adapter, and reports per model: the adapter, the number of units, the share of
parameters inside units (and inside scored tensors), and whether the two instances align unit
by unit. Writes a CSV and prints a summary by family and by kind of family.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import multiprocessing
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .base import Unit, tensor_table
from .families import kind_of
from .registry import family_of, get_adapter
from .timm_adapter import TimmAdapter

__all__ = ["Row", "check_units", "main", "measure"]

# The goals of issue "timm adapters": share of parameters inside units, per kind of family.
GOALS = {"conv": 0.95, "transformer": 0.90, "hybrid": 0.90, "mlp": 0.90}


@dataclass
class Row:
    """One model's coverage."""

    model: str
    family: str = ""
    kind: str = ""
    adapter: str = ""
    traced: bool = False
    units: int = 0
    params: int = 0
    in_units: float = 0.0
    scored: float = 0.0
    aligned: bool = False
    seconds: float = 0.0
    error: str = ""


def check_units(model: nn.Module, units: Sequence[Unit]) -> None:
    """Raise a ValueError naming the unit and tensor where ``units`` cannot be grafted.

    Members must be floating tensors of the model, each in one unit only, and the scored
    tensors of a unit must agree on how many filters it has.
    """
    table = tensor_table(model)
    owner: dict[str, str] = {}
    for unit in units:
        rows = set()
        for name in unit.members:
            if name not in table:
                raise ValueError(f"unit {unit.name!r}: the model has no tensor {name!r}")
            if not table[name].is_floating_point():
                raise ValueError(f"unit {unit.name!r}: {name!r} is {table[name].dtype}, not float")
            if name in owner:
                raise ValueError(f"{name!r} is in units {owner[name]!r} and {unit.name!r}")
            owner[name] = unit.name
        for name in unit.scored:
            axis = unit.axis_of(name) or 0
            rows.add(table[name].shape[axis])
        if len(rows) > 1:
            shapes = {n: tuple(table[n].shape) for n in unit.scored}
            raise ValueError(f"unit {unit.name!r}: scored tensors disagree on filters: {shapes}")


def _build(name: str) -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def _units(model: nn.Module) -> tuple[str, list[Unit], bool]:
    adapter = get_adapter(model)
    if isinstance(adapter, TimmAdapter):
        units, traced = adapter.build(model)
    else:
        units, traced = adapter.units(model), False
    return type(adapter).__name__, units, traced


def _aligned(first: Sequence[Unit], second: Sequence[Unit], a: nn.Module, b: nn.Module) -> str:
    """An empty string when the two instances match unit by unit, else where they differ."""
    if len(first) != len(second):
        return f"{len(first)} units vs {len(second)}"
    ta, tb = tensor_table(a), tensor_table(b)
    for ua, ub in zip(first, second, strict=True):
        if ua != ub:
            return f"unit {ua.name!r} differs from {ub.name!r}"
        for n in ua.members:
            if ta[n].shape != tb[n].shape:
                return f"{n!r}: shape {tuple(ta[n].shape)} vs {tuple(tb[n].shape)}"
    return ""


def measure(name: str) -> Row:
    """Build ``name`` twice on the meta device and measure its adapter's units."""
    row = Row(name)
    start = time.perf_counter()
    try:
        model = _build(name)
    except Exception as exc:  # a model timm cannot build on meta is reported, not fatal
        row.error = f"build: {type(exc).__name__}: {exc}"[:300]
        return row
    row.family = family_of(model) or ""
    row.kind = kind_of(row.family)
    try:
        row.adapter, units, row.traced = _units(model)
        check_units(model, units)
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        inside = sum(params[n].numel() for u in units for n in u.members if n in params)
        scored = sum(params[n].numel() for u in units for n in u.scored if n in params)
        row.units, row.params = len(units), total
        row.in_units = inside / total if total else 1.0
        row.scored = scored / total if total else 1.0
        other = _build(name)
        diff = _aligned(units, _units(other)[1], model, other)
        row.aligned = not diff
        row.error = diff
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:300]
    row.seconds = round(time.perf_counter() - start, 2)
    return row


def _init_worker() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import graftopt.models  # noqa: F401  (registers the CIFAR networks with timm)


def summarize(rows: Sequence[Row]) -> str:
    """A table by family, then the figures per kind of family against the goals."""
    by_family: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_family[r.family or "(build failed)"].append(r)
    lines = [f"{'family':28} {'kind':11} {'models':>6} {'aligned':>7} {'min in-units':>12}"]
    for family in sorted(by_family):
        rs = by_family[family]
        ok = [r for r in rs if r.aligned]
        low = min((r.in_units for r in ok), default=float("nan"))
        kind = rs[0].kind or "-"
        lines.append(f"{family:28} {kind:11} {len(rs):6d} {len(ok):7d} {low:12.4f}")
    lines.append("")
    by_kind: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_kind[r.kind or "(build failed)"].append(r)
    for kind in sorted(by_kind):
        rs = by_kind[kind]
        ok = [r for r in rs if r.aligned]
        goal = GOALS.get(kind)
        shares = [r.in_units for r in ok] or [float("nan")]
        meet = sum(r.in_units >= goal for r in ok) if goal else len(ok)
        lines.append(
            f"{kind}: {len(rs)} models, {len(ok)} aligned, {sum(r.traced for r in ok)} traced, "
            f"in-units min {min(shares):.4f} median {statistics.median(shares):.4f}, "
            f"scored median {statistics.median([r.scored for r in ok] or [0.0]):.4f}, "
            + (f"{meet}/{len(ok)} meet the {goal:.0%} goal" if goal else "no goal")
        )
    failed = [r for r in rows if not r.aligned]
    lines.append(f"\n{len(rows)} models, {len(rows) - len(failed)} aligned, {len(failed)} failed")
    lines.extend(f"  {r.model}: {r.error}" for r in failed)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m graftopt.adapters.coverage", description=__doc__
    )
    parser.add_argument("--filter", default="", help="timm.list_models pattern, e.g. 'resnet*'")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--limit", type=int, default=0, help="measure only the first N models")
    parser.add_argument("--csv", default="adapter_coverage.csv", help="where to write the rows")
    args = parser.parse_args(argv)

    import timm

    _init_worker()
    names = timm.list_models(args.filter or "")
    if args.limit:
        names = names[: args.limit]
    if not names:
        parser.error(f"no timm model matches {args.filter!r}")
    rows = []
    with open(args.csv, "w", newline="") as f, contextlib.ExitStack() as stack:
        if args.jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            pool = stack.enter_context(
                ctx.Pool(args.jobs, initializer=_init_worker, maxtasksperchild=100)
            )
            results = pool.imap(measure, names, chunksize=2)
        else:
            results = map(measure, names)
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for i, r in enumerate(results, 1):
            rows.append(r)
            d = asdict(r)
            d["in_units"], d["scored"] = f"{r.in_units:.6f}", f"{r.scored:.6f}"
            writer.writerow(d)
            f.flush()  # a long run leaves usable rows behind if stopped
            status = "ok" if r.aligned else f"FAILED {r.error}"
            print(f"[{i}/{len(names)}] {r.model} {status}", file=sys.stderr, flush=True)
    print(summarize(rows))
    print(f"\nrows written to {args.csv}")
    return 0 if all(r.aligned for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
