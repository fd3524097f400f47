"""Runs a test function in N real gloo processes (torch.multiprocessing spawn) and collects results."""

import os
import pickle

import torch.multiprocessing as mp

from mtmoe.parallel.dist import free_port


def _entry(rank, world, port, fn, args, queue):
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
    # Plain pickle: tensors sent through a multiprocessing queue would point at the dead worker's memory.
    queue.put((rank, pickle.dumps(result)))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Left to interpreter exit, gloo's threads are sometimes torn down while still joinable, and the
        # worker aborts ("terminate called without an active exception") after its result was sent.
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """Calls fn(rank, world, *args) in `world` processes; returns their results ordered by rank."""
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
