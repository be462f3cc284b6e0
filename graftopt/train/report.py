"""``graftopt report``: PNG plots of a run folder (matplotlib, an optional dependency)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .summary import ENSEMBLES, format_table, read_csv, summarize

__all__ = ["MissingMatplotlib", "report", "write_plots"]


class MissingMatplotlib(ImportError):
    """Plots need matplotlib, which graftopt does not require."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise MissingMatplotlib(
            "plots need matplotlib: python3 -m pip install matplotlib (or graftopt[plot])"
        ) from e
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _style(kind: str, lane: Any) -> dict[str, Any]:
    """Line style by kind (EMA and SWA dash-dotted); width by lane, widest first, so that
    networks with equal curves (a grafted pair after full rounds) stay visible."""
    average, _, base = kind.rpartition("_")
    style = {
        "grafted": {"linestyle": "-", "marker": "o"},
        "peer": {"linestyle": "-", "marker": "d"},
        "baseline": {"linestyle": "--", "marker": "s"},
        "ensemble": {"linestyle": ":", "marker": "^"},
        "soup": {"linestyle": "", "marker": "*", "markersize": 9},
    }.get(base, {})
    if average:
        style = {**style, "linestyle": "-."}
    if isinstance(lane, int):
        style["linewidth"] = max(0.8, 3.2 - 0.8 * lane)
    return style


def _curves(ax: Any, rows: list[dict[str, Any]], key: str) -> None:
    """One line per network: ``key`` over epochs, styled by the network's kind."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    kinds, lanes = {}, {}
    for r in rows:
        if r.get(key) is not None:
            series[r["network"]].append((r["epoch"], r[key]))
            kinds[r["network"]], lanes[r["network"]] = r["kind"], r.get("lane")
    for name, points in series.items():
        points.sort()
        ax.plot(
            [e for e, _ in points],
            [v for _, v in points],
            label=ENSEMBLES.get(name, name) + (" (last epoch)" if name.startswith("soup") else ""),
            **{"markersize": 3, **_style(kinds[name], lanes[name])},
        )


def _accuracy(plt: Any, rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, rows, "top1")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(
        "grafted (solid) vs baseline (dashed) vs ensembles (dotted); lane 0 widest",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _alphas(plt: Any, rows: list[dict[str, Any]], path: Path) -> None:
    nets = sorted({r["network"] for r in rows})
    units = list(dict.fromkeys(r["unit"] for r in rows))
    fig, axes = plt.subplots(
        len(nets),
        1,
        figsize=(8, 0.18 * len(units) * len(nets) + 1.5),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, net in zip(axes[:, 0], nets, strict=True):
        mine = [r for r in rows if r["network"] == net]
        rounds = sorted({r["round"] for r in mine})
        col = {r: i for i, r in enumerate(rounds)}
        grid = [[float("nan")] * len(rounds) for _ in units]
        row_of = {u: i for i, u in enumerate(units)}
        for r in mine:
            grid[row_of[r["unit"]]][col[r["round"]]] = r["alpha"]
        image = ax.imshow(
            grid,
            aspect="auto",
            cmap="coolwarm",
            vmin=0.3,
            vmax=0.7,
            interpolation="nearest",
            extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(units) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(units)))
        ax.set_yticklabels(units, fontsize=6)
        ax.set_title(f"{net}: alpha (own share) per unit", fontsize=9)
        ax.set_xlabel("graft round")
        ax.xaxis.set_major_locator(_integer_ticks())
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="alpha")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _invalid(plt: Any, rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key in zip(axes, ("invalid_0.1", "invalid_0.01"), strict=True):
        _curves(ax, rows, key)
        total = max((int(r["filters"]) for r in rows if r.get("filters")), default=0)
        ax.set_title(f"invalid filters (l1 < {key.split('_')[1]}) of {total} per network")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.yaxis.set_major_locator(_integer_ticks())
        ax.set_ylim(0, max(ax.get_ylim()[1], 1))  # counts: no negative axis when all are 0
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("filters")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(
    run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write ``accuracy.png``, ``alphas.png`` (when rounds ran) and ``invalid_filters.png``."""
    run = Path(run)
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: give a run folder written by graftopt train")
    rows = read_csv(metrics)
    if not rows:
        raise ValueError(f"{metrics} holds no epochs yet")
    plt = _pyplot()
    folder = Path(out) if out is not None else run / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "accuracy.png", folder / "invalid_filters.png"]
    _accuracy(plt, rows, written[0])
    _invalid(plt, [r for r in rows if r["kind"] not in ("ensemble", "soup")], written[1])
    alphas = run / "alphas.csv"
    alpha_rows = read_csv(alphas) if alphas.is_file() else []
    if alpha_rows:
        written.append(folder / "alphas.png")
        _alphas(plt, alpha_rows, written[-1])
    return written


def report(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> str:
    """Write the plots and return the run's table followed by the plot paths."""
    paths = write_plots(run, out)
    table = format_table(summarize(read_csv(Path(run) / "metrics.csv")))
    return table + "".join(f"plot: {p}\n" for p in paths)
