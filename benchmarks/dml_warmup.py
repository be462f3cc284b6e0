"""Mutual distillation in a plain two-network loop, outside ``graftopt train``.

Tells whether a collapse under ``--distill-weight`` comes from the method or from graftopt:
two ``cifar_resnet20`` on 4 000 Fashion-MNIST images, 2 epochs, lr 0.1, each network's loss
cross-entropy plus ``weight x`` the distillation term towards the other's detached logits.

    OMP_NUM_THREADS=1 python3 benchmarks/dml_warmup.py ce           # no distillation
    OMP_NUM_THREADS=1 python3 benchmarks/dml_warmup.py full 1.0     # weight 1 from step 0
    OMP_NUM_THREADS=1 python3 benchmarks/dml_warmup.py ramp 1.0     # 0 -> 1 over epoch 1
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

import graftopt.models  # noqa: F401  (registers cifar_resnet20)
from graftopt.train.config import TrainConfig
from graftopt.train.data import build_data, eval_loader, train_loader
from graftopt.train.loop import distill_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("ce", "full", "ramp"))
    p.add_argument("weight", type=float, nargs="?", default=1.0)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig(
        model="cifar_resnet20", in_chans=1, dataset="torch/fashion_mnist", train_subset=4000,
        val_subset=2000, epochs=2, batch_size=128,
    )  # fmt: skip
    nets = [
        timm.create_model("cifar_resnet20", pretrained=False, in_chans=1, num_classes=10)
        for _ in range(2)
    ]
    spec = build_data(cfg, nets[0].pretrained_cfg)
    opts = [
        torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        for n in nets
    ]
    step, steps_per_epoch = 0, -(-4000 // 128)
    for epoch in range(cfg.epochs):
        for n in nets:
            n.train()
        for x, y in train_loader(spec, cfg, 0, epoch):
            outs = [n(x) for n in nets]
            ramp = min(1.0, step / steps_per_epoch) if args.mode == "ramp" else 1.0
            for i, (opt, out) in enumerate(zip(opts, outs, strict=True)):
                loss = F.cross_entropy(out, y)
                if args.mode != "ce":
                    peer = outs[1 - i].detach()
                    loss = loss + args.weight * ramp * distill_loss(out, [peer], 1.0)
                opt.zero_grad()
                loss.backward(retain_graph=i == 0)
                opt.step()
            step += 1
        accs = []
        with torch.no_grad():
            for n in nets:
                n.eval()
                hits = total = 0
                for x, y in eval_loader(spec, cfg):
                    hits += (n(x).argmax(1) == y).sum().item()
                    total += len(y)
                accs.append(round(100 * hits / total, 2))
        print(f"{args.mode} weight {args.weight} epoch {epoch + 1}: top-1 {accs}", flush=True)


if __name__ == "__main__":
    main()
