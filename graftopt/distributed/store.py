"""The key-value store a peer source reports its rounds through.

A round is all or nothing for a graft group: every rank posts whether it got its peers' data
and reads the others' reports before it writes. Those reports must not travel through the
process group itself (a dead rank would hang the collective that should name it), so they go
through the store that ``init_process_group`` created (torchrun's agent store, or rank 0's
TCP store). ``torch.distributed`` has no public getter for it: this module is the one place
that reaches it, through ``distributed_c10d._get_default_store``, so that a change in torch
breaks here with a clear message rather than deep inside a round.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["source_store"]

# Sources made on one group, counted so that each gets its own keys in the store; every rank
# creates its sources in the same order.
_SOURCES: dict[str, itertools.count] = {}


def _default_store() -> dist.Store:
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no distributed_c10d._get_default_store: "
            "graftopt's peer sources cannot reach the job's store with this torch version"
        )
    return getter()


def source_store(group: ProcessGroup | None) -> dist.PrefixStore:
    """A store of keys private to the next peer source made on ``group`` (``None``: world)."""
    name = (group if group is not None else dist.group.WORLD).group_name
    n = next(_SOURCES.setdefault(name, itertools.count()))
    return dist.PrefixStore(f"graftopt/{name}/{n}/", _default_store())
