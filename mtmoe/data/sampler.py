"""Task mixing: which task, and which sample of it, each micro-batch row comes from.

One seeded stream of draws (tasks by the mixing probabilities, samples by a per-task permutation per
epoch) is shared by all ranks; each global micro-batch is cut into one slice per rank, so ranks never
see the same draw. Epochs are counted per task. The whole position is in `state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Draw:
    """One row of a micro-batch: the task's index among the mixed tasks and the sample index."""

    task: int
    index: int


def mixing_probs(
    sizes: list[int], mixing: str, temperature: float, upsample: list[float] | None = None
) -> np.ndarray:
    """Task probabilities: proportional to n, to n^(1/T), or uniform.

    `upsample` multiplies each task's n first (a factor of 2 counts the task as twice its size).

    Raises:
        ValueError: For an unknown mixing or a task without samples (naming `data.mixing`/the task).
    """
    n = np.asarray(sizes, dtype=np.float64) * (
        1.0 if upsample is None else np.asarray(upsample, dtype=np.float64)
    )
    if mixing == "proportional":
        w = n
    elif mixing == "temperature":
        w = n ** (1.0 / temperature)
    elif mixing == "uniform":
        w = np.ones_like(n)
    else:
        raise ValueError(f"config key 'data.mixing': unknown value {mixing!r}")
    return w / w.sum()


class MixingSampler:
    """Draws (task, sample) rows for one rank from one global stream that every rank replays.

    Each global micro-batch is `world * size` consecutive draws of the stream; rank r keeps the r-th
    slice of `size` rows. The stream depends only on the seed, so the rows of a step are the same set
    for any split of the same global batch into ranks and micro-batches (world 4 x 2 rows, or world 1
    x 2 rows x 4 accumulation steps), and the position (`state_dict`) is the same on every rank. That
    is what lets a run resume on a different number of ranks and continue the same data.

    Args:
        sizes: Training samples per task.
        mixing: `proportional`, `temperature` or `uniform`.
        temperature: T for temperature mixing.
        seed: Seed shared by all ranks.
        rank: This rank's index in the data-parallel group.
        world: Data-parallel size.
        upsample: Per-task factors on the size used for mixing (None = all 1).

    Raises:
        ValueError: If a task has no samples.
    """

    def __init__(
        self,
        sizes: list[int],
        mixing: str,
        temperature: float,
        seed: int,
        rank: int,
        world: int,
        upsample: list[float] | None = None,
    ):
        empty = [i for i, n in enumerate(sizes) if n < 1]
        if empty:
            raise ValueError(f"task #{empty[0]} has no training samples")
        self.sizes, self.seed, self.rank, self.world = list(sizes), seed, rank, world
        self.probs = mixing_probs(sizes, mixing, temperature, upsample)
        self.rng = np.random.default_rng(seed)
        self.cursor = [0] * len(sizes)
        self.epoch = [0] * len(sizes)
        self._perm: dict[int, np.ndarray] = {}

    def _permutation(self, task: int) -> np.ndarray:
        perm = self._perm.get(task)
        if perm is None:
            perm = np.random.default_rng([self.seed, task, self.epoch[task]]).permutation(self.sizes[task])
            self._perm[task] = perm
        return perm

    def draw(self) -> Draw:
        """The next row of the global stream."""
        task = int(self.rng.choice(len(self.sizes), p=self.probs))
        index = int(self._permutation(task)[self.cursor[task]])
        self.cursor[task] += 1
        if self.cursor[task] >= self.sizes[task]:
            self.cursor[task], self.epoch[task] = 0, self.epoch[task] + 1
            self._perm.pop(task)
        return Draw(task, index)

    def draw_batch(self, size: int) -> list[Draw]:
        """This rank's `size` rows of the next global micro-batch (`world * size` draws)."""
        rows = [self.draw() for _ in range(size * self.world)]
        return rows[self.rank * size : (self.rank + 1) * size]

    def state_dict(self) -> dict:
        """The stream's position (generator state, per-task cursors and epochs); equal on every rank."""
        return {"rng": self.rng.bit_generator.state, "cursor": list(self.cursor), "epoch": list(self.epoch)}

    def load_state_dict(self, state: dict) -> None:
        """Restores a position saved by `state_dict` (on any rank, for any world size)."""
        self.rng.bit_generator.state = state["rng"]
        self.cursor, self.epoch = list(state["cursor"]), list(state["epoch"])
        self._perm.clear()
