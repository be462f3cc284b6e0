"""Checkpoints written atomically, and the random state a resumed run needs to replay exactly."""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT",
    "atomic_write_text",
    "find_checkpoint",
    "find_rank_checkpoint",
    "get_rng_state",
    "load_checkpoint",
    "newest_common_epoch",
    "prune_rank_checkpoints",
    "rank_checkpoint_name",
    "rank_checkpoints",
    "rank_epochs",
    "rank_files",
    "remove_stale_writes",
    "safe_load",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT = "checkpoint.pth"
# 2: every value loads with torch.load(weights_only=True) (the numpy RNG state as a list).
FORMAT = "graftopt-train/2"


def safe_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; a file it refuses, or a corrupt
    or empty one, raises ``ValueError`` saying so. Nothing in a file is ever run: there is no
    unsafe fallback."""
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{p}: the safe loader (torch.load weights_only=True) refuses this file, so it is "
            f"not loaded: it holds objects other than tensors and plain values ({first}). "
            "graftopt never runs code from a file; re-save it as a plain state dict."
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{p} is corrupt, truncated or empty: {e}") from None


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` with the permissions ``open()`` gives (the kernel applies
    the umask: the process's umask is never changed, not even for a moment)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _atomic(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``.

    ``os.replace`` is atomic on POSIX and Windows: a crash leaves either the old file or the
    new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, state dicts, plain values) atomically.

    A write that fails (disk full, quota, read-only folder) raises ``ValueError`` in one line:
    the previous checkpoint is untouched.
    """
    try:
        _atomic(Path(path), lambda f: torch.save({"format": FORMAT, **state}, f))
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as RuntimeError("... failed writing file ...").
        if isinstance(e, RuntimeError) and "writ" not in str(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ValueError(
            f"cannot write the checkpoint {path} ({reason}); the previous checkpoint is kept: "
            "free space and continue with --resume"
        ) from None


# Under torchrun each rank keeps its files of the last epoch that every rank saved, and the
# newer one while it is being written: a job killed while the ranks save resumes from the
# newest epoch that all of them hold.
_RANK_FILE = re.compile(r"checkpoint-rank(\d+)-epoch(\d+)\.pth")


def rank_checkpoint_name(rank: int | str, epoch: int | str) -> str:
    """The checkpoint file of one rank of a ``torchrun`` run after ``epoch`` epochs (``"*"``:
    the glob pattern of all of them)."""
    return f"checkpoint-rank{rank}-epoch{epoch}.pth"


def rank_files(folder: str | os.PathLike[str]) -> dict[int, dict[int, Path]]:
    """The per-rank checkpoints in a run folder: rank -> epoch -> file (empty for one process)."""
    found: dict[int, dict[int, Path]] = {}
    for p in Path(folder).glob(rank_checkpoint_name("*", "*")):
        if m := _RANK_FILE.fullmatch(p.name):
            found.setdefault(int(m[1]), {})[int(m[2])] = p
    return dict(sorted(found.items()))


def rank_epochs(folder: str | os.PathLike[str], rank: int) -> list[int]:
    """The epochs whose checkpoint of ``rank`` is in ``folder``, oldest first."""
    return sorted(rank_files(folder).get(rank, {}))


def newest_common_epoch(per_rank: list[list[int]]) -> int | None:
    """The newest epoch that every rank holds, or None."""
    common = set.intersection(*(set(e) for e in per_rank)) if per_rank else set()
    return max(common) if common else None


def rank_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """The newest set of per-rank checkpoints in which every rank found in ``folder`` has its
    file, by rank (empty when there is none)."""
    files = rank_files(folder)
    epoch = newest_common_epoch([list(f) for f in files.values()])
    return [] if epoch is None else [f[epoch] for f in files.values()]


def prune_rank_checkpoints(folder: str | os.PathLike[str], rank: int, keep: int) -> None:
    """Delete the checkpoints of ``rank`` older than epoch ``keep`` (once every rank holds it)."""
    for epoch, p in rank_files(folder).get(rank, {}).items():
        if epoch < keep:
            p.unlink(missing_ok=True)


def remove_stale_writes(folder: str | os.PathLike[str], names: list[str]) -> list[Path]:
    """Delete the temporary files a killed atomic write of any of ``names`` (glob patterns)
    left in ``folder``; returns them."""
    stale = [p for name in names for p in Path(folder).glob(f".{name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file, else the checkpoint inside the run folder ``path``."""
    p = Path(path)
    if p.is_dir():
        n = len(rank_files(p))
        if not (p / CHECKPOINT).exists() and n:
            raise FileNotFoundError(
                f"{p} holds a run trained by torchrun over {n} processes "
                "(checkpoint-rank*-epoch*.pth): "
                f"resume it with torchrun --nproc-per-node {n} -m graftopt.train --resume {p}"
            )
        p = p / CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}: give a run folder or a {CHECKPOINT} file")
    return p


def find_rank_checkpoint(path: str | os.PathLike[str], rank: int, epoch: int | None) -> Path:
    """The checkpoint of ``rank`` after ``epoch`` epochs (``None``: the newest it holds) in the
    run folder ``path`` (or the folder of the file ``path``)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if (folder / CHECKPOINT).is_file() and not rank_files(folder):
        raise FileNotFoundError(
            f"{folder} holds a run trained in one process ({CHECKPOINT}): resume it without "
            "torchrun (graftopt train --resume ...)"
        )
    held = rank_epochs(folder, rank)
    if epoch is None:
        epoch = held[-1] if held else None
    if epoch is None or not (ckpt := folder / rank_checkpoint_name(rank, epoch)).is_file():
        raise FileNotFoundError(
            f"no checkpoint for rank {rank} after epoch {epoch} in {folder} (it holds epochs "
            f"{held or 'none'}): give the run folder written by the torchrun run (on several "
            "machines, each keeps its ranks' files)"
        )
    return ckpt


def load_checkpoint(
    path: str | os.PathLike[str], rank: int | None = None, epoch: int | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (onto the CPU).

    With ``rank``, the file of that rank of a ``torchrun`` run in the folder ``path``, after
    ``epoch`` epochs (by default the newest this rank holds).
    """
    p = find_checkpoint(path) if rank is None else find_rank_checkpoint(path, rank, epoch)
    state = safe_load(p)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise ValueError(
            f"{p} is not a graftopt train checkpoint of this version (format {found!r}, "
            f"expected {FORMAT})"
        )
    return state


def get_rng_state() -> dict[str, Any]:
    """Every global random state the training loop draws from (augmentation, dropout)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # As plain values, which the safe loader accepts (a numpy array is not one).
        "numpy": _plain_numpy_state(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_numpy_state(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _python_state(state: Any) -> tuple:
    # Saved as a tuple, it may come back with lists inside.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
