"""Data parallelism over processes with ``torch.distributed``, as ``torchrun`` starts them.

Under ``torchrun --nproc_per_node N`` (or several nodes), :func:`init_from_env` joins the process group (gloo on CPUs,
NCCL when the process has a GPU), and the stages that are data-parallel over images split their work by whole
batches (:func:`batch_shard`): each process computes exactly the batches a single process would compute, in the same
composition, so gathering them (:func:`all_gather_rows`) gives the single process's result. Without a process group
every function is the single-process identity.

Example:
    >>> from vmq_fx import distributed
    >>> distributed.world_size(), distributed.is_main(), distributed.batch_shard(1100, 500)
    (1, True, range(0, 1100))
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["all_gather_objects", "all_gather_rows", "all_reduce_", "all_reduce_sum", "batch_shard", "init_from_env", "is_main", "launched", "rank",
           "shutdown", "world_size"]

log = logging.getLogger(__name__)


_joined = False  # whether init_from_env joined the group (and shutdown leaves it)


def launched() -> bool:
    """Whether this process was started as one of several (``WORLD_SIZE`` > 1, as ``torchrun`` sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _active() -> bool:
    if not launched():  # no torch import in single processes that need none
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), once; returns
    whether this process is one of several.

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but torch has no distributed support, or the group cannot be joined.
    """
    global _joined
    if not launched():
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 (torchrun?) but this torch has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        _joined = True
        log.info("vmq_fx: process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def shutdown() -> None:
    """Leave the process group :func:`init_from_env` joined (no-op otherwise: a group the caller made is theirs)."""
    global _joined
    if _joined and _active():
        import torch.distributed as dist

        dist.destroy_process_group()
    _joined = False


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """Whether this process writes files and reports (rank 0)."""
    return rank() == 0


def batch_shard(n: int, batch_size: int) -> range:
    """The items ``[start, end)`` of ``n`` this process takes: a contiguous run of whole batches of ``batch_size``
    (the batches of one process, dealt out in order), so that every batch is the one a single process would run."""
    if batch_size < 1:
        raise ValueError(f"batch_shard: batch_size must be >= 1, got {batch_size}")
    batches, size, r = -(-n // batch_size), world_size(), rank()
    first, last = batches * r // size, batches * (r + 1) // size
    return range(min(first * batch_size, n), min(last * batch_size, n))


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable: tensors go to the CPU first), in rank order. Without a process group:
    ``[obj]``."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_gather_rows(rows: Tensor | None) -> Tensor:
    """Every process's ``rows`` (its shard's results along dim 0; ``None`` for an empty shard), concatenated in rank
    order on every process. Without a process group: ``rows``."""
    if not _active():
        return rows
    import torch

    return torch.cat([p for p in all_gather_objects(None if rows is None else rows.cpu()) if p is not None])


def all_reduce_(t: Tensor) -> Tensor:
    """``t`` summed over the processes, in place (gloo: a CPU tensor); returns ``t``. Without a process group: ``t``."""
    if _active():
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def all_reduce_sum(values: list[int]) -> list[int]:
    """The element-wise sums of ``values`` over the processes (integer counts). Without a process group: ``values``."""
    if not _active():
        return list(values)
    import torch

    return [int(v) for v in all_reduce_(torch.tensor(values, dtype=torch.int64))]
