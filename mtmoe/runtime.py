"""Process-wide defaults every entry point sets before importing torch.

One thread per process is mandatory on small CPU machines (more threads than cores slows CPU training
by up to 100×); hubs are never contacted at run time. A value the user already set is kept.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def configure_process() -> None:
    """Sets the environment defaults above (and DS_ACCELERATOR=cpu on machines without NVIDIA GPUs)."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if os.path.exists("/dev/nvidia0") else "cpu")


def set_torch_threads() -> None:
    """Applies OMP_NUM_THREADS to torch's intra-op pool (torch does not always read it)."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
