"""Accuracy study on Fashion-MNIST: K grafted peers vs K baselines vs the baselines' ensemble.

Every (model, K, seed) is one ``graftopt train`` run with ``--baseline`` under one fixed recipe,
printed at the start. The table reports, over seeds, the mean ± std of each run's mean last-epoch
top-1 of its grafted networks, of its baselines, and of the ensemble of its baselines.

Runs are kept under ``--output``; running the script again skips finished runs and resumes
unfinished ones, so it can be stopped and restarted.

    python3 benchmarks/accuracy_study.py                      # the full study (long)
    python3 benchmarks/accuracy_study.py --models cifar_resnet20 --train-subset 5000 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from graftopt.train.checkpoint import CHECKPOINT, load_checkpoint
from graftopt.train.config import TrainConfig, merge_resumed
from graftopt.train.loop import train
from graftopt.train.progress import Progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet32"])
    p.add_argument("--peers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-subset", type=int, default=None, help="default: all 60000 images")
    p.add_argument("--val-subset", type=int, default=None, help="default: all 10000 images")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", default="output/accuracy_study")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def recipe(args: argparse.Namespace, model: str, k: int, seed: int) -> TrainConfig:
    """The fixed recipe: the paper's CIFAR settings, cosine per step, grafting every epoch."""
    return TrainConfig(
        model=model,
        dataset="torch/fashion_mnist",
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        val_subset=args.val_subset,
        epochs=args.epochs,
        batch_size=128,
        opt="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        sched="cosine",
        seed=seed,
        peers=k,
        baseline=True,
        graft_A=0.4,
        graft_c=500.0,
        device=args.device,
        output=str(Path(args.output) / f"{model}-k{k}-seed{seed}"),
        progress="plain",
        log_interval=10**9,  # one line per epoch is enough in a long log
    )


def run_one(cfg: TrainConfig) -> dict[str, Any]:
    out = Path(cfg.output or "")
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    state = None
    if (out / CHECKPOINT).is_file():
        state = load_checkpoint(out)
        cfg = merge_resumed(state["config"], cfg)
    return train(cfg, progress=Progress("plain", cfg.log_interval), resume_state=state).summary


def _ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    lines = [
        "| model | K | seeds | grafted (mean of K) | baselines (mean of K) "
        "| ensemble of K baselines | grafted − baselines | seeds grafted > baselines |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, k), summaries in results.items():
        g = [s["groups"]["grafted"]["last"][0] for s in summaries]
        b = [s["groups"]["baseline"]["last"][0] for s in summaries]
        e = [s["networks"]["ensemble_baseline"]["last_top1"] for s in summaries]
        d = [x - y for x, y in zip(g, b, strict=True)]
        wins = sum(x > 0 for x in d)
        lines.append(
            f"| {model} | {k} | {len(summaries)} | {_ms(g)} | {_ms(b)} | {_ms(e)} | "
            f"{statistics.fmean(d):+.2f} | {wins}/{len(d)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    first = recipe(args, args.models[0], args.peers[0], args.seeds[0])
    print(
        "fixed recipe: Fashion-MNIST "
        f"(train subset {args.train_subset or 'all'}, val subset {args.val_subset or 'all'}), "
        f"{first.epochs} epochs, batch {first.batch_size}, SGD lr {first.lr} momentum "
        f"{first.momentum} wd {first.weight_decay}, cosine per step, pad-4 crop + flip; grafting "
        f"every epoch, A={first.graft_A}, c={first.graft_c}, entropy, layer level, ring; "
        f"K baselines under the same recipe (same init, lr and batches per index); "
        f"models {args.models}, K {args.peers}, seeds {args.seeds}; top-1 at the last epoch",
        flush=True,
    )
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for model in args.models:
        for k in args.peers:
            for seed in args.seeds:
                print(f"--- {model} K={k} seed={seed}", flush=True)
                results.setdefault((model, k), []).append(run_one(recipe(args, model, k, seed)))
    text = table(results)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{text}\n(study time {minutes:.0f} min)")
    out = Path(args.output)
    (out / "table.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
