"""Lightning's Trainer on CPU with two grafted peers, one per process (tests/test_lightning.py).

python tests/lightning_script.py OUT_DIR [devices]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graftopt
import graftopt.lightning


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )  # fmt: skip
        self.rounds: list[int] = []

    def training_step(self, batch, _index):
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        inner = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        opt = graftopt.lightning.graft_optimizer(inner, self, every=4)
        opt.callback = lambda r: self.rounds.append(
            [r.round, bool(torch.equal(r.host_scores, r.peer_scores[0]))]
        )
        return opt


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,)))
    net = Net()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=graftopt.lightning.peer_strategy(),
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(out),
    )  # fmt: skip
    trainer.fit(net, DataLoader(data, batch_size=8))
    rank = trainer.global_rank
    opt = trainer.optimizers[0]
    state = {k: v.tolist() for k, v in net.state_dict().items() if v.is_floating_point()}
    (out / f"rank{rank}.json").write_text(
        json.dumps({"rounds": net.rounds, "steps": opt.steps, "state": state})
    )
    trainer.save_checkpoint(out / "last.ckpt")


if __name__ == "__main__":
    main()
