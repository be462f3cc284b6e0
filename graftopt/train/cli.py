"""``graftopt`` console script: ``train``, ``report`` and ``inspect``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from graftopt.settings import options

from .config import FLAGS, PRESETS, TrainConfig, merge_resumed

if TYPE_CHECKING:
    from graftopt.distributed import DistributedContext

__all__ = ["COMMANDS", "build_parser", "config_from_args", "main"]

COMMANDS = ("train", "report", "inspect")
_D = TrainConfig()


def _every(text: str) -> int | None:
    return None if text == "epoch" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


class _Defaults(argparse.HelpFormatter):
    """Every option's default, once: none for switches and for defaults taken from the data."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "%(default)" in text or switch or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def _add_round_flags(group: argparse._ArgumentGroup) -> None:
    """The round settings' flags, from the settings schema (graftopt.settings)."""
    for f, option in options():
        if option.flag is None:
            continue
        flag = FLAGS[f.name]
        default = getattr(_D, option.flag)
        if isinstance(f.default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=option.help
            )
        elif f.name == "every":
            text = f"{option.help}, or 'epoch' (once an epoch, as the paper)"
            group.add_argument(flag, type=_every, default=default, help=text)
        else:
            choices = option.allowed()
            kind = str if choices else type(f.default)
            group.add_argument(flag, type=kind, choices=choices, default=default, help=option.help)


def _add_train(sub: argparse._SubParsersAction, defaults: dict) -> None:
    p = sub.add_parser(
        "train",
        help="train K grafted peers (and K baselines) and print the comparison table",
        description="Train K peers with filter grafting, optionally beside K baselines under the "
        "same recipe (same seeds, same data order per index), with timm's models, optimizers, "
        "schedulers and data. Default: cifar_resnet20 on Fashion-MNIST, 2 peers.",
        formatter_class=_Defaults,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=_D.model, help="timm model name (always pretrained=False)")
    g.add_argument(
        "--num-classes", type=_positive_int, default=None, help="taken from the data if not given"
    )
    g.add_argument(
        "--in-chans", type=_positive_int, default=None, help="taken from the data if not given"
    )
    g.add_argument(
        "--img-size", type=_positive_int, default=None, help="taken from the data if not given"
    )
    g.add_argument("--mean", type=float, nargs="+", default=None, help="normalization mean")
    g.add_argument("--std", type=float, nargs="+", default=None, help="normalization std")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=_D.dataset,
        help="torch/fashion_mnist, torch/mnist (IDX files, offline), another timm torch/ name, "
        "or folder ('' too): DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/*",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="dataset root (default for Fashion-MNIST: "
        "/usr/share/datasets/fashion-mnist from the dataset-fashion-mnist package)",
    )
    g.add_argument(
        "--dataset-download",
        action="store_true",
        help="let torchvision download torch/ datasets it cannot find",
    )
    g.add_argument(
        "--train-subset",
        type=_positive_int,
        default=None,
        help="train on a fixed random subset of this many images",
    )
    g.add_argument(
        "--val-subset",
        type=_positive_int,
        default=None,
        help="evaluate on a fixed random subset of this many images",
    )
    g.add_argument("--no-aug", action="store_true", help="no random crop / flip")
    g.add_argument("-j", "--workers", type=int, default=_D.workers, help="data loader processes")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=_positive_int, default=_D.epochs)
    g.add_argument("-b", "--batch-size", type=_positive_int, default=_D.batch_size)
    g.add_argument("--opt", default=_D.opt, help="timm optimizer name")
    g.add_argument("--lr", type=float, default=_D.lr)
    g.add_argument("--momentum", type=float, default=_D.momentum)
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    g.add_argument("--sched", default=_D.sched, help="timm scheduler name (stepped per iteration)")
    g.add_argument("--decay-epochs", type=float, default=_D.decay_epochs, help="for --sched step")
    g.add_argument("--decay-rate", type=float, default=_D.decay_rate, help="for --sched step")
    g.add_argument("--warmup-epochs", type=int, default=_D.warmup_epochs)
    g.add_argument("--min-lr", type=float, default=_D.min_lr)
    g.add_argument("--seed", type=int, default=_D.seed)
    g = p.add_argument_group("grafting")
    g.add_argument("--peers", type=int, default=_D.peers, help="K grafted networks, in a ring")
    g.add_argument(
        "--baseline",
        action="store_true",
        help="also train K networks without grafting under the identical recipe",
    )
    g.add_argument(
        "--graft-preset",
        choices=sorted(PRESETS),
        default=None,
        help="a named round recipe (frequent: the defaults; paper: the authors' rounds; gentle: "
        "half-way blends once an epoch with norm recalibration; papa: population averaging); "
        "flags given explicitly override it",
    )
    g.add_argument(
        "--no-graft",
        dest="graft",
        action="store_false",
        help="train the K peers without rounds (with --distill-weight: mutual distillation alone)",
    )
    _add_round_flags(g)
    g.add_argument(
        "--graft-recalibrate",
        type=int,
        default=_D.graft_recalibrate,
        help="after each round, re-estimate the norm statistics from this many training "
        "batches (0: off)",
    )
    g.add_argument(
        "--same-init",
        action=argparse.BooleanOptionalAction,
        default=_D.same_init,
        help="every peer (and baseline) starts from lane 0's initial weights",
    )
    g.add_argument(
        "--distill-weight",
        type=float,
        default=_D.distill_weight,
        help="weight of mutual distillation: each peer also learns its peers' predictions "
        "(T^2 x mean KL); one process only",
    )
    g.add_argument("--distill-T", type=float, default=_D.distill_T, help="distillation temperature")
    g.add_argument(
        "--distill-warmup",
        type=float,
        default=_D.distill_warmup,
        metavar="EPOCHS",
        help="epochs over which the distillation weight ramps linearly up from 0",
    )
    g.add_argument(
        "--soup-recalibrate",
        type=int,
        default=_D.soup_recalibrate,
        metavar="N",
        help="training batches that re-estimate the final soup's norm statistics (0: none)",
    )
    g.add_argument(
        "--member-draws",
        action="store_true",
        help="each network draws its own mixup alpha (0, 0.5, 1) and label smoothing (0, 0.05, "
        "0.1), as population averaging (PAPA) trains its members; a lane's baseline draws the same",
    )
    g.add_argument(
        "--diverse-lr",
        action="store_true",
        help="network i of K starts at lr*(1+cos(pi*(K-i)/K))/2 (the paper's dlr)",
    )
    g.add_argument(
        "--same-data-order",
        action="store_true",
        help="every peer sees the batches in the same order (default: one order per peer)",
    )
    g = p.add_argument_group("what the same hardware does without grafting")
    g.add_argument(
        "--replicas",
        type=_positive_int,
        default=_D.replicas,
        metavar="D",
        help="train each network as D data-parallel replicas, simulated in one process: the "
        "batch (-b, the global batch) is split into D chunks whose gradients are averaged, as "
        "DDP computes them (default: %(default)s)",
    )
    g.add_argument(
        "--model-ema",
        type=float,
        default=_D.model_ema,
        metavar="DECAY",
        help="keep timm's ModelEmaV3 of each network and evaluate it beside the network "
        "(0: off; default: %(default)s)",
    )
    g.add_argument(
        "--model-ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=_D.model_ema_warmup,
        help="ramp the EMA decay up from 0 (timm's warm-up), needed in runs of a few "
        "thousand steps",
    )
    g.add_argument(
        "--swa-start",
        type=int,
        default=_D.swa_start,
        metavar="EPOCH",
        help="average each network's weights at the end of every epoch after this one "
        "(torch.optim.swa_utils.AveragedModel, norm statistics re-estimated) and evaluate "
        "the average beside it (default: off)",
    )
    g = p.add_argument_group("device")
    g.add_argument("--device", default=_D.device, help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    g.add_argument("--channels-last", action="store_true")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="run folder (default: output/train/<time>-...)")
    g.add_argument("--resume", default=None, help="run folder or checkpoint.pth to continue")
    g.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        help="stop after this many epochs (continue later with --resume)",
    )
    g.add_argument(
        "--log-interval",
        type=_positive_int,
        default=_D.log_interval,
        help="batches between plain progress lines",
    )
    g.add_argument(
        "--progress",
        choices=("auto", "bar", "plain"),
        default=_D.progress,
        help="bars on a terminal, plain lines otherwise",
    )
    g.add_argument("--no-report", action="store_true", help="do not write the plots at the end")
    p.set_defaults(**defaults)
    for action in p._actions:
        if not action.help and action.default not in (None, argparse.SUPPRESS, False):
            action.help = "(default: %(default)s)"


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The ``graftopt`` parser; ``train_defaults`` replaces defaults of ``train`` (a preset)."""
    parser = argparse.ArgumentParser(
        prog="graftopt", description="Filter grafting: training runs, reports and diagnostics."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,report,inspect}")
    _add_train(sub, train_defaults or {})
    r = sub.add_parser("report", help="write PNG plots and print the table of a run folder")
    r.add_argument("run", help="a run folder written by graftopt train")
    r.add_argument("--out", default=None, help="where the PNGs go (default: RUN/plots)")
    i = sub.add_parser("inspect", help="per-layer entropy and invalid filters of a checkpoint")
    i.add_argument("path", help="a run folder, a graftopt checkpoint, or a model state dict file")
    i.add_argument("--network", default=None, help="only this network of a run (e.g. grafted0)")
    i.add_argument("--bins", type=_positive_int, default=10, help="entropy bins")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for key in ("mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """The ``train`` settings (field names) that ``argv`` gives explicitly."""
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "train"
    ]
    given = set()
    for action in train._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                given.add(action.dest)
    return given


def _train(args: argparse.Namespace) -> int:
    from .ranks import USER_ERRORS, start

    cfg = config_from_args(args)
    cfg.validate()  # before joining a job: a bad flag fails the same on every rank
    ctx = start(cfg)  # None unless started by torchrun with 2 or more processes
    if ctx is None:
        return _train_run(args, cfg, None)
    from graftopt.distributed import PeerError

    try:
        code = _train_run(args, cfg, ctx)
    except PeerError as e:
        # The process group is broken now (see docs/distributed.md): report and exit.
        print(f"graftopt train: rank {ctx.rank}: error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        ctx.close()  # every rank raised it (ranks.agree), so leaving together is safe
        print(f"graftopt train: rank {ctx.rank}: error: {e}", file=sys.stderr)
        return 2
    ctx.close()
    return code


def _train_run(args: argparse.Namespace, cfg: TrainConfig, ctx: DistributedContext | None) -> int:
    from .loop import train
    from .world import world_of

    world = world_of(ctx)
    state = None
    if cfg.resume is not None:
        given_output = cfg.output
        folder, state = world.resume(Path(cfg.resume))
        cfg = merge_resumed(state["config"], cfg, getattr(args, "explicit", None))
        cfg.output = given_output or str(folder)
    result = train(cfg, resume_state=state, ctx=ctx)
    if not world.lead:
        return 0  # rank 0 prints the table and writes the plots
    if not result.complete:
        print(
            f"stopped after epoch {result.epochs_done} of {cfg.epochs}; continue with "
            f"{world.launch} --resume {result.output}"
        )
        return 0
    print()
    print(result.table, end="")
    print(f"\nmetrics: {result.output / 'metrics.csv'}  table: {result.output / 'summary.md'}")
    if not args.no_report:
        from .report import MissingMatplotlib, write_plots

        try:
            for path in write_plots(result.output):
                print(f"plot: {path}")
        except MissingMatplotlib as e:
            print(f"no plots: {e}", file=sys.stderr)
    diverged = [n for n, s in result.summary["networks"].items() if s.get("diverged")]
    if diverged:
        print(
            f"graftopt train: error: {', '.join(diverged)} diverged (non-finite training "
            "loss); lower --lr",
            file=sys.stderr,
        )
        return 3
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import report

    print(report(args.run, args.out), end="")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_path

    print(inspect_path(args.path, network=args.network, bins=args.bins), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graftopt`` console script; returns the exit status."""
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()  # the commands
        return 0
    args = parser.parse_args(argv)
    preset = getattr(args, "graft_preset", None)
    if preset is not None:
        # A preset moves the defaults; flags given explicitly parse over them.
        args = build_parser(PRESETS[preset]).parse_args(argv)
    if args.command == "train":
        args.explicit = explicit_flags(sys.argv[1:] if argv is None else list(argv))
    handler = {"train": _train, "report": _report, "inspect": _inspect}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        # Users get the message, not a traceback; the same errors are raised as exceptions
        # by the Python API (graftopt.train.loop.train and friends).
        print(f"graftopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngraftopt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
