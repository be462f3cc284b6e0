"""The recipe of a training run: one dataclass, validated, saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from graftopt.settings import DEFAULTS, check, options

__all__ = [
    "FLAGS",
    "PRESETS",
    "RESUME_OVERRIDES",
    "ROUND_FIELDS",
    "TrainConfig",
    "diverse_lr",
    "merge_resumed",
]

# Settings a resumed run may change without changing its numbers.
# Where the data lives is not part of the recipe: a resume checks what the data is instead
# (the fingerprint saved with every checkpoint).
RESUME_OVERRIDES = frozenset(
    {
        "output",
        "resume",
        "workers",
        "progress",
        "log_interval",
        "stop_after",
        "peer_timeout",
        "data_dir",
    }
)


_D = DEFAULTS
# The round settings the recipe carries: schema name -> TrainConfig field.
ROUND_FIELDS = {f.name: o.flag for f, o in options() if o.flag}
# Their command-line flags, as the train parser declares them.
FLAGS = {name: "--" + flag.replace("_", "-") for name, flag in ROUND_FIELDS.items()}


@dataclass
class TrainConfig:
    """Every setting of ``graftopt train``; field names follow timm's ``train.py`` flags.

    ``None`` means "take it from the data or the model" (classes, channels, image size,
    normalization) or "one epoch" (``graft_every``).
    """

    # model
    model: str = "cifar_resnet20"
    num_classes: int | None = None
    in_chans: int | None = None
    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # data
    dataset: str = "torch/fashion_mnist"
    data_dir: str | None = None
    dataset_download: bool = False
    train_subset: int | None = None
    val_subset: int | None = None
    no_aug: bool = False
    workers: int = 0
    # recipe
    epochs: int = 30
    batch_size: int = 128
    opt: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    decay_epochs: float = 60.0
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    min_lr: float = 0.0
    seed: int = 42
    # grafting
    peers: int = 2
    baseline: bool = False
    # Defaults from docs/accuracy.md: one start for all, the paper's blend every 10 steps
    # (the paper's rounds, once an epoch from independent starts: --graft-preset paper).
    graft_every: int | None = _D.every
    graft_A: float = _D.A
    graft_c: float = _D.c
    graft_bins: int = _D.bins
    graft_level: str = _D.level
    graft_criterion: str = _D.criterion
    graft: bool = True  # False: the K peers train without rounds (with distillation, DML alone)
    graft_rate: float = _D.rate
    graft_rate_lr: bool = _D.rate_by_lr
    graft_start: int = _D.start
    graft_recalibrate: int = 0
    graft_optimizer_state: str = _D.optimizer_state
    same_init: bool = True
    graft_align: bool = _D.align
    distill_weight: float = 0.0
    distill_T: float = 1.0
    # Epochs over which the distillation weight ramps up from 0: at full weight from the first
    # step both peers settle on one confident wrong answer (docs/accuracy.md).
    distill_warmup: float = 1.0
    soup_recalibrate: int = 20
    # PAPA's per-member regularisation: each lane its own mixup alpha and label smoothing.
    member_draws: bool = False
    diverse_lr: bool = False
    same_data_order: bool = False
    peer_timeout: float = _D.timeout  # torchrun: seconds a rank waits for its peers
    # What the same hardware would do without grafting (docs/accuracy.md compares them):
    # each network as D data-parallel replicas, simulated in one process (DDP's gradients).
    replicas: int = 1
    model_ema: float = 0.0  # decay of timm's ModelEmaV3 kept beside each network (0: none)
    # Short runs need the warm-up: a fixed decay near 1 keeps the random start for hundreds
    # of steps.
    model_ema_warmup: bool = True
    swa_start: int | None = None  # epochs before each network's weights are averaged (SWA)
    # device
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    # run
    output: str | None = None
    resume: str | None = None
    stop_after: int | None = None
    log_interval: int = 50
    progress: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        self._validate_sizes()
        self._validate_numbers()

    def _validate_sizes(self) -> None:
        """Counts, sizes and how the networks are laid out."""
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "log_interval": self.log_interval,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        optional_positive = {
            "train_subset": self.train_subset,
            "val_subset": self.val_subset,
            "stop_after": self.stop_after,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
        }
        for name, value in optional_positive.items():
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.peers < (2 if self.graft else 1):
            raise ValueError(
                f"--peers must be >= 2 (grafting needs a peer to graft from; --no-graft "
                f"trains one network with --peers 1), got {self.peers}"
            )
        if self.replicas < 1 or self.batch_size % self.replicas:
            raise ValueError(
                f"--replicas must be >= 1 and divide --batch-size (each replica takes an equal "
                f"share of the batch), got --replicas {self.replicas} with --batch-size "
                f"{self.batch_size}"
            )
        if self.replicas > 1 and (self.distill_weight or self.member_draws):
            raise ValueError(
                "--replicas does not combine with --distill-weight or --member-draws; drop one"
            )
        if not 0.0 <= self.model_ema < 1.0:
            raise ValueError(f"--model-ema is a decay in [0, 1) (0: off), got {self.model_ema}")
        if self.swa_start is not None and not 0 <= self.swa_start < self.epochs:
            raise ValueError(
                f"--swa-start must lie in [0, --epochs) so that at least one epoch is "
                f"averaged, got {self.swa_start} with --epochs {self.epochs}"
            )

    def _validate_numbers(self) -> None:
        """Rates, schedules, the round settings and the normalization."""
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("min_lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}"
                )
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"--warmup-epochs must lie in [0, --epochs), got {self.warmup_epochs} "
                f"with --epochs {self.epochs}"
            )
        # Once an epoch (None) is checked as any valid count.
        problem = check(self.round_settings(every=1 if self.graft_every is None else None), FLAGS)
        if problem:
            raise ValueError(problem)
        if self.graft_recalibrate < 0 or self.soup_recalibrate < 0:
            raise ValueError(
                "--graft-recalibrate and --soup-recalibrate take a batch count >= 0, got "
                f"{self.graft_recalibrate} and {self.soup_recalibrate}"
            )
        if not (math.isfinite(self.distill_weight) and self.distill_weight >= 0):
            raise ValueError(f"--distill-weight must be >= 0, got {self.distill_weight}")
        if not (math.isfinite(self.distill_T) and self.distill_T > 0):
            raise ValueError(f"--distill-T must be > 0, got {self.distill_T}")
        if not (math.isfinite(self.distill_warmup) and self.distill_warmup >= 0):
            raise ValueError(f"--distill-warmup must be >= 0 epochs, got {self.distill_warmup}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, self.in_chans or len(value)):
                raise ValueError(
                    f"--{name} needs 1 or --in-chans ({self.in_chans}) values, got {len(value)}"
                )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and not all(math.isfinite(v) for v in value):
                raise ValueError(f"--{name} values must be finite numbers, got {value}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"--std values must be > 0, got {self.std}")

    def round_settings(self, every: int | None = None) -> dict[str, Any]:
        """The round settings of the recipe by their schema names (``every``: the resolved
        steps between rounds, where ``graft_every`` is ``None``: once an epoch)."""
        values = {name: getattr(self, flag) for name, flag in ROUND_FIELDS.items()}
        values["every"] = self.graft_every if every is None else every
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a saved dict; keys this version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        for key in ("mean", "std"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


# Named round recipes of `graftopt train --graft-preset`; flags given explicitly still win.
# The settings a preset fixes, every one of them, so that presets never mix.
_ROUND_FIELDS = (
    "graft_every",
    "graft_A",
    "graft_rate",
    "graft_rate_lr",
    "graft_start",
    "graft_recalibrate",
    "graft_optimizer_state",
    "same_init",
    "graft_align",
    "distill_weight",
    "distill_warmup",
)
# graftopt train's defaults: one start, the paper's full blend every 10 steps.
_FREQUENT = {name: getattr(TrainConfig(), name) for name in _ROUND_FIELDS}
# The authors' round: one full blend per epoch from independent starts, momentum kept.
_PAPER = {**_FREQUENT, "graft_every": None, "same_init": False}
PRESETS: dict[str, dict[str, Any]] = {
    "frequent": _FREQUENT,
    "paper": _PAPER,
    # One start, half-way blends once an epoch, norm statistics re-estimated from 5 batches.
    "gentle": {
        **_FREQUENT,
        "graft_every": None,
        "graft_rate": 0.5,
        "graft_recalibrate": 5,
    },
    # Population averaging (PAPA) as a graft configuration: equal weights (A = 0), a round
    # every 10 steps moving 1 % of the way, scaled with the learning rate.
    "papa": {
        **_PAPER,
        "graft_A": 0.0,
        "graft_every": 10,
        "graft_rate": 0.01,
        "graft_rate_lr": True,
    },
}


def diverse_lr(lr: float, index: int, k: int) -> float:
    """The per-network initial learning rate of the authors' "dlr" option.

    Network ``i`` of ``k`` (``i = 1..k``, here ``index = i - 1``) starts at
    ``lr * (1 + cos(pi * (k - i) / k)) / 2``: the last network keeps ``lr``.
    """
    i = index + 1
    return lr * (1.0 + math.cos(math.pi * (k - i) / k)) / 2.0


def merge_resumed(
    saved: dict[str, Any], given: TrainConfig, explicit: set[str] | None = None
) -> TrainConfig:
    """The saved recipe, with the settings a resume may change taken from ``given``.

    ``explicit``: the settings given on the command line (field names); without it, a setting
    counts as given when it is not at its default. A given recipe setting that differs from the
    saved one raises ``ValueError`` (continuing under another recipe would not be a resume,
    and a longer ``--epochs`` would not stretch the saved schedule). ``stop_after`` applies to
    this invocation only: it never comes from the saved run.
    """
    default = TrainConfig()
    old = TrainConfig.from_dict(saved)
    old.stop_after = given.stop_after
    clashes = []
    for f in dataclasses.fields(TrainConfig):
        mine, theirs = getattr(given, f.name), getattr(old, f.name)
        named = f.name in explicit if explicit is not None else mine != getattr(default, f.name)
        if not named:
            continue
        if f.name in RESUME_OVERRIDES:
            setattr(old, f.name, mine)
        elif mine != theirs:
            clashes.append(f"--{f.name.replace('_', '-')} {mine} (the run has {theirs})")
    if clashes:
        raise ValueError(
            "--resume continues the saved recipe; these flags differ from it: "
            + "; ".join(clashes)
            + ". Drop them, or start a new run with another --output."
        )
    return old
