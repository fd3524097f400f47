"""Runs a function in N local processes that form one gloo world (torch.multiprocessing spawn).

For the tests and benchmarks that need real ranks on one machine: each process gets RANK, LOCAL_RANK,
WORLD_SIZE and MASTER_* as a launcher would set them, calls `fn(rank, world, *args)`, and sends back
what it returns (pickled, so tensors do not point into a dead process's memory).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

from mtmoe.parallel.dist import free_port


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    queue.put((rank, pickle.dumps(result)))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Left to interpreter exit, gloo's threads are sometimes torn down while still joinable, and the
        # worker aborts ("terminate called without an active exception") after its result was sent.
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Calls `fn(rank, world, *args)` in `world` processes; returns their results ordered by rank.

    `fn` must be importable by name (a module-level function). A failing rank raises here.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    context = mp.start_processes(
        _entry, args=(world, free_port(), fn, args, queue), nprocs=world, join=False, start_method="spawn"
    )
    results = {}
    while len(results) < world:  # read while workers run: a full pipe would block a joined worker
        if not queue.empty():
            rank, blob = queue.get()
            results[rank] = pickle.loads(blob)
        elif context.join(timeout=0.1):  # all exited (raises if one failed)
            break
    while not queue.empty():
        rank, blob = queue.get()
        results[rank] = pickle.loads(blob)
    while not context.join():
        pass
    if len(results) < world:
        raise RuntimeError(f"only ranks {sorted(results)} of {world} returned a result")
    return [results[r] for r in range(world)]
