"""Preemption: SIGTERM or SIGINT asks every rank to finish its step, save a checkpoint and exit cleanly.

The signal only sets a flag. At the end of every step the ranks agree on it with one all-reduce
(MAX), so a signal that reaches only some ranks (or reaches them at different moments) still stops all
of them after the same step.
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Installs the handlers (main thread only) and restores the previous ones on `close`."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a test harness): no handler
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            print(f"[mtmoe] {self.requested}: finishing this step, then saving and exiting", file=sys.stderr)

    def agreed(self) -> bool:
        """True when any rank has received a signal (a collective: every rank calls it each step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Restores the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
