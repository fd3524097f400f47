"""Process-group set-up for every launcher: python, torchrun, the deepspeed launcher, accelerate, SLURM."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialises torch.distributed through DeepSpeed, whatever launched this process.

    A plain `python` run becomes a world of one (RANK/WORLD_SIZE/MASTER_* are filled in); SLURM's
    variables are mapped when no launcher set RANK. On CPU the backend is gloo.

    Args:
        backend: `auto`, `nccl` or `gloo`.
    """
    import deepspeed
    import deepspeed.ops

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        # The shared-memory comm op JIT-compiles for ~50 s on first use and training never uses it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=backend)
    return DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=local_rank,
        world_size=int(os.environ["WORLD_SIZE"]),
        backend=backend,
    )


def device_for(info: DistInfo) -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sums a tensor over all ranks (a no-op without a process group); returns a new tensor."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t.clone()
    # NCCL reduces only CUDA tensors; gloo reduces CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.detach().to(device, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)
