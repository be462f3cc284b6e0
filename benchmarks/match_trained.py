"""One round between two networks trained from different starts, with and without filter matching.

Takes the final networks of the accuracy study's K = 2 baseline runs (trained apart from
different random starts, docs/accuracy.md) and blends network 1 (the host) with network 0 once:
the paper's round and the plain mean, each without and with matching the peer's filters to the
host's first (``align=True``), each with the norm statistics as blended and re-estimated from
20 training batches. Prints top-1 on the study's validation images.

    python3 benchmarks/match_trained.py                    # after the study's baseline runs
    python3 benchmarks/match_trained.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import timm
import torch

import graftopt
import graftopt.models
from graftopt.adapters.channels import channel_spaces
from graftopt.matching import matched
from graftopt.train.checkpoint import load_checkpoint
from graftopt.train.config import TrainConfig
from graftopt.train.data import build_data, eval_loader
from graftopt.train.loop import norm_batches

CASES = [
    (name, A, align)
    for name, A in (("paper round", 0.4), ("plain mean", 0.0))
    for align in (False, True)
]


@torch.inference_mode()
def top1(model: torch.nn.Module, loader) -> float:
    model.eval()
    right = seen = 0
    for x, y in loader:
        right += (model(x).argmax(1) == y).sum().item()
        seen += len(y)
    return 100.0 * right / seen


def geometry(host: torch.nn.Module, peer: torch.nn.Module) -> str:
    """Distance and dot product of the two weight sets (parameters), before and after matching."""
    spaces = channel_spaces(host)
    h, p = host.state_dict(), peer.state_dict()
    moved = matched(spaces, h, p)
    names = [n for n, _ in host.named_parameters()]

    def dist(q):
        return sum(((h[n] - q[n]) ** 2).sum() for n in names).sqrt().item()

    def dot(q):
        return sum((h[n] * q[n]).sum() for n in names).item()

    norm = sum((h[n] ** 2).sum() for n in names).sqrt().item()
    return (
        f"host norm {norm:.2f}; distance {dist(p):.2f} -> {dist(moved):.2f} matched; "
        f"dot product {dot(p):.2f} -> {dot(moved):.2f} matched"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="output/accuracy_study/n6000-v5000-e10")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=20, help="batches to re-estimate norms from")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        state = load_checkpoint(Path(args.study) / f"baseline-k2-seed{seed}")
        cfg = TrainConfig.from_dict(state["config"])
        spec = build_data(cfg, {})
        loader = eval_loader(spec, cfg)
        batches = norm_batches(spec, cfg, args.batches, 6)
        nets = []
        for lane in ("peer0", "peer1"):
            m = timm.create_model(cfg.model, pretrained=False, **state["model_args"])
            m.load_state_dict(state["nets"][lane]["model"])
            nets.append(m)
        row = {"seed": seed, "network 0": top1(nets[0], loader), "network 1": top1(nets[1], loader)}
        print(f"seed {seed}: {geometry(nets[1], nets[0])}", flush=True)
        for name, A, align in CASES:
            host = copy.deepcopy(nets[1])
            start = time.perf_counter()
            graftopt.graft_(host, [nets[0]], A=A, align=align)
            took = time.perf_counter() - start
            label = f"{name}{', matched' if align else ''}"
            row[label] = top1(host, loader)
            graftopt.recalibrate_norms(host, batches)
            row[label + ", norms re-estimated"] = top1(host, loader)
            row[label + " (s)"] = took
        rows.append(row)
        print(row, flush=True)
    keys = [k for k in rows[0] if k != "seed" and not k.endswith("(s)")]
    print(
        "\n| network or blend (host: network 1) | "
        + " | ".join(f"seed {r['seed']}" for r in rows)
        + " | mean |"
    )
    print("|---|" + "---|" * (len(rows) + 1))
    for k in keys:
        vals = [r[k] for r in rows]
        print(
            f"| {k} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |"
        )
    took = [r[k] for r in rows for k in r if k.endswith("matched (s)")]
    print(f"\nround with matching: {min(took):.2f}-{max(took):.2f} s")


if __name__ == "__main__":
    main()
