"""Communication helpers: one flat buffer per dtype, exchanged point to point or gathered.

Stateless functions over ``torch.distributed`` that work with any backend (gloo moves CPU
tensors, NCCL CUDA ones) and give up after a timeout instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..settings import DEFAULTS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DEFAULT_TIMEOUT", "all_gather_tensors", "exchange_tensors"]

DEFAULT_TIMEOUT = DEFAULTS.timeout
# After its exchange's timeout, the time a rank gives its peers to report (at most the timeout
# itself): a hung peer is named within timeout + min(timeout, REPORT_MARGIN) seconds.
REPORT_MARGIN = 30.0


def _seconds(timeout: float | datetime.timedelta | None) -> float | None:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    return timeout


def _is_member(group: ProcessGroup | None) -> bool:
    return dist.get_rank(group) >= 0


def _comm_device(group: ProcessGroup | None, device: torch.device) -> torch.device:
    """Where a buffer must live for the group's backend: gloo moves CPU tensors, NCCL CUDA ones."""
    backend = str(dist.get_backend(group))
    if device.type == "cuda" and "nccl" in backend:
        return device
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _layout(
    tensors: Sequence[Tensor], group: ProcessGroup | None
) -> list[tuple[torch.dtype, torch.device, list[int]]]:
    """Tensor indices bucketed by dtype, with the buffer device of each bucket."""
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, _comm_device(group, t.device)), []).append(i)
    return [(dtype, device, idx) for (dtype, device), idx in buckets.items()]


def _pack(tensors: Sequence[Tensor], idx: Sequence[int], device: torch.device) -> Tensor:
    return torch.cat([tensors[i].detach().reshape(-1).to(device) for i in idx])


def _unpack(
    buffers: Sequence[Tensor], like: Sequence[Tensor], layout: Sequence[tuple[Any, Any, list[int]]]
) -> list[Tensor]:
    """Views of flat buffers shaped like ``like``, on ``like``'s devices."""
    out: list[Tensor] = [like[0]] * len(like)
    for buf, (_, _, idx) in zip(buffers, layout, strict=True):
        parts = buf.split([like[i].numel() for i in idx])
        for i, part in zip(idx, parts, strict=True):
            out[i] = part.view(like[i].shape).to(like[i].device)
    return out


def _wait(works: Sequence[Any], timeout: float | None) -> None:
    """Wait for every request; a request still running after ``timeout`` s raises."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for w in works:
        if deadline is None:
            w.wait()
            continue
        left = max(deadline - time.monotonic(), 1e-3)
        if w.wait(datetime.timedelta(seconds=left)) is False:
            raise TimeoutError(f"no answer within {timeout:g} s")


def exchange_tensors(
    tensors: Sequence[Tensor],
    dst: int,
    src: int,
    group: ProcessGroup | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> list[Tensor] | None:
    """Send ``tensors`` to group rank ``dst`` and receive same-shaped ones from group rank ``src``.

    One flat buffer per dtype goes each way, in one batch of point-to-point operations, so a
    ring of ranks calling this at once does not deadlock. ``src`` must send tensors of the same
    shapes and dtypes.

    Args:
        tensors: the tensors to send (unchanged).
        dst: group rank to send to.
        src: group rank to receive from.
        group: the process group (default: the world).
        timeout: seconds (or a timedelta) to wait for both directions; ``None`` waits as long as
            the backend does.

    Returns:
        The received tensors, on the devices of ``tensors``; ``None`` on ranks outside ``group``.
    """
    if not _is_member(group):
        return None
    layout = _layout(tensors, group)
    sends = [_pack(tensors, idx, device) for _, device, idx in layout]
    recvs = [torch.empty_like(s) for s in sends]
    if group is not None:  # P2POp takes global ranks
        dst, src = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
    ops = [dist.P2POp(dist.isend, s, dst, group) for s in sends]
    ops += [dist.P2POp(dist.irecv, r, src, group) for r in recvs]
    _wait(dist.batch_isend_irecv(ops), _seconds(timeout))
    return _unpack(recvs, tensors, layout)


def all_gather_tensors(
    tensors: Sequence[Tensor],
    group: ProcessGroup | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> list[list[Tensor]] | None:
    """Every group rank's copy of ``tensors`` (same shapes and dtypes on every rank).

    One ``all_gather`` of a flat buffer per dtype.

    Returns:
        Per group rank (this one included), its tensors on the devices of ``tensors``;
        ``None`` on ranks outside ``group``.
    """
    if not _is_member(group):
        return None
    layout = _layout(tensors, group)
    sends = [_pack(tensors, idx, device) for _, device, idx in layout]
    size = dist.get_world_size(group)
    gathered = [[torch.empty_like(s) for _ in range(size)] for s in sends]
    works = [
        dist.all_gather(out, s, group=group, async_op=True)
        for out, s in zip(gathered, sends, strict=True)
    ]
    _wait(works, _seconds(timeout))
    return [_unpack([out[j] for out in gathered], tensors, layout) for j in range(size)]
