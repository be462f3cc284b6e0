"""One run per output folder: a lock file naming the process and host that hold the folder."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK", "acquire", "release"]

LOCK = ".graftopt-run.lock"


def _me() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or torn: treated as held, the message says where the file is
    return data if isinstance(data, dict) else {}


def acquire(folder: Path) -> str | None:
    """Take ``folder``'s lock for this process, before anything is written there.

    A lock of a live process (or of another host, whose processes cannot be checked) is
    refused with ``ValueError`` naming it; the lock of a dead process on this host is taken
    over, and the note saying so is returned.
    """
    path = folder / LOCK
    note = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                continue  # released meanwhile
            pid, host = holder.get("pid"), holder.get("host")
            mine = host == socket.gethostname()
            if mine and pid == os.getpid():
                return None  # this process holds it already
            if mine and isinstance(pid, int) and not _alive(pid):
                path.unlink(missing_ok=True)
                note = f"took over the lock of process {pid}, which ended without releasing it"
                continue
            since = holder.get("since")
            when = (
                time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
                if isinstance(since, (int, float))
                else ""
            )
            who = f"process {pid} on {host}{when}" if pid is not None else f"the lock {path}"
            raise ValueError(
                f"{folder} is in use by another graftopt run ({who}): wait for it to end, "
                f"choose another --output, or delete {path} if that run is gone"
            ) from None
        except OSError as e:
            raise ValueError(
                f"cannot write to the output folder {folder}: {e.strerror or e}"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_me()) + "\n")
        return note
    raise ValueError(f"cannot take the lock {path}: it keeps changing; is another run starting?")


def release(folder: Path) -> None:
    """Remove ``folder``'s lock if this process holds it."""
    path = folder / LOCK
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
