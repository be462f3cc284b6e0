"""A training script shaped like timm's ``train.py``, grafting through :mod:`graftopt.timm`.

Written for the tests: timm's objects in timm's order (``init_distributed_device``,
``random_seed(seed, rank)``, ``ClassificationTask``, ``create_optimizer_v2``, a step scheduler,
``resume_task_checkpoint``, the task's EMA, ``NativeScaler``, mixup, ``--grad-accum-steps``,
``CheckpointSaver`` on the primary rank), far shorter than timm's. The graftopt lines are
marked. Run as ``torchrun --nproc-per-node K -m tests.timm_script --output OUT ...``; each peer
also writes ``final.pt`` (its weights) and ``log.json`` (its rounds and samples) to its folder,
replica ``d > 0`` of a peer (``--replicas D``, ``K * D`` ranks) ``final.replica<d>.pt`` and
``log.replica<d>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from timm import create_model, utils
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import optimizer_kwargs
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import graftopt.models
import graftopt.timm  # graftopt line 1

CLASSES = 3

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="cifar_resnet20")
parser.add_argument("--samples", type=int, default=48)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("-b", "--batch-size", type=int, default=8)
parser.add_argument("--opt", default="sgd")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=5e-4)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output", default="output")
parser.add_argument("--experiment", default="")
parser.add_argument("--resume", default="")
parser.add_argument("--grad-accum-steps", type=int, default=1)
parser.add_argument("--model-ema", action="store_true")
parser.add_argument("--mixup", type=float, default=0.0)
parser.add_argument("--scaler", action="store_true", help="a CPU GradScaler (timm's NativeScaler)")
parser.add_argument("--sync-bn", action="store_true")
parser.add_argument("--graft-start", type=int, default=0)
parser.add_argument("--graft-every", default="epoch")
parser.add_argument("--device", default="cpu")
parser.add_argument("--replicas", type=int, default=1)


def _data(samples: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (samples,), generator=g)
    x = torch.randn(samples, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    device = utils.init_distributed_device(args)
    peers = graftopt.timm.setup(args, replicas=args.replicas)  # graftopt line 2
    utils.random_seed(args.seed, args.rank)

    model = create_model(args.model, num_classes=CLASSES, pretrained=False)
    train_set, val_set = _data(args.samples, 0), _data(24, 1)
    train_set = peers.shard(train_set)  # graftopt line 3 (the data of K x D)
    sampler = DistributedSampler(train_set) if args.distributed else None
    shuffle = torch.Generator()
    loader = DataLoader(
        train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, generator=shuffle
    )
    mixup = Mixup(mixup_alpha=args.mixup, num_classes=CLASSES) if args.mixup > 0 else None
    criterion = SoftTargetCrossEntropy() if mixup is not None else torch.nn.CrossEntropyLoss()
    task = ClassificationTask(model=model, criterion=criterion, device=device, verbose=False)
    model = task.get_trainable_module()

    rounds: list[int] = []
    optimizer = peers.create_optimizer_v2(  # graftopt line 4, and the loader below
        model,
        loader,
        **optimizer_kwargs(cfg=args),
        every=args.graft_every if args.graft_every == "epoch" else int(args.graft_every),
        graft={"start": args.graft_start, "callback": lambda r: rounds.append(r.step)},
    )
    loss_scaler = utils.NativeScaler(device="cpu") if args.scaler else None
    start_epoch = 0
    if args.resume:
        start_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=optimizer, loss_scaler=loss_scaler, log_info=False
        )
    if args.model_ema:
        task.setup_ema(decay=0.9)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.distributed:  # timm's own DDP block, off after setup (it would span the networks)
        task.prepare_distributed(device_ids=None)
        model = task.get_trainable_module()
    model = peers.prepare_distributed(task, device_ids=None)  # graftopt line 5 (DDP of K x D)

    saver = None
    # As timm's script: the primary rank (replica 0 of each peer) makes the folder; the other
    # replicas write their test files there after training.
    output_dir = os.path.join(args.output, args.experiment)
    if utils.is_primary(args):
        output_dir = utils.get_outdir(args.output, args.experiment)
        saver = utils.CheckpointSaver(
            model=model,
            optimizer=optimizer,
            args=args,
            amp_scaler=loss_scaler,
            checkpoint_dir=output_dir,
            recovery_dir=output_dir,
            max_history=1,
            task=task,
        )
    accum = args.grad_accum_steps
    updates_per_epoch = (len(loader) + accum - 1) // accum
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="step",
        num_epochs=args.epochs,
        decay_epochs=1,
        decay_rate=0.5,
        warmup_epochs=0,
        updates_per_epoch=updates_per_epoch,
    )
    if start_epoch:
        scheduler.step(start_epoch)

    suffix = "" if utils.is_primary(args) else f".replica{args.rank}"
    log_path = os.path.join(output_dir, f"log{suffix}.json")
    log = {"rounds": [], "samples": []}
    if args.resume and os.path.exists(log_path):
        with open(log_path) as f:
            log = json.load(f)
    second_order = hasattr(optimizer, "is_second_order") and optimizer.is_second_order
    num_updates = start_epoch * updates_per_epoch
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        shuffle.manual_seed(1000 * args.seed + epoch)  # as set_epoch: the order is per epoch
        model.train()
        seen = 0
        for batch_idx, (x, y) in enumerate(loader):
            need_update = (batch_idx + 1) % accum == 0 or batch_idx + 1 == len(loader)
            seen += len(y)
            if mixup is not None:
                x, y = mixup(x, y)
            loss = task(x, y)["loss"] / accum
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, create_graph=second_order, need_update=need_update)
            else:
                loss.backward(create_graph=second_order)
                if need_update:
                    optimizer.step()
            if not need_update:
                continue
            num_updates += 1
            optimizer.zero_grad()
            task.update_ema(step=num_updates)
            scheduler.step_update(num_updates=num_updates)
        if hasattr(optimizer, "sync_lookahead"):
            optimizer.sync_lookahead()
        scheduler.step(epoch + 1)
        model.eval()
        with torch.no_grad():
            x, y = val_set.tensors
            top1 = (model(x).argmax(1) == y).float().mean().item() * 100
        log["samples"].append(seen)
        if saver is not None:
            saver.save_checkpoint(epoch, metric=top1)
    log["rounds"] += rounds
    log["steps"], log["committed"] = optimizer.steps, optimizer.rounds
    log["seed"] = args.seed
    with open(log_path, "w") as f:
        json.dump(log, f)
    weights = getattr(model, "module", model)  # unwrapped from DDP
    torch.save(weights.state_dict(), os.path.join(output_dir, f"final{suffix}.pt"))


if __name__ == "__main__":
    main()
