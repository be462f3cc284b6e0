"""The training run: K grafted peers (and K baselines) stepping in lockstep, epoch by epoch.

Peer ``i`` and baseline ``i`` share a *lane*: the same initial weights, learning rate and
batches (one loader feeds both), so the only difference between them is grafting. Lanes have
their own data order and their own random stream. :func:`build_nets` builds the networks of
the lanes it is given: under ``torchrun`` each rank builds one lane (see :mod:`.ranks`), and a
lane computes there exactly what it computes beside the other lanes in one process.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel

import graftopt
from graftopt import GraftOptimizer, RoundRecord, invalid_filters
from graftopt import models as _models  # noqa: F401  (registers the CIFAR networks with timm)
from graftopt.adapters.channels import channel_spaces
from graftopt.kernels import cpu as cpu_kernels
from graftopt.matching import matched
from graftopt.recalibrate import frozen_norm_statistics, recalibrate_norms
from graftopt.settings import GraftSettings

from . import runlock
from .checkpoint import (
    CHECKPOINT,
    atomic_write_text,
    get_rng_state,
    rank_files,
    remove_stale_writes,
    set_rng_state,
)
from .config import TrainConfig, diverse_lr
from .data import DataSpec, build_data, eval_loader, train_loader
from .progress import Progress
from .summary import ALPHA_FIELDS, METRIC_FIELDS, format_table, summarize, write_csv
from .world import ONE_PROCESS, World, world_of

if TYPE_CHECKING:
    from graftopt.distributed import DistributedContext

__all__ = [
    "LaneRandom",
    "Net",
    "RunResult",
    "attach_grafting",
    "build_nets",
    "default_output",
    "train",
]


@dataclass
class Net:
    """One network of the run with everything that steps it."""

    name: str
    lane: int
    grafted: bool
    model: nn.Module
    optimizer: Optimizer
    lr: float
    scheduler: Any = None
    alphas: list[float] = field(default_factory=list)  # this epoch's mean alpha per round

    peer: bool = False  # a peer of a run without rounds (--no-graft)
    ema: ModelEmaV3 | None = None  # --model-ema
    swa: AveragedModel | None = None  # --swa-start
    average: str = ""  # "ema" or "swa": this Net is a view of another's average
    draws: MemberDraws | None = None  # --member-draws: this lane's mixup and label smoothing

    @property
    def kind(self) -> str:
        base = "baseline" if not self.grafted else "peer" if self.peer else "grafted"
        return f"{self.average}_{base}" if self.average else base

    def averages(self, swa_ready: bool) -> list[Net]:
        """Views of this network's EMA and SWA models, to evaluate beside it."""
        views = []
        for tag, holder in (("ema", self.ema), ("swa", self.swa if swa_ready else None)):
            if holder is not None:
                view = Net(f"{tag}_{self.name}", self.lane, self.grafted, holder.module,
                           self.optimizer, self.lr, peer=self.peer, average=tag)  # fmt: skip
                views.append(view)
        return views


@dataclass
class RunResult:
    output: Path
    epochs_done: int
    complete: bool
    summary: dict[str, Any]
    table: str


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)


def check_model(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"--model {name!r} is not a timm model.{hint}")


# PAPA's per-member regularisation (Jolicoeur-Martineau et al., 2023): each member of the
# population trains with its own mixup strength and label smoothing.
MIXUP_ALPHAS = (0.0, 0.5, 1.0)
SMOOTHINGS = (0.0, 0.05, 0.1)


@dataclass(frozen=True)
class MemberDraws:
    """One lane's regularisation: mixup's Beta(alpha, alpha) (0: none) and label smoothing."""

    mixup: float
    smoothing: float

    @classmethod
    def of(cls, seed: int, lane: int) -> MemberDraws:
        """The lane's draw, from (seed, lane) alone (a baseline of the lane draws the same)."""
        g = torch.Generator().manual_seed(_seed(seed, 4, lane))
        pick = torch.randint(0, len(MIXUP_ALPHAS) * len(SMOOTHINGS), (1,), generator=g).item()
        return cls(MIXUP_ALPHAS[pick // len(SMOOTHINGS)], SMOOTHINGS[pick % len(SMOOTHINGS)])

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Mix the batch (drawing from torch's generator: the lane's stream) and return the
        loss of the logits on it."""
        smoothing = self.smoothing
        if self.mixup <= 0:
            return lambda logits: F.cross_entropy(logits, y, label_smoothing=smoothing)
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        perm = torch.randperm(x.shape[0], device=x.device)
        partner = x[perm]  # a copy: x is mixed in place below
        x.mul_(lam).add_(partner, alpha=1 - lam)
        return lambda logits: (
            lam * F.cross_entropy(logits, y, label_smoothing=smoothing)
            + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=smoothing)
        )


def build_nets(
    cfg: TrainConfig, spec: DataSpec, device: torch.device, lanes: Sequence[int]
) -> list[Net]:
    """The networks of ``lanes``: a grafted peer per lane, plus its baseline with ``--baseline``.

    Each lane's initial weights depend only on (seed, lane), never on which other lanes this
    process builds; with ``--same-init`` every lane takes lane 0's. Optimizers are timm's
    (``create_optimizer_v2``), not yet wrapped. Without rounds (``--no-graft``) the first
    network of a lane is named ``peer{lane}``.
    """
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    nets = []
    for lane in lanes:
        torch.manual_seed(_seed(cfg.seed, 2, 0 if cfg.same_init else lane))
        model = timm.create_model(
            cfg.model, pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_chans
        )
        model.to(device=device, memory_format=memory)
        lr = diverse_lr(cfg.lr, lane, cfg.peers) if cfg.diverse_lr else cfg.lr
        draws = MemberDraws.of(cfg.seed, lane) if cfg.member_draws else None
        models = [(True, model)] + ([(False, copy.deepcopy(model))] if cfg.baseline else [])
        for grafted, m in models:
            opt = create_optimizer_v2(
                m, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
            )
            net = Net("", lane, grafted, m, opt, lr, peer=not cfg.graft, draws=draws)
            net.name = f"{net.kind}{lane}"
            nets.append(net)
    return nets


def attach_averages(nets: Sequence[Net], cfg: TrainConfig) -> None:
    """Give each network the weight averages users keep beside it: timm's EMA (as timm's
    ``train.py --model-ema``) and torch's SWA (``swa_utils.AveragedModel``)."""
    for net in nets:
        if cfg.model_ema:
            net.ema = ModelEmaV3(net.model, decay=cfg.model_ema, use_warmup=cfg.model_ema_warmup)
        if cfg.swa_start is not None:
            net.swa = AveragedModel(net.model)


def replica_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    replicas: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """Gradients of ``replicas`` data-parallel replicas of ``model``, one process standing in
    for DDP: each replica takes an equal chunk of the batch (its norm layers see that chunk
    alone), the gradients are their mean, and the running statistics are replica 0's, which
    DDP broadcasts before every forward. Returns the mean loss (detached)."""
    saved: list[torch.Tensor] = []
    total = torch.zeros((), device=x.device)
    for j, (xc, yc) in enumerate(zip(x.chunk(replicas), y.chunk(replicas), strict=True)):
        if j == 1:
            saved = [b.detach().clone() for b in model.buffers()]
        with autocast():
            loss = F.cross_entropy(model(xc), yc) / replicas
        loss.backward()
        total += loss.detach().float()
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    return total


@torch.no_grad()
def check_input_size(
    model: nn.Module, cfg: TrainConfig, spec: DataSpec, device: torch.device
) -> None:
    """Refuse, before training, a model that does not take the data's images (a fixed input
    size, such as a ViT's), naming ``--img-size``. One forward pass in eval mode: no norm
    statistic moves and no random number is drawn."""
    x = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size, device=device)
    was = model.training
    model.eval()
    try:
        model(x)
    except (RuntimeError, AssertionError, ValueError) as e:
        size = getattr(model, "pretrained_cfg", {}).get("input_size")
        hint = f" (its default input is {'x'.join(map(str, size))})" if size else ""
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"--model {cfg.model} does not take {spec.in_chans}x{spec.img_size}x{spec.img_size} "
            f"images: {first}. Give --img-size to resize the data{hint}"
        ) from None
    finally:
        model.train(was)


def norm_batches(spec: DataSpec, cfg: TrainConfig, count: int, *words: int) -> list[torch.Tensor]:
    """``count`` batches of training images (no augmentation), a function of ``words`` only.

    What norm statistics are re-estimated from: drawn from a generator of their own, so neither
    the lanes' random streams nor their data orders move, and a resumed run reads the same.
    """
    ds = spec.train
    n = min(len(ds), count * cfg.batch_size)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(_seed(cfg.seed, *words))
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()  # type: ignore[arg-type]
    images = [spec.eval_transform(ds[i][0]) for i in idx]
    return [torch.stack(images[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]


def attach_grafting(
    nets: Sequence[Net],
    cfg: TrainConfig,
    every: int,
    world: World = ONE_PROCESS,
    spec: DataSpec | None = None,
) -> None:
    """Wrap the grafted networks' optimizers in the paper's ring (network i grafts from i-1).

    In one process the ring is :func:`graftopt.ring`; under torchrun it runs over the ranks
    (:class:`graftopt.distributed.RingPeers`), with the same math. Baselines are never wrapped.
    With ``--graft-recalibrate N`` (which needs ``spec``) each grafted network re-estimates
    its norm statistics from N batches of its lane after every round.
    """
    if not cfg.graft:
        return
    settings = {**GraftSettings(**cfg.round_settings(every)).keywords(), "history": 0}
    del settings["every"]
    grafted = [n for n in nets if n.grafted]

    def recalibration(net: Net) -> graftopt.Recalibration | None:
        if not cfg.graft_recalibrate:
            return None
        if spec is None:
            raise ValueError("--graft-recalibrate needs the data: pass spec to attach_grafting")
        count = cfg.graft_recalibrate

        def data(r: int) -> list[torch.Tensor]:
            return norm_batches(spec, cfg, count, 5, net.lane, r)

        return graftopt.Recalibration(data, count)

    opts = world.graft([n.model for n in grafted], [n.optimizer for n in grafted], every, settings)
    for net, opt in zip(grafted, opts, strict=True):
        net.optimizer = opt
        opt.recalibrate = recalibration(net)


def attach_schedulers(nets: Sequence[Net], cfg: TrainConfig, steps: int) -> None:
    for net in nets:
        net.scheduler, _ = create_scheduler_v2(
            net.optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            decay_epochs=cfg.decay_epochs,
            decay_rate=cfg.decay_rate,
            min_lr=cfg.min_lr,
            warmup_epochs=cfg.warmup_epochs,
            # Per-iteration schedules, as the paper's cosine annealing per iteration.
            step_on_epochs=False,
            updates_per_epoch=steps,
        )


def _autocast(device: torch.device, amp: bool) -> Callable[[], contextlib.AbstractContextManager]:
    if not amp:
        return contextlib.nullcontext
    # bfloat16 needs no GradScaler: a scaler skips optimizer steps on overflow, and one peer
    # skipping a step would break the lockstep that graft rounds rely on.
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp uses bfloat16, which this GPU does not support; drop --amp")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class LaneRandom:
    """One lane's stream of torch's global generator (CPU, and CUDA on a GPU) for one epoch.

    Random crops and flips (with ``--workers 0``) and dropout draw from torch's global
    generator. Lanes interleaved in one process would share it, so a lane's draws would depend
    on which lanes the process holds; swapping in the lane's own stream around its work makes a
    lane draw the same numbers alone on a rank as beside the others in one process.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = (
            torch.Generator(device).manual_seed(seed).get_state()
            if self.device is not None
            else None
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(outer)
            if self.device is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)


def train_epoch(
    nets: Sequence[Net],
    loaders: Sequence[Any],
    epoch: int,
    steps: int,
    cfg: TrainConfig,
    device: torch.device,
    progress: Progress,
) -> dict[str, float]:
    """One epoch: per iteration, every network takes one step on its lane's batch.

    ``loaders`` holds one loader per lane of ``nets``, in lane order.
    """
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = _autocast(device, cfg.amp)
    lanes = sorted({n.lane for n in nets})
    by_lane = [[n for n in nets if n.lane == lane] for lane in lanes]
    if len(loaders) != len(lanes):
        raise ValueError(f"train_epoch got {len(loaders)} loaders for {len(lanes)} lanes")
    streams = [LaneRandom(_seed(cfg.seed, 3, lane, epoch), device) for lane in lanes]
    students = [n for n in nets if n.grafted] if cfg.distill_weight > 0 else []
    learns = {id(n) for n in students}
    totals = {n.name: torch.zeros((), device=device) for n in nets}
    step_loss: dict[str, torch.Tensor] = {}
    for net in nets:
        net.model.train()
        net.alphas.clear()
    batches = [iter(loader) for loader in loaders]
    grafting = next((n.optimizer for n in nets if isinstance(n.optimizer, GraftOptimizer)), None)
    for i in range(steps):
        updates = epoch * steps + i + 1
        for it, lane_nets, stream in zip(batches, by_lane, streams, strict=True):
            with stream.active():
                x, y = next(it)  # the lane's augmentation draws happen here (workers=0)
                x = x.to(device, non_blocking=True, memory_format=memory)
                y = y.to(device, non_blocking=True)
                draws = lane_nets[0].draws
                # Drawn once per lane: the lane's baseline trains on the same mixed batch.
                if draws is not None:
                    loss_of = draws.batch(x, y)
                else:
                    loss_of = functools.partial(F.cross_entropy, target=y)
                for net in lane_nets:
                    net.optimizer.zero_grad(set_to_none=True)
                    if cfg.replicas > 1:
                        loss = replica_step(net.model, x, y, cfg.replicas, autocast)
                    else:
                        with autocast():
                            logits = net.model(x)
                            loss = (
                                F.cross_entropy(logits, y) if loss_of is None else loss_of(logits)
                            )
                            if id(net) in learns:
                                teachers = peer_logits([s for s in students if s is not net], x)
                                weight = distill_weight(cfg, updates, steps)
                                loss = loss + weight * distill_loss(logits, teachers, cfg.distill_T)
                        loss.backward()
                    net.optimizer.step()
                    if net.ema is not None:
                        net.ema.update(net.model, step=updates)
                    if net.scheduler is not None:
                        net.scheduler.step_update(num_updates=updates)
                    totals[net.name] += loss.detach().float()
                    step_loss[net.name] = loss.detach()
        progress.batch(i, step_loss, grafting.rounds if grafting is not None else None)
    return {name: float(t) / steps for name, t in totals.items()}


def distill_weight(cfg: TrainConfig, updates: int, steps: int) -> float:
    """The distillation weight at optimizer update ``updates`` (from 1) of epochs of ``steps``:
    ramped linearly over ``cfg.distill_warmup`` epochs."""
    ramp = cfg.distill_warmup * steps
    return cfg.distill_weight * (1.0 if ramp <= 0 else min(1.0, updates / ramp))


def distill_loss(logits: torch.Tensor, teachers: Sequence[torch.Tensor], T: float) -> torch.Tensor:
    """Deep mutual learning's term: ``T^2`` times the mean over peers of
    ``KL(softmax(peer / T) || softmax(logits / T))``, per sample (the peers' logits are targets).
    """
    log_p = F.log_softmax(logits.float() / T, dim=1)
    terms = [
        F.kl_div(log_p, F.log_softmax(t.float() / T, dim=1), reduction="batchmean", log_target=True)
        for t in teachers
    ]
    return (T * T) * torch.stack(terms).mean()


@torch.no_grad()
def peer_logits(peers: Sequence[Net], x: torch.Tensor) -> list[torch.Tensor]:
    """The peers' predictions on ``x`` as targets: in train mode, as in their own steps, with
    their norm statistics left as they are."""
    out = []
    for p in peers:
        with frozen_norm_statistics(p.model):
            out.append(p.model(x).detach())
    return out


@torch.inference_mode()
def evaluate(
    nets: Sequence[Net],
    loader: Any,
    cfg: TrainConfig,
    device: torch.device,
    world: World = ONE_PROCESS,
) -> dict[str, tuple[float, float]]:
    """Top-1 and top-5 (%) of each network and of the ensembles (mean softmax) per kind.

    Under torchrun the ensembles take every rank's probabilities (gathered per batch, in lane
    order, as the one-process run stacks them), so every rank gets the same ensemble figures.
    """
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = _autocast(device, cfg.amp)
    for net in nets:
        net.model.eval()
    kinds = {kind: [n for n in nets if n.kind == kind] for kind in ("grafted", "peer", "baseline")}
    names = [n.name for n in nets] + [f"ensemble_{k}" for k, members in kinds.items() if members]
    correct = {name: torch.zeros(2, device=device) for name in names}
    seen = 0
    for x, y in loader:
        x, y = x.to(device, memory_format=memory), y.to(device)
        probs: dict[str, torch.Tensor] = {}
        for net in nets:
            with autocast():
                logits = net.model(x).float()
            correct[net.name] += _correct(logits, y)
            probs[net.name] = logits.softmax(dim=1)
        for kind, members in kinds.items():
            if members:
                stacked = torch.stack([probs[n.name] for n in members])
                mean = world.gather_lanes(stacked).mean(0)
                correct[f"ensemble_{kind}"] += _correct(mean, y)
        seen += len(y)
    return {name: tuple((100.0 * c / seen).tolist()) for name, c in correct.items()}  # type: ignore[misc]


def soup(models: Sequence[nn.Module], states: Sequence[dict] | None = None) -> nn.Module:
    """A copy of ``models[0]`` holding the plain mean of the models' floating-point tensors
    (integer buffers, such as batch counts, are the first model's); ``states``: the state
    dicts to average instead of the models' own."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models] if states is None else list(states)
    mean = {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
        if v.is_floating_point()
        else v
        for k, v in states[0].items()
    }
    out.load_state_dict(mean)
    return out


def matched_states(model: nn.Module, states: Sequence[dict]) -> list[dict]:
    """``states`` with every network's filters put in the first's order (weight matching), so
    that their mean averages like with like; the networks' functions are unchanged."""
    spaces = channel_spaces(model)
    first = states[0]
    return [first] + [matched(spaces, first, sd) for sd in states[1:]]


def evaluate_soups(
    nets: Sequence[Net],
    loader: Any,
    cfg: TrainConfig,
    device: torch.device,
    spec: DataSpec,
    world: World = ONE_PROCESS,
) -> dict[str, tuple[float, float]]:
    """Top-1 and top-5 (%) of the soup of each kind of two or more networks, its norm
    statistics re-estimated from ``--soup-recalibrate`` training batches (0: kept as mixed).
    With ``--graft-align`` the grafted networks' filters are matched to the first's before
    they are averaged.

    Under torchrun every rank gathers every lane's weights (in lane order, on the CPU) and
    computes the same soups as one process does.
    """
    kinds = {k: [n for n in nets if n.kind == k] for k in ("grafted", "peer", "baseline")}
    states: dict[str, list[dict]] = {
        k: [{n: t.cpu() for n, t in m.model.state_dict().items()} for m in members]
        for k, members in kinds.items()
    }
    gathered = world.all_gather(states)
    states = {k: [sd for part in gathered for sd in part[k]] for k in states}
    soups = {}
    for kind, members in kinds.items():
        if len(states[kind]) < 2 or not members:
            continue
        if cfg.graft_align and kind == "grafted":
            states[kind] = matched_states(members[0].model, states[kind])
        model = soup(
            [members[0].model], [{n: t.to(device) for n, t in sd.items()} for sd in states[kind]]
        )
        if cfg.soup_recalibrate:
            recalibrate_norms(model, norm_batches(spec, cfg, cfg.soup_recalibrate, 6))
        soups[f"soup_{kind}"] = Net(f"soup_{kind}", -1, False, model, members[0].optimizer, 0.0)
    if not soups:
        return {}
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = _autocast(device, cfg.amp)
    correct = {name: torch.zeros(2, device=device) for name in soups}
    seen = 0
    with torch.inference_mode():
        for net in soups.values():
            net.model.eval()
        for x, y in loader:
            x, y = x.to(device, memory_format=memory), y.to(device)
            for name, net in soups.items():
                with autocast():
                    correct[name] += _correct(net.model(x).float(), y)
            seen += len(y)
    return {name: tuple((100.0 * c / seen).tolist()) for name, c in correct.items()}  # type: ignore[misc]


def _correct(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hits = top == target.unsqueeze(1)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()


def _net_rows(
    nets: Sequence[Net], epoch: int, losses: dict[str, float], acc: dict[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    rows = []
    for net in nets:
        coarse, fine = invalid_filters(net.model, 0.1), invalid_filters(net.model, 0.01)
        # An EMA or SWA view shares its network's optimizer but makes no rounds itself.
        grafting = net.optimizer if not net.average else None
        grafting = grafting if isinstance(grafting, GraftOptimizer) else None
        rows.append(
            {
                "epoch": epoch + 1,
                "network": net.name,
                "kind": net.kind,
                "lane": net.lane,
                "lr": net.optimizer.param_groups[0]["lr"],
                "train_loss": losses.get(net.name),
                "top1": acc[net.name][0],
                "top5": acc[net.name][1],
                "graft_rounds": grafting.rounds if grafting else None,
                "mean_alpha": sum(net.alphas) / len(net.alphas) if net.alphas else None,
                "invalid_0.1": coarse.invalid,
                "invalid_0.01": fine.invalid,
                "filters": coarse.total,
            }
        )
    for name, (top1, top5) in acc.items():
        if name.startswith(("ensemble_", "soup_")):
            rows.append(
                {
                    "epoch": epoch + 1,
                    "network": name,
                    "kind": name.split("_")[0],
                    "top1": top1,
                    "top5": top5,
                }
            )
    return rows


def default_output(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = cfg.dataset.replace("/", "-") or "folder"
    return Path("output") / "train" / f"{stamp}-{cfg.model}-{data}-k{cfg.peers}"


def recipe_line(cfg: TrainConfig, spec: DataSpec, steps: int, every: int) -> str:
    """The whole recipe on one line, printed at the start of every run."""
    if cfg.diverse_lr:
        lr = "diverse " + "/".join(
            f"{diverse_lr(cfg.lr, i, cfg.peers):.4g}" for i in range(cfg.peers)
        )
    else:
        lr = f"{cfg.lr}"
    kind = "grafted peers" if cfg.graft else "peers without rounds"
    nets = f"{cfg.peers} {kind}" + (f" + {cfg.peers} baselines" if cfg.baseline else "")
    extras = [
        f"rate {cfg.graft_rate}" + (" x lr" if cfg.graft_rate_lr else ""),
        f"start {cfg.graft_start}",
        f"recalibrate {cfg.graft_recalibrate}",
        f"optimizer state {cfg.graft_optimizer_state}",
    ]
    if cfg.same_init:
        extras.append("same init")
    if cfg.graft_align:
        extras.append("filters matched")
    if cfg.distill_weight:
        extras.append(f"distill {cfg.distill_weight} T={cfg.distill_T}")
    if cfg.member_draws:
        draws = [MemberDraws.of(cfg.seed, lane) for lane in range(cfg.peers)]
        extras.append(
            "member draws " + "/".join(f"mixup {d.mixup} ls {d.smoothing}" for d in draws)
        )
    shape = f"{spec.in_chans}x{spec.img_size}x{spec.img_size}"
    sizes = f"{len(spec.train)} train / {len(spec.val)} val images"  # type: ignore[arg-type]
    return (
        f"recipe: {cfg.model} on {cfg.dataset or 'folder'} ({sizes}, {shape}, "
        f"{spec.num_classes} classes); {nets}; {cfg.epochs} epochs x {steps} steps, "
        f"batch {cfg.batch_size}, {cfg.opt} lr {lr} momentum {cfg.momentum} "
        f"wd {cfg.weight_decay}, sched {cfg.sched} (per step), "
        f"aug {'none' if cfg.no_aug else 'crop+flip'}; graft every {every} steps, "
        f"A={cfg.graft_A} c={cfg.graft_c} bins={cfg.graft_bins} level={cfg.graft_level} "
        f"criterion={cfg.graft_criterion} {' '.join(extras)}; seed {cfg.seed}"
    )


def train(
    cfg: TrainConfig,
    progress: Progress | None = None,
    resume_state: dict[str, Any] | None = None,
    ctx: DistributedContext | None = None,
) -> RunResult:
    """Run (or continue) a training run and write its outputs under ``cfg.output``.

    The output folder is locked for the run (``runlock``): a second run on it is refused.
    """
    try:
        return _train(cfg, progress, resume_state, ctx)
    finally:
        if cfg.output is not None:
            runlock.release(Path(cfg.output))


def _train(
    cfg: TrainConfig,
    progress: Progress | None,
    resume_state: dict[str, Any] | None,
    ctx: DistributedContext | None,
) -> RunResult:
    """The body of :func:`train`.

    Writes ``config.json``, ``metrics.csv`` (one row per network and epoch), ``alphas.csv``
    (per round, network and unit), ``checkpoint.pth`` after every epoch, and at the end
    ``summary.md`` / ``summary.json`` with the comparison table.

    With ``ctx`` (a process of a ``torchrun`` job, one peer per rank) this rank trains lane
    ``ctx.peer`` only and saves ``checkpoint-rank{r}-epoch{e}.pth``, keeping the previous epoch's
    file until every rank holds the new one (``resume_state`` is one of them); rank 0 writes
    everything else from rows gathered from all ranks. Every rank returns the same summary.
    """
    cfg.validate()
    check_model(cfg.model)
    world = world_of(ctx)
    world.check(cfg)
    lead = world.lead
    if progress is None:
        progress = Progress(cfg.progress if lead else "off", cfg.log_interval)
    # One folder for all ranks, named by rank 0's clock.
    out = Path(world.broadcast(cfg.output or str(default_output(cfg))))
    cfg.output = str(out)

    def prepare() -> tuple[torch.device, DataSpec]:
        # Before anything is written; torchrun's ranks are one run, under the lead's lock.
        note = runlock.acquire(out) if lead else None
        if note is not None:
            progress.write(f"note: {out}: {note}")
        if resume_state is None and _holds_run(out):
            raise ValueError(
                f"{out} already holds a run: continue it with --resume {out}, "
                "or choose another --output"
            )
        if resume_state is not None:
            world.check_resumed(resume_state)
        _check_writable(out)
        # What a killed write left behind: each rank its own checkpoint, the lead the rest.
        remove_stale_writes(out, world.own_checkpoints() + (_LEAD_FILES if lead else []))
        device = world.device(cfg.device)
        pretrained = timm.models.get_pretrained_cfg(cfg.model)
        return device, build_data(cfg, pretrained.to_dict() if pretrained is not None else {})

    # A rank that fails here alone (its data or checkpoint missing) makes every rank fail.
    device, spec = world.agree(prepare)
    if resume_state is not None and "data" in resume_state:
        _check_same_data(resume_state["data"], data_fingerprint(spec))
    random_seed(cfg.seed)
    steps = len(spec.train) // cfg.batch_size  # type: ignore[arg-type]
    if steps == 0:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is larger than the training set "
            f"({len(spec.train)} images): no full batch, no step; lower -b"  # type: ignore[arg-type]
        )
    every = cfg.graft_every or steps
    lanes = world.lanes(cfg)
    nets = build_nets(cfg, spec, device, lanes)
    check_input_size(nets[0].model, cfg, spec, device)
    attach_averages(nets, cfg)
    attach_grafting(nets, cfg, every, world, spec)
    attach_schedulers(nets, cfg, steps)

    epoch0, rows, alpha_rows = 0, [], []
    if resume_state is not None:
        epoch0, rows, alpha_rows = world.agree(lambda: _restore(nets, resume_state))
    world.check_epoch(epoch0)
    if lead and resume_state is not None:
        # The CSVs of a run killed after its last checkpoint may hold an epoch more.
        write_csv(out / "metrics.csv", METRIC_FIELDS, rows)
        write_csv(out / "alphas.csv", ALPHA_FIELDS, alpha_rows)
    current = {"epoch": epoch0}
    new_alphas: list[dict[str, Any]] = []  # this epoch's rows of this process

    def on_round(net: Net) -> Callable[[RoundRecord], None]:
        def record(rec: RoundRecord) -> None:
            units = rec.unit_alphas()
            net.alphas.append(sum(units.values()) / len(units))
            new_alphas.extend(
                {
                    "epoch": current["epoch"] + 1,
                    "network": net.name,
                    "round": rec.round,
                    "step": rec.step,
                    "unit": u,
                    "alpha": a,
                }
                for u, a in units.items()
            )

        return record

    for net in nets:
        if isinstance(net.optimizer, GraftOptimizer):
            net.optimizer.callback = on_round(net)

    out.mkdir(parents=True, exist_ok=True)
    if lead:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    progress.write(recipe_line(cfg, spec, steps, every))
    if cfg.graft and cfg.epochs * steps < max(every, cfg.graft_start):
        progress.write(
            f"warning: no graft round will run: {cfg.epochs} epochs x {steps} steps = "
            f"{cfg.epochs * steps} steps, fewer than --graft-every {every} (and --graft-start "
            f"{cfg.graft_start}); lower --graft-every or train longer"
        )
    about = world.describe(device)
    if about is not None:
        progress.write(about)
    progress.write(f"output: {out}")
    if cfg.graft and device.type == "cpu" and cpu_kernels.needs_build():
        progress.write(
            "building graftopt's CPU kernels (once, several seconds; "
            "python -m graftopt.kernels build does it ahead of time)"
        )
        cpu_kernels.library()
    val = eval_loader(spec, cfg)
    stop = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, epoch0 + cfg.stop_after)
    progress.start(epoch0, cfg.epochs)
    swa_batches: dict[int, list[torch.Tensor]] = {}
    try:
        for epoch in range(epoch0, stop):
            current["epoch"] = epoch
            start = time.perf_counter()
            progress.start_epoch(epoch, steps)
            loaders = [
                train_loader(spec, cfg, 0 if cfg.same_data_order else lane, epoch) for lane in lanes
            ]
            losses = train_epoch(nets, loaders, epoch, steps, cfg, device, progress)
            swa_ready = cfg.swa_start is not None and epoch + 1 > cfg.swa_start
            for net in nets:
                if swa_ready and net.swa is not None:
                    net.swa.update_parameters(net.model)
                    # The average's own norm statistics, as swa_utils.update_bn gives them,
                    # from batches that depend on the lane only: drawn once per lane.
                    if net.lane not in swa_batches:
                        count = cfg.soup_recalibrate or 20
                        swa_batches[net.lane] = norm_batches(spec, cfg, count, 7, net.lane)
                    recalibrate_norms(net.swa.module, swa_batches[net.lane])
            evaluated = list(nets) + [v for n in nets for v in n.averages(swa_ready)]
            acc = evaluate(evaluated, val, cfg, device, world)
            if epoch + 1 == cfg.epochs:
                # The one model to ship: each kind's soup, after the last round.
                acc.update(evaluate_soups(nets, val, cfg, device, spec, world))
            epoch_rows = _net_rows(evaluated, epoch, losses, acc)
            epoch_alphas = list(new_alphas)
            new_alphas.clear()
            epoch_rows, epoch_alphas = world.merge(epoch_rows, epoch_alphas)
            rows.extend(epoch_rows)
            alpha_rows.extend(epoch_alphas)
            # The checkpoints first: the CSVs never run ahead of what a resume starts from.
            state = _checkpoint_state(cfg, spec, nets, epoch + 1, rows, alpha_rows, world)
            world.save(out, state, epoch + 1)
            if lead:
                write_csv(out / "metrics.csv", METRIC_FIELDS, rows)
                write_csv(out / "alphas.csv", ALPHA_FIELDS, alpha_rows)
            line = "  ".join(f"{r['network']} {r['top1']:.2f}" for r in epoch_rows)
            took = time.perf_counter() - start
            progress.end_epoch(f"epoch {epoch + 1}/{cfg.epochs}  top-1: {line}  ({took:.0f}s)")
    finally:
        progress.close()

    done = max(stop, epoch0)
    summary = summarize(rows) if rows else {"networks": {}, "groups": {}}
    table = format_table(summary) if rows else ""
    if table and cfg.graft and cfg.peers == 2 and cfg.graft_rate == 1.0:
        table += (
            "\nAt K = 2 a full round leaves the two grafted networks equal (each one's alpha "
            "against the other is one minus the other's): they are one model, and their "
            "ensemble and soup are that model. For distinct networks use --peers 3 or more, or "
            "--graft-rate below 1.\n"
        )
    complete = done >= cfg.epochs
    if complete and lead:
        atomic_write_text(out / "summary.md", table)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return RunResult(out, done, complete, summary, table)


# Files only the lead (rank 0, or the one process) writes.
_LEAD_FILES = ["config.json", "metrics.csv", "alphas.csv", "summary.md", "summary.json"]


def _check_writable(out: Path) -> None:
    """Refuse, before any training, an output folder that cannot take a file."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {out}: {e.strerror or e}") from None


def data_fingerprint(spec: DataSpec) -> dict[str, int]:
    """What a resume checks of the data, wherever it lives: sizes, classes, image shape."""
    return {
        "train_images": len(spec.train),  # type: ignore[arg-type]
        "val_images": len(spec.val),  # type: ignore[arg-type]
        "classes": spec.num_classes,
        "channels": spec.in_chans,
        "image_size": spec.img_size,
    }


def _check_same_data(saved: dict[str, int], found: dict[str, int]) -> None:
    changed = [
        f"{k} {found.get(k)} (the run had {v})" for k, v in saved.items() if found.get(k) != v
    ]
    if changed:
        raise ValueError(
            "--resume: the data differ from the run's: " + "; ".join(changed) + ". Point "
            "--data-dir at the run's data set (it may move; it may not change)"
        )


def _holds_run(out: Path) -> bool:
    return (out / CHECKPOINT).exists() or bool(rank_files(out))


def _checkpoint_state(
    cfg: TrainConfig,
    spec: DataSpec,
    nets: Sequence[Net],
    epochs: int,
    rows: list,
    alpha_rows: list,
    world: World,
) -> dict[str, Any]:
    where = world.checkpoint_fields()
    return {
        "config": cfg.to_dict(),
        "model_args": {"num_classes": spec.num_classes, "in_chans": spec.in_chans},
        "data": data_fingerprint(spec),
        "epoch": epochs,
        **where,
        "nets": {
            n.name: {
                "model": n.model.state_dict(),
                "optimizer": n.optimizer.state_dict(),
                "scheduler": n.scheduler.state_dict() if n.scheduler is not None else None,
                "ema": n.ema.state_dict() if n.ema is not None else None,
                "swa": n.swa.state_dict() if n.swa is not None else None,
            }
            for n in nets
        },
        "rng": get_rng_state(),
        # Under torchrun every rank keeps all rows, so any rank's file restores them.
        "rows": rows,
        "alpha_rows": alpha_rows,
    }


def _restore(nets: Sequence[Net], state: dict[str, Any]) -> tuple[int, list, list]:
    saved = state["nets"]
    missing = [n.name for n in nets if n.name not in saved]
    if missing:
        raise ValueError(f"the checkpoint has no state for networks {missing}")
    for net in nets:
        s = saved[net.name]
        net.model.load_state_dict(s["model"])
        net.optimizer.load_state_dict(s["optimizer"])
        if net.scheduler is not None and s["scheduler"] is not None:
            net.scheduler.load_state_dict(s["scheduler"])
        for holder, key in ((net.ema, "ema"), (net.swa, "swa")):
            if holder is not None:
                if s.get(key) is None:
                    raise ValueError(f"the checkpoint has no {key.upper()} of {net.name}")
                holder.load_state_dict(s[key])
    set_rng_state(state["rng"])
    return int(state["epoch"]), list(state["rows"]), list(state["alpha_rows"])
