"""The per-epoch metrics file and the final comparison table built from it."""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from .checkpoint import atomic_write_text

__all__ = [
    "ALPHA_FIELDS",
    "METRIC_FIELDS",
    "format_table",
    "read_csv",
    "summarize",
    "write_csv",
]

METRIC_FIELDS = (
    "epoch",
    "network",
    "kind",
    "lane",
    "lr",
    "train_loss",
    "top1",
    "top5",
    "graft_rounds",
    "mean_alpha",
    "invalid_0.1",
    "invalid_0.01",
    "filters",
)
ALPHA_FIELDS = ("epoch", "network", "round", "step", "unit", "alpha")
ENSEMBLES = {
    "ensemble_baseline": "ensemble of the baselines",
    "ensemble_grafted": "ensemble of the grafted",
    "ensemble_peer": "ensemble of the peers",
    "soup_baseline": "soup of the baselines",
    "soup_grafted": "soup of the grafted",
    "soup_peer": "soup of the peers",
}
KINDS = tuple(
    f"{average}{kind}"
    for average in ("", "ema_", "swa_")
    for kind in ("grafted", "peer", "baseline")
)


def write_csv(
    path: str | os.PathLike[str], fields: Sequence[str], rows: Iterable[dict[str, Any]]
) -> None:
    """Write all rows at once (atomically), so the file always matches a whole epoch."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return value


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows with numbers parsed back (empty cells become ``None``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: _parse(v) for k, v in row.items()} for row in rows]


def _parse(value: str) -> Any:
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    # Sample standard deviation (n - 1): these are a handful of independently seeded networks.
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Best and last top-1 of each network and ensemble, and the mean ± std of each kind."""
    by_net: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_net.setdefault(str(row["network"]), []).append(row)
    nets = {}
    for name, rs in by_net.items():
        rs = sorted(rs, key=lambda r: int(r["epoch"]))
        best = max(rs, key=lambda r: float(r["top1"]))
        losses = [r.get("train_loss") for r in rs if r.get("train_loss") is not None]
        nets[name] = {
            "kind": rs[0]["kind"],
            "diverged": any(not math.isfinite(float(v)) for v in losses),
            "best_top1": float(best["top1"]),
            "best_epoch": int(best["epoch"]),
            "last_top1": float(rs[-1]["top1"]),
            "last_epoch": int(rs[-1]["epoch"]),
        }
    groups = {}
    for kind in KINDS:
        members = [n for n in nets.values() if n["kind"] == kind]
        if members:
            best = _mean_std([n["best_top1"] for n in members])
            last = _mean_std([n["last_top1"] for n in members])
            groups[kind] = {"n": len(members), "best": best, "last": last}
    return {"networks": nets, "groups": groups}


def _pm(ms: tuple[float, float]) -> str:
    mean, std = ms
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f}"


def _row(label: str, kind: str, n: dict[str, Any]) -> str:
    return f"| {label} | {kind} | {n['best_top1']:.2f} | {n['best_epoch']} | {n['last_top1']:.2f} |"


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table: every network, the mean ± std of each kind, and the ensembles."""
    lines = [
        "| network | kind | best top-1 (%) | best epoch | last top-1 (%) |",
        "|---|---|---|---|---|",
    ]
    nets = summary["networks"]
    for name, n in nets.items():
        if name in ENSEMBLES:
            continue
        lines.append(_row(name, n["kind"], n))
    for kind, g in summary["groups"].items():
        lines.append(
            f"| {kind} mean ± std | {g['n']} networks | {_pm(g['best'])} | | {_pm(g['last'])} |"
        )
    for name, label in ENSEMBLES.items():
        if name in nets:
            n = nets[name]
            lines.append(_row(label, name.split("_")[0], n))
    diverged = [name for name, n in nets.items() if n.get("diverged")]
    if diverged:
        lines.append("")
        lines.append(
            f"DIVERGED (non-finite training loss): {', '.join(diverged)}; their accuracies "
            "are not results."
        )
    groups = summary["groups"]
    for kind in ("grafted", "peer"):
        if kind in groups and "baseline" in groups:
            delta = groups[kind]["last"][0] - groups["baseline"]["last"][0]
            lines.append("")
            lines.append(f"Last-epoch top-1, {kind} minus baseline (means): {delta:+.2f} points.")
    return "\n".join(lines) + "\n"
