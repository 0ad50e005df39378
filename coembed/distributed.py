"""Training on several processes (``torchrun``): the process group, the shard of pairs each process holds, and
embeddings gathered across processes with their gradients, so one contrastive batch spans them all.

A :class:`World` says which process this is among how many. Outside ``torchrun`` it is :data:`SINGLE` (one
process, nothing to share) and every method here does nothing, so the trainer has one code path.

Sharding: process ``r`` of ``W`` holds the training pairs at positions ``r, r + W, r + 2W, ...`` of a pair type
(:meth:`World.shard`). Each epoch every process draws the same permutation of all ``n`` positions, as one
process would, and cuts it into the same global batches of ``train.batch_size``; of each global batch a process
takes the pairs it holds (:func:`shard_batches`). A global batch is therefore the same set of pairs whatever
the number of processes; a process's part of it is about ``batch_size / W`` pairs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd

from coembed.devices import resolve_device

#: How long the other processes wait at a barrier for process 0 (which may be extracting a large data set).
LONG_WAIT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one training run."""

    rank: int = 0
    world_size: int = 1
    #: the process's index on its machine: its GPU
    local_rank: int = 0
    #: a gloo group with a long timeout, for waiting on process 0 (``None`` with one process)
    waiting_group: Any = None

    @property
    def is_main(self) -> bool:
        """Process 0: the one that extracts and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device | str) -> torch.device:
        """The device this process trains on: ``cuda`` (or ``auto`` on a GPU machine) means its own GPU."""
        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, n: int) -> np.ndarray:
        """The positions, among ``n`` training pairs, of those this process holds."""
        return np.arange(self.rank, n, self.world_size, dtype=np.int64)

    # -- collectives (no-ops with one process) -------------------------------------
    def wait_for_main(self) -> None:
        """Every process waits here until all have arrived (process 0 possibly after days of extraction)."""
        if self.distributed:
            dist.barrier(group=self.waiting_group)

    def broadcast_object(self, value: Any) -> Any:
        """Process 0's ``value``, on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite every process's ``tensors`` with process 0's (parameters start equal everywhere)."""
        if self.distributed:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t, src=0)

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``parameters`` over the processes, in one flat all-reduce.

        Each process's gradient is the global loss's through its own block of the batch
        (:class:`coembed.losses.SymmetricInfoNCE`), so the sum is the gradient of the global loss; every process
        then holds it and takes the same optimizer step.
        """
        if not self.distributed:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes (a new tensor)."""
        if not self.distributed:
            return value.clone()
        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def logsumexp(self, values: torch.Tensor) -> torch.Tensor:
        """The log-sum-exp over the processes of each element of ``values`` (the same shape on each)."""
        if not self.distributed:
            return values
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values.contiguous())
        return torch.logsumexp(torch.stack(parts), dim=0)

    def gather_rows(self, rows: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, int]:
        """Every process's ``rows`` stacked in rank order, gradients flowing back to each process's own
        (``counts[r]``: how many rows process ``r`` has, the same list on every process), and where this
        process's rows start in the result."""
        offset = sum(counts[:self.rank])
        if not self.distributed:
            return rows, offset
        width = max(counts)  # all_gather moves tensors of one shape: pad, gather, cut
        padded = torch.nn.functional.pad(rows, (0, 0, 0, width - rows.shape[0]))
        with warnings.catch_warnings():  # open_clip's gather_with_grad uses it too; its successor is private API
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated")
            parts = dist_autograd.all_gather(padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]), offset


#: One process, nothing shared.
SINGLE = World()


def launched_world_size() -> int:
    """How many processes the launcher (``torchrun``) started: ``WORLD_SIZE`` in the environment, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: torch.device | str) -> World:
    """This process's :class:`World`: under ``torchrun`` with more than one process, the default process group
    is set up from the launcher's environment (NCCL when training on CUDA, gloo on the CPU) unless it is
    already; otherwise :data:`SINGLE`."""
    if launched_world_size() <= 1 or not dist.is_available():
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (resolve_device(device) if isinstance(device, str) else torch.device(device)).type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    waiting = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, waiting)


def leave(world: World) -> None:
    """Tear down the process group :func:`join` set up."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class ShardBatches:
    """One epoch of one pair type, cut into global batches, as seen by one process."""

    #: positions in this process's shard of the pairs it takes, batch after batch (on the CPU, or moved to the
    #: training device)
    local: torch.Tensor
    #: where each batch's part starts in ``local`` (one more entry than batches: the end)
    starts: list[int]
    #: per batch, how many of its pairs each process holds
    counts: list[list[int]]

    def __len__(self) -> int:
        return len(self.counts)

    def batch(self, step: int) -> tuple[torch.Tensor, list[int]]:
        """This process's positions in batch ``step`` and every process's count in it."""
        return self.local[self.starts[step]:self.starts[step + 1]], self.counts[step]


def shard_batches(perm: torch.Tensor, batch_size: int, world: World) -> ShardBatches:
    """Global batches ``perm[k * batch_size:(k + 1) * batch_size]`` of positions among all pairs, each cut into the
    parts the processes hold (:meth:`World.shard`): indices into this process's shard."""
    order = perm.cpu().numpy()
    owner = order % world.world_size
    batch_of = np.arange(len(order)) // batch_size
    steps = -(-len(order) // batch_size)
    counts = np.stack([np.bincount(batch_of[owner == r], minlength=steps) for r in range(world.world_size)], axis=1)
    mine = owner == world.rank
    starts = np.concatenate([[0], np.cumsum(counts[:, world.rank])])
    return ShardBatches(torch.from_numpy(order[mine] // world.world_size), starts.tolist(), counts.tolist())
