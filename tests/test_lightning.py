"""graftopt.lightning: Lightning's Trainer with one grafted peer per process (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import graftopt.lightning

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_graft_through_lightning_ddp(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lightning_script.py"), str(tmp_path), "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        # 64 images, batch 8, 2 shards: 4 steps an epoch, 2 epochs, a round every 4 steps.
        assert rank["steps"] == 8
        # Each process trained its own network on its shard: the peers differ at the round.
        assert rank["rounds"] == [[1, False], [2, False]]
    # A full round at K = 2 leaves the pair equal (the round came at the last step).
    for name, value in ranks[0]["state"].items():
        assert torch.allclose(torch.tensor(value), torch.tensor(ranks[1]["state"][name])), name
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["optimizer_states"][0]["graft"]["steps"] == 8


def test_one_process_is_refused():
    net = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="devices >= 2"):
        graftopt.lightning.graft_optimizer(torch.optim.SGD(net.parameters(), lr=0.1), net)
    with pytest.raises(ValueError, match="sets \\['ddp_comm_hook'\\] itself"):
        graftopt.lightning.peer_strategy(ddp_comm_hook=print)


def test_a_ring_in_one_lightning_module(tmp_path):
    """K networks in one LightningModule: manual optimization, bf16-mixed, the graft state in
    the checkpoint."""
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import graftopt

    class Pair(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.nets = nn.ModuleList(
                nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)
            )

        def training_step(self, batch, index):
            x, y = batch
            for i, (net, opt) in enumerate(zip(self.nets, self.optimizers(), strict=True)):
                xi = x + 0.1 * i  # each network its own view of the batch
                opt.zero_grad()
                self.manual_backward(nn.functional.cross_entropy(net(xi), y))
                opt.step()

        def configure_optimizers(self):
            inner = [torch.optim.SGD(n.parameters(), lr=0.1) for n in self.nets]
            return graftopt.ring(list(self.nets), inner, every=2)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, precision="bf16-mixed", logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    module = Pair()
    trainer.fit(module, DataLoader(data, batch_size=8))
    opts = [o.optimizer for o in module.optimizers()]
    assert [(o.steps, o.rounds) for o in opts] == [(4, 2), (4, 2)]
    trainer.save_checkpoint(tmp_path / "pair.ckpt")
    ckpt = torch.load(tmp_path / "pair.ckpt", weights_only=False)
    assert [s["graft"]["steps"] for s in ckpt["optimizer_states"]] == [4, 4]
