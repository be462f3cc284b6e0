"""Progress output: tqdm bars on a terminal, plain log lines otherwise (files, CI logs)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Epoch and batch progress of one run.

    Args:
        mode: ``"bar"``, ``"plain"``, ``"auto"`` (bars when ``stream`` is a terminal) or
            ``"off"`` (nothing: the ranks of a torchrun run other than rank 0).
        log_interval: in plain mode, print a batch line every this many batches.
        stream: where bars go; plain lines and messages go to stdout.
    """

    def __init__(
        self, mode: str = "auto", log_interval: int = 50, stream: TextIO | None = None
    ) -> None:
        if mode not in ("auto", "bar", "plain", "off"):
            raise ValueError(f"progress mode must be auto, bar, plain or off, got {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        self.off = mode == "off"
        self.bars = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self.log_interval = log_interval
        self._epochs: tqdm | None = None
        self._batches: tqdm | None = None
        self._epoch = 0
        self._total_epochs = 0
        self._steps = 0

    def start(self, first_epoch: int, total_epochs: int) -> None:
        self._total_epochs = total_epochs
        if self.bars:
            self._epochs = tqdm(
                total=total_epochs, initial=first_epoch, desc="epochs", file=self.stream, position=0
            )

    def start_epoch(self, epoch: int, steps: int) -> None:
        self._epoch, self._steps = epoch, steps
        if self.bars:
            self._batches = tqdm(
                total=steps, desc=f"epoch {epoch + 1}", file=self.stream, position=1, leave=False
            )

    def batch(self, index: int, losses: Mapping[str, Any], rounds: int | None = None) -> None:
        """Report that batch ``index`` (0-based) is done, with each network's loss on it and
        the graft rounds so far.

        Losses may be tensors: they are read (a device sync) only when a line or bar shows them.
        """
        if self.off:
            return
        last = index + 1 == self._steps
        show = (index + 1) % self.log_interval == 0 or last
        if not (show or (self._batches is not None and index == 0)):
            if self._batches is not None:
                self._batches.update(1)
            return
        text = "  ".join(f"{name} {float(v):.3f}" for name, v in losses.items())
        text = f"loss {text}" + (f"  rounds {rounds}" if rounds is not None else "")
        if self._batches is not None:
            self._batches.update(1)
            self._batches.set_postfix_str(text)
        else:
            print(
                f"epoch {self._epoch + 1}/{self._total_epochs}  batch {index + 1}/{self._steps}  "
                + text,
                flush=True,
            )

    def end_epoch(self, line: str) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        if self._epochs is not None:
            self._epochs.update(1)
        self.write(line)

    def write(self, line: str) -> None:
        if self.off:
            return
        if self.bars:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        for bar in (self._batches, self._epochs):
            if bar is not None:
                bar.close()
        self._batches = self._epochs = None
