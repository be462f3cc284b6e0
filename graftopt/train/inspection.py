"""``graftopt inspect``: per-layer weight entropy and invalid filters of saved networks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from graftopt import functional as GF
from graftopt import invalid_filters
from graftopt import models as _models  # noqa: F401  (registers the CIFAR networks with timm)

from .checkpoint import CHECKPOINT, FORMAT, find_checkpoint, rank_checkpoints, safe_load
from .config import TrainConfig

__all__ = ["inspect_model", "inspect_path", "inspect_state_dict"]

THRESHOLDS = (0.1, 0.01)


def _table(rows: list[tuple[str, str, float, int, int, int]]) -> str:
    width = max([len(r[0]) for r in rows] + [5])
    head = f"{'shape':<16} {'entropy':>8} {'inv<0.1':>8} {'inv<0.01':>9} {'filters':>8}"
    lines = [f"{'layer':<{width}}  {head}"]
    for name, shape, h, coarse, fine, total in rows:
        lines.append(f"{name:<{width}}  {shape:<16} {h:>8.4f} {coarse:>8} {fine:>9} {total:>8}")
    coarse = sum(r[3] for r in rows)
    fine = sum(r[4] for r in rows)
    total = sum(r[5] for r in rows)
    lines.append(f"{'total':<{width}}  {'':<16} {'':>8} {coarse:>8} {fine:>9} {total:>8}")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def inspect_model(model: nn.Module, bins: int = 10) -> str:
    """A table of each conv and linear layer: weight entropy and invalid filters (l1 norm)."""
    counts = {t: invalid_filters(model, t).layers for t in THRESHOLDS}
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            w = m.weight.detach()
            h = float(GF.entropy(w, bins=bins))
            coarse, total = counts[0.1].get(name, (0, 0))
            fine, _ = counts[0.01].get(name, (0, 0))
            rows.append((name, "x".join(map(str, w.shape)), h, coarse, fine, total))
    if not rows:
        raise ValueError(f"{type(model).__name__} has no conv or linear layers to inspect")
    return _table(rows)


@torch.no_grad()
def inspect_state_dict(state: Mapping[str, Tensor], bins: int = 10) -> str:
    """The same table from tensors alone: every weight of 2+ dims; 4-d ones count filters."""
    rows = []
    for name, w in state.items():
        if not isinstance(w, Tensor) or not name.endswith("weight") or w.dim() < 2:
            continue
        w = w.detach().float()
        h = float(GF.entropy(w, bins=bins))
        if w.dim() >= 3:  # conv: output channels are the filters
            norms = w.reshape(w.shape[0], -1).abs().sum(1)
            coarse, fine, total = int((norms < 0.1).sum()), int((norms < 0.01).sum()), w.shape[0]
        else:
            coarse = fine = total = 0
        rows.append(
            (name.removesuffix(".weight"), "x".join(map(str, w.shape)), h, coarse, fine, total)
        )
    if not rows:
        raise ValueError("the state dict holds no weight tensors of 2 or more dimensions")
    return _table(rows)


# The only arguments a checkpoint may give timm.create_model, with their bounds: no path, hub
# id, pretrained or overlay key, and no size that would allocate without bound.
_MODEL_ARGS = {"num_classes": (1, 100_000), "in_chans": (1, 64)}


def vetted_model_args(state: dict) -> dict[str, int]:
    """The checkpoint's model name and arguments, refused unless inert: a registered timm
    architecture name (never a hub id or file) and bounded integer sizes."""
    name = state.get("config", {}).get("model")
    if not isinstance(name, str) or ":" in name or "/" in name or not timm.is_model(name):
        raise ValueError(f"the checkpoint names model {name!r}, which is not a timm architecture")
    args = state.get("model_args")
    if not isinstance(args, dict) or set(args) - set(_MODEL_ARGS):
        extra = sorted(set(args) - set(_MODEL_ARGS)) if isinstance(args, dict) else args
        raise ValueError(
            f"the checkpoint's model_args hold {extra!r}: only {sorted(_MODEL_ARGS)} are read"
        )
    for key, value in args.items():
        lo, hi = _MODEL_ARGS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"the checkpoint's model_args {key}={value!r} is not in [{lo}, {hi}]")
    return dict(args)


def inspect_path(path: str | os.PathLike[str], network: str | None = None, bins: int = 10) -> str:
    """Inspect a run folder or graftopt checkpoint (every network), or a plain state dict file."""
    p = Path(path)
    if p.is_dir() and not (p / CHECKPOINT).exists() and rank_checkpoints(p):
        # A torchrun run: each rank's file holds its own networks.
        parts = [safe_load(f) for f in rank_checkpoints(p)]
        state = {**parts[0], "nets": {k: v for part in parts for k, v in part["nets"].items()}}
    else:
        p = find_checkpoint(p) if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: give a run folder, a checkpoint or a state dict file"
            )
        state = safe_load(p)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        cfg = TrainConfig.from_dict(state["config"])
        nets = state["nets"]
        if network is not None and network not in nets:
            raise ValueError(f"--network {network!r} is not in this run; it has {sorted(nets)}")
        out = []
        for name, s in nets.items():
            if network is not None and name != network:
                continue
            model = timm.create_model(cfg.model, pretrained=False, **vetted_model_args(state))
            model.load_state_dict(s["model"])
            out.append(
                f"== {name} ({cfg.model}, epoch {state['epoch']}) ==\n{inspect_model(model, bins)}"
            )
        return "\n".join(out)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):  # timm's and common layouts
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        return inspect_state_dict(state, bins)
    if isinstance(state, nn.Module):
        return inspect_model(state, bins)
    raise ValueError(f"{p} holds a {type(state).__name__}, not a checkpoint or state dict")
