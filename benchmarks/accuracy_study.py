"""Accuracy study on Fashion-MNIST: grafting configurations against independent baselines.

Every (configuration, K, seed) is one ``graftopt train`` run of K networks under one fixed
recipe (printed at the start); the baselines are the run of K networks without rounds
(``--no-graft``), so every configuration is paired, seed by seed, with the same K independent
networks: lane i starts from the same weights (unless the configuration starts every lane from
lane 0's) and sees the same batches. The table reports over seeds the mean ± std of each run's
mean last-epoch top-1, the paired difference to the baselines and how many seeds it wins, the
ensemble (mean softmax) and the soup (mean weights, norm statistics re-estimated) of the K
networks, and the wall time of the runs.

Runs are kept under ``--output``; running the script again skips finished runs and resumes
unfinished ones, so it can be stopped, restarted, and split over processes by ``--configs``.

    OMP_NUM_THREADS=1 python3 benchmarks/accuracy_study.py --configs baseline paper --peers 2
    python3 benchmarks/accuracy_study.py --table-only          # the table of what has finished
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graftopt.train.checkpoint import CHECKPOINT, load_checkpoint
from graftopt.train.config import PRESETS, TrainConfig, merge_resumed
from graftopt.train.loop import train
from graftopt.train.progress import Progress
from graftopt.train.summary import read_csv

# Each configuration: the TrainConfig fields it sets on top of the recipe.
GENTLE = {"same_init": True, "graft_rate": 0.5, "graft_recalibrate": 5}
DML = {"distill_weight": 1.0, "distill_T": 1.0}
# The weight averages users already have, kept beside every network that trains alone:
# timm's EMA (warm-up on) and SWA over the second half of the run. They read the weights and
# draw no random number, so the networks train exactly as without them.
AVERAGES = {"model_ema": 0.998, "swa_start": 5}


def _long(k: int) -> dict[str, Any]:
    """One network given the K networks' compute on one worker: K times the epochs."""
    return {"graft": False, "peers": 1, "epochs": 10 * k, "model_ema": 0.998}


def _data_parallel(k: int) -> dict[str, Any]:
    """One network as K data-parallel replicas for the grafted runs' steps: global batch
    K x 128 for K x 10 epochs, the learning rate scaled linearly with a warm-up over the first
    tenth of the run (Goyal et al.'s rule)."""
    return {
        **_long(k),
        "replicas": k,
        "batch_size": 128 * k,
        "lr": 0.1 * k,
        "warmup_epochs": k,
    }


def _graft_pairs(k: int) -> dict[str, Any]:
    """K workers as K/2 grafted networks of 2 data-parallel replicas each (the timm route's
    K x D): each network's global batch is 256 for 20 epochs, the grafted runs' steps."""
    return {
        "same_init": True,
        "graft_every": 10,
        "peers": k // 2,
        "replicas": 2,
        "batch_size": 256,
        "lr": 0.2,
        "warmup_epochs": 2,
        "epochs": 20,
    }


CONFIGS: dict[str, dict[str, Any] | Callable[[int], dict[str, Any]]] = {
    "baseline": {"graft": False, **AVERAGES},  # K independent networks
    "paper": dict(PRESETS["paper"]),  # the authors' rounds
    "same-init": {"same_init": True},
    "recalibrate": {"graft_recalibrate": 5},
    "rate-0.5": {"graft_rate": 0.5},
    "start-1-epoch": {"graft_start": 1},  # resolved to one epoch of steps in recipe()
    "reset-momentum": {"graft_optimizer_state": "reset"},
    "gentle": GENTLE,  # same init + half-way rounds + recalibration
    "papa": dict(PRESETS["papa"]),  # population averaging as a graft configuration
    # PAPA as its paper trains the population: each member its own mixup and label smoothing,
    # the 1 % pull every 10 steps, and the soup at the end (its norm statistics re-estimated).
    "papa-draws": {**PRESETS["papa"], "member_draws": True},
    # The same members without the pull: what the per-member regularisation alone gives.
    "baseline-draws": {"graft": False, "member_draws": True, **AVERAGES},
    # Local averaging: one start, the plain mean every 10 steps (PAPA's period, the whole way).
    "avg-10": {"same_init": True, "graft_A": 0.0, "graft_every": 10},
    "graft-10": {"same_init": True, "graft_every": 10},  # avg-10 with the paper's alphas
    # The defaults with an EMA of each grafted network: do they stack?
    "graft-10-ema": {"same_init": True, "graft_every": 10, "model_ema": 0.998},
    "long": _long,  # one network, K x the epochs on one worker
    "dp": _data_parallel,  # one network, K data-parallel workers, the grafted runs' steps
    "graft-pairs": _graft_pairs,  # K/2 grafted networks of 2 replicas (K >= 4)
    # The paper's rounds with each peer's filters matched to the host's first (weight matching).
    "paper-align": {**PRESETS["paper"], "graft_align": True},
    # graft-10 from independent starts, filters matched: does matching stand in for one start?
    "align-10": {**PRESETS["frequent"], "same_init": False, "graft_align": True},
    "indep-10": {**PRESETS["frequent"], "same_init": False},  # align-10 without the matching
    "dml": {"graft": False, **DML},  # mutual distillation alone (weight ramped over epoch 1)
    "cultivation": {**GENTLE, **DML},  # gentle rounds + mutual distillation
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--peers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=6000, help="0: all 60000 images")
    p.add_argument("--val-subset", type=int, default=5000, help="0: all 10000 images")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--output",
        default=None,
        help="folder of the runs (default: output/accuracy_study/n<train>-v<val>-e<epochs>)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    p.add_argument(
        "--invalid", action="store_true", help="with --table-only: the invalid-filter counts"
    )
    p.add_argument(
        "--versus",
        action="store_true",
        help="with --table-only: the equal-hardware table (each alternative beside the defaults)",
    )
    args = p.parse_args(argv)
    if args.output is None:
        recipe_name = f"n{args.train_subset}-v{args.val_subset}-e{args.epochs}"
        args.output = str(Path("output/accuracy_study") / recipe_name)
    return args


def recipe(args: argparse.Namespace, config: str, k: int, seed: int) -> TrainConfig:
    """The fixed recipe (the paper's CIFAR settings, cosine per step, a round every epoch),
    with the configuration's settings on top."""
    cfg = TrainConfig(
        model=args.model,
        dataset="torch/fashion_mnist",
        data_dir=args.data_dir,
        train_subset=args.train_subset or None,
        val_subset=args.val_subset or None,
        epochs=args.epochs,
        batch_size=128,
        opt="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        sched="cosine",
        seed=seed,
        peers=k,
        graft_A=0.4,
        graft_c=500.0,
        soup_recalibrate=20,
        device=args.device,
        output=str(Path(args.output) / f"{config}-k{k}-seed{seed}"),
        progress="plain",
        log_interval=10**9,  # one line per epoch is enough in a long log
    )
    # Every configuration is a change from the paper's rounds, whatever graftopt train's
    # defaults are.
    change = CONFIGS[config]
    for key, value in {**PRESETS["paper"], **(change(k) if callable(change) else change)}.items():
        setattr(cfg, key, value)
    if config == "start-1-epoch":
        cfg.graft_start = (args.train_subset or 60000) // cfg.batch_size
    return cfg


def run_one(cfg: TrainConfig) -> dict[str, Any]:
    out = Path(cfg.output or "")
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    state = None
    if (out / CHECKPOINT).is_file():
        state = load_checkpoint(out)
        cfg = merge_resumed(state["config"], cfg)
    start = time.perf_counter()
    summary = train(cfg, progress=Progress("plain", cfg.log_interval), resume_state=state).summary
    took = time.perf_counter() - start
    # Wall time of this process's part of the run (a resumed run adds to what it had).
    timing = out / "wall_s.json"
    before = json.loads(timing.read_text())["wall_s"] if timing.is_file() else 0.0
    timing.write_text(json.dumps({"wall_s": before + took}) + "\n")
    return summary


def finished(args: argparse.Namespace, config: str, k: int, seed: int) -> dict[str, Any] | None:
    out = Path(recipe(args, config, k, seed).output or "")
    if not (out / "summary.json").is_file():
        return None
    summary = json.loads((out / "summary.json").read_text())
    timing = out / "wall_s.json"
    summary["wall_s"] = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
    return summary


def _ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _kind(summary: dict[str, Any]) -> str:
    return "grafted" if "grafted" in summary["groups"] else "peer"


def _of(summary: dict[str, Any], what: str) -> float | None:
    net = summary["networks"].get(f"{what}_{_kind(summary)}")
    return None if net is None else net["last_top1"]


def table(args: argparse.Namespace) -> str:
    lines = [
        "| configuration | K | seeds | mean of K (top-1) | − baselines (paired) | seeds won "
        "| ensemble of K | soup of K | per seed | wall min / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in args.peers:
        base = {s: finished(args, "baseline", k, s) for s in args.seeds}
        for config in args.configs:
            runs = {s: finished(args, config, k, s) for s in args.seeds}
            runs = {s: r for s, r in runs.items() if r is not None}
            if not runs:
                continue
            mean = {s: r["groups"][_kind(r)]["last"][0] for s, r in runs.items()}
            paired = [
                mean[s] - b["groups"]["peer"]["last"][0]
                for s, b in base.items()
                if b is not None and s in mean
            ]
            ens = [v for v in (_of(r, "ensemble") for r in runs.values()) if v is not None]
            soups = [v for v in (_of(r, "soup") for r in runs.values()) if v is not None]
            walls = [r["wall_s"] / 60 for r in runs.values() if r.get("wall_s")]
            diff = (
                ""
                if config == "baseline" or not paired
                else (
                    f"{statistics.fmean(paired):+.2f}"
                    + (f" ± {statistics.stdev(paired):.2f}" if len(paired) > 1 else "")
                )
            )
            wins = "" if config == "baseline" else f"{sum(d > 0 for d in paired)}/{len(paired)}"
            per_seed = " / ".join(f"{mean[s]:.2f}" for s in sorted(mean))
            lines.append(
                f"| {config} | {k} | {len(runs)} | {_ms(list(mean.values()))} | {diff} | {wins} "
                f"| {_ms(ens) if ens else ''} | {_ms(soups) if soups else ''} | {per_seed} "
                f"| {statistics.fmean(walls):.1f} |"
                if walls
                else f"| {config} | {k} | {len(runs)} | {_ms(list(mean.values()))} | {diff} "
                f"| {wins} | {_ms(ens) if ens else ''} | {_ms(soups) if soups else ''} "
                f"| {per_seed} | |"
            )
    return "\n".join(lines) + "\n"


# The rows of the equal-hardware table: (label, configuration, which of its figures).
# A figure is a group of the run's summary ("peer", "ema_grafted", ...) or "ensemble_<kind>".
VERSUS = (
    ("one network (the baselines, each alone)", "baseline", "peer"),
    ("one network + EMA", "baseline", "ema_peer"),
    ("one network + SWA (second half)", "baseline", "swa_peer"),
    ("ensemble of K independent networks", "baseline", "ensemble_peer"),
    ("their soup: the K networks' final average (one start)", "baseline", "soup_peer"),
    ("one network, K x the epochs, one worker", "long", "peer"),
    ("the same + EMA", "long", "ema_peer"),
    ("one network, K data-parallel workers", "dp", "peer"),
    ("the same + EMA", "dp", "ema_peer"),
    ("plain mean every 10 steps (avg-10)", "avg-10", "grafted"),
    ("grafting, the defaults (graft-10)", "graft-10", "grafted"),
    ("grafting, the defaults (graft-10)", "graft-10-ema", "grafted"),
    ("the defaults + EMA", "graft-10-ema", "ema_grafted"),
    ("K/2 grafted networks of 2 data-parallel replicas", "graft-pairs", "grafted"),
    ("K networks, each its own mixup and label smoothing", "baseline-draws", "peer"),
    ("their ensemble", "baseline-draws", "ensemble_peer"),
    ("their soup", "baseline-draws", "soup_peer"),
    ("PAPA: those draws + the 1 % pull every 10 steps", "papa-draws", "grafted"),
    ("PAPA's soup (the final average)", "papa-draws", "soup_grafted"),
)


def _figure(summary: dict[str, Any], what: str) -> float | None:
    if what.startswith(("ensemble_", "soup_")):
        net = summary["networks"].get(what)
        return None if net is None else net["last_top1"]
    group = summary["groups"].get(what)
    return None if group is None else group["last"][0]


def _hardware(cfg: TrainConfig, what: str, k: int) -> tuple[int, str]:
    """Compute (network-epochs) and workers x steps of one row."""
    steps = (cfg.train_subset or 60000) // cfg.batch_size * cfg.epochs
    if cfg.replicas > 1:
        nets = cfg.peers if cfg.graft else 1
        return cfg.epochs * nets, f"{cfg.replicas * nets} x {steps}"
    if what.endswith("grafted") or what.startswith(("ensemble", "soup")):
        return cfg.epochs * k, f"{k} x {steps}"
    return cfg.epochs, f"1 x {steps}"


def versus_table(args: argparse.Namespace) -> str:
    """Every alternative beside the grafted networks, at its compute and hardware, with the
    paired difference to the defaults (graft-10) seed by seed."""
    lines = [
        "| run | K | compute (network-epochs) | workers x steps | seeds | top-1 (mean ± std) "
        "| − defaults (paired) | seeds above the defaults | per seed | wall min / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in args.peers:
        ref: dict[int, float] = {}
        for config in ("graft-10", "graft-10-ema"):
            for s in args.seeds:
                r = finished(args, config, k, s)
                if r is not None and s not in ref:
                    ref[s] = r["groups"]["grafted"]["last"][0]
        for label, config, what in VERSUS:
            runs = {s: finished(args, config, k, s) for s in args.seeds}
            got = {s: _figure(r, what) for s, r in runs.items() if r is not None}
            got = {s: v for s, v in got.items() if v is not None}
            if not got:
                continue
            cfg = recipe(args, config, k, args.seeds[0])
            compute, hardware = _hardware(cfg, what, k)
            paired = [got[s] - ref[s] for s in got if s in ref]
            is_ref = config.startswith("graft-10") and what == "grafted"
            diff = "" if is_ref or not paired else f"{statistics.fmean(paired):+.2f}"
            if diff and len(paired) > 1:
                diff += f" ± {statistics.stdev(paired):.2f}"
            above = "" if is_ref or not paired else f"{sum(d > 0 for d in paired)}/{len(paired)}"
            walls = [r["wall_s"] / 60 for r in runs.values() if r is not None and r.get("wall_s")]
            wall = f"{statistics.fmean(walls):.1f}" if walls else ""
            per_seed = " / ".join(f"{got[s]:.2f}" for s in sorted(got))
            lines.append(
                f"| {label} | {k} | {compute} | {hardware} | {len(got)} "
                f"| {_ms(list(got.values()))} | {diff} | {above} | {per_seed} | {wall} |"
            )
    return "\n".join(lines) + "\n"


def invalid_table(args: argparse.Namespace) -> str:
    """The paper's mechanism: filters whose l1 norm is below 0.1 and 0.01 at the last epoch,
    per network (mean over the networks and seeds of each configuration)."""
    lines = [
        "| configuration | K | networks | filters per network | invalid (l1 < 0.1) "
        "| invalid (l1 < 0.01) |",
        "|---|---|---|---|---|---|",
    ]
    for k in args.peers:
        for config in args.configs:
            found = []
            for seed in args.seeds:
                run = Path(recipe(args, config, k, seed).output or "")
                if not (run / "summary.json").is_file():
                    continue
                rows = read_csv(run / "metrics.csv")
                last = max(int(r["epoch"]) for r in rows)
                found += [
                    r
                    for r in rows
                    if int(r["epoch"]) == last and r["kind"] in ("grafted", "peer", "baseline")
                ]
            if found:
                mean = {f: statistics.fmean(float(r[f]) for r in found) for f in INVALID}
                lines.append(
                    f"| {config} | {k} | {len(found)} | {mean['filters']:.0f} "
                    f"| {mean['invalid_0.1']:.2f} | {mean['invalid_0.01']:.2f} |"
                )
    return "\n".join(lines) + "\n"


INVALID = ("filters", "invalid_0.1", "invalid_0.01")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.table_only:
        first = recipe(args, "paper", args.peers[0], args.seeds[0])
        print(
            f"fixed recipe: {args.model} on Fashion-MNIST (train subset "
            f"{args.train_subset or 'all'}, val subset {args.val_subset or 'all'}), "
            f"{first.epochs} epochs, batch {first.batch_size}, SGD lr {first.lr} momentum "
            f"{first.momentum} wd {first.weight_decay}, cosine per step, pad-4 crop + flip; "
            f"the paper's ring and rounds (every epoch, A={first.graft_A}, c={first.graft_c}, "
            "entropy, layer level) unless a configuration changes them; "
            f"configurations {args.configs}; K {args.peers}; seeds {args.seeds}; "
            "top-1 at the last epoch",
            flush=True,
        )
        start = time.perf_counter()
        # Seed by seed, so that a study stopped early still holds paired runs.
        for k in args.peers:
            for seed in args.seeds:
                for config in args.configs:
                    print(f"--- {config} K={k} seed={seed}", flush=True)
                    run_one(recipe(args, config, k, seed))
        print(f"(study time {(time.perf_counter() - start) / 60:.0f} min)")
    text = (
        invalid_table(args) if args.invalid else versus_table(args) if args.versus else table(args)
    )
    print(f"\n{text}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
