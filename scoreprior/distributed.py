"""Work split across the processes of a `torch.distributed` group (torchrun, gloo on CPU, NCCL on CUDA).

A run launched with `torchrun --nproc_per_node=N script.py` enters `init_from_env()`; inside it,
`map_sharded(fn, n)` has each rank compute `fn` on its share of the n items and hands the results, in
item order, to rank 0. Without a process group every helper falls back to one process doing all the
work, so the same code runs with and without torchrun.

Results do not depend on the number of processes as long as each item's randomness is seeded from its
index (`item_seed`), never from the rank or from the items done before it on the same rank.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from scoreprior._checks import integer, nonnegative_int, positive_int

__all__ = [
    "ProcessInfo",
    "init_from_env",
    "rank_and_world",
    "item_seed",
    "shard",
    "gather_ordered",
    "map_sharded",
    "broadcast_from_rank0",
]

T = TypeVar("T")
R = TypeVar("R")

# splitmix64's increment (2^64 / golden ratio): odd, so index -> item_seed(seed, index) is one-to-one
# modulo 2^64 and, as its low 32 bits are odd too, modulo 2^32, the part a CPU generator keeps.
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a run: rank in [0, world), world size, and the device it computes on."""

    rank: int
    world: int
    device: torch.device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def init_from_env(device: str | torch.device | None = None) -> Iterator[ProcessInfo]:
    """Initialise the default process group from torchrun's environment for the duration of a block.

    Under torchrun (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT and LOCAL_RANK in the environment) the
    group is created with the NCCL backend for a CUDA device and gloo otherwise, and destroyed on exit.
    A group that is already initialised is used as it is and left alone; outside torchrun nothing is
    initialised and the block runs as rank 0 of 1.

    device: where this process computes (default: "cuda" if available, else "cpu"). A CUDA device
    without an index becomes cuda:LOCAL_RANK, one GPU per process, and is made the current device.
    Yields a `ProcessInfo` (rank, world, device). ValueError when a CUDA device is asked for without CUDA.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device: {str(device)!r} requested, but {why}; use 'cpu'")
    launched = "WORLD_SIZE" in os.environ and not (dist.is_available() and dist.is_initialized())
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched:
        if not dist.is_available():
            raise ValueError("WORLD_SIZE is set (a torchrun launch) but this torch build has no torch.distributed")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield ProcessInfo(*rank_and_world(), device)
        if launched:
            # Every rank leaves the group together: a rank that tears gloo down while a peer still
            # reads from it can abort that peer ("terminate called without an active exception").
            dist.barrier()
    finally:
        if launched:
            dist.destroy_process_group()


def item_seed(seed: int, index: int) -> int:
    """Seed of item `index` in a run seeded with `seed`: (seed + index * 0x9E3779B97F4A7C15) mod 2^64.

    Distinct items get distinct seeds (also in the low 32 bits that a CPU torch.Generator keeps), and
    item 0 keeps `seed` itself, so a run whose work is one item draws what it drew before seeding per item.
    Returns an int in [0, 2^64), accepted by torch.Generator.manual_seed.
    """
    index = nonnegative_int(index, "index")
    return (seed + index * _GOLDEN_GAMMA) % 2**64


def shard(n_items: int, rank: int, world: int) -> list[int]:
    """Indices of the items rank `rank` of `world` handles: rank, rank + world, rank + 2 world, ...

    Every index in range(n_items) lands in exactly one shard, and shard sizes differ by at most one
    (ranks below n_items mod world take the extra item). n_items >= 0, world >= 1, 0 <= rank < world.
    """
    n_items, world = nonnegative_int(n_items, "n_items"), positive_int(world, "world")
    rank = integer(rank, "rank", low=0, high=world - 1)
    return list(range(rank, n_items, world))


def gather_ordered(
    local_results: Sequence[R], indices: Sequence[int], n_items: int, *, to_all: bool = False
) -> list[R] | None:
    """Collect every rank's results into one list ordered by item index.

    local_results[k] is this rank's result for item indices[k]. A collective: every rank of the default
    group calls it (without a group, this process holds all items). Results travel pickled, so they should
    be plain objects or CPU tensors. Rank 0, and every rank if to_all, receives the n_items results in
    index order; the other ranks get None. Raises ValueError on a receiving rank if an index is missing,
    duplicated or outside [0, n_items), or if a rank's results and indices differ in length.
    """
    rank, world = rank_and_world()
    payload = (list(indices), list(local_results))
    if world == 1:
        parts = [payload]
    elif to_all:
        parts = [None] * world
        dist.all_gather_object(parts, payload)
    else:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(payload, parts, dst=0)
    if parts is None:
        return None
    ordered: list = [None] * n_items
    filled = [False] * n_items
    for source, (idx, results) in enumerate(parts):
        if len(idx) != len(results):
            raise ValueError(f"rank {source}: {len(results)} local_results for {len(idx)} indices")
        for i, result in zip(idx, results):
            if not 0 <= i < n_items:
                raise ValueError(f"indices: rank {source} sent item {i}, outside [0, {n_items})")
            if filled[i]:
                raise ValueError(f"indices: item {i} was computed twice (again by rank {source})")
            ordered[i], filled[i] = result, True
    missing = [i for i, done in enumerate(filled) if not done]
    if missing:
        raise ValueError(f"indices: {len(missing)} of {n_items} items missing, first {missing[:10]}")
    return ordered


def map_sharded(
    fn: Callable[[T], R], items: Sequence[T] | int, *, to_all: bool = False, desc: str | None = None
) -> list[R] | None:
    """[fn(item) for item in items], the items split across the ranks of the default process group.

    items: a sequence, or an int n standing for range(n) (fn then receives the index). Rank r computes
    the items `shard(n, r, world)`; rank 0, and every rank if to_all, gets all n results in item order,
    the other ranks None. Without a process group it is a plain loop. For results independent of the
    number of processes, fn must seed any randomness from its item (see `item_seed`). A collective:
    every rank must call it with the same items. desc: label of a progress bar over rank 0's share
    (None: no bar).
    """
    items = range(items) if isinstance(items, int) else items
    rank, world = rank_and_world()
    mine = shard(len(items), rank, world)
    bar = tqdm(mine, desc=desc, disable=desc is None or rank != 0, dynamic_ncols=True)
    return gather_ordered([fn(items[i]) for i in bar], mine, len(items), to_all=to_all)


def broadcast_from_rank0(fn: Callable[[], R]) -> R:
    """Call fn on rank 0 only and return its result on every rank; an exception it raises is raised
    on every rank, so no rank is left waiting. Without a process group: fn(). A collective.

    Use it for work that must happen once, such as reading a file only rank 0 can see; the result
    travels pickled (plain objects, CPU tensors).
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as err:  # re-raised below, on every rank
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
