"""Where metrics go: a console progress bar, `metrics.jsonl` in the run directory, and wandb.

Only rank 0 writes. wandb runs offline unless `WANDB_MODE` or `log.wandb_mode` say otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mtmoe.config import Config, to_dict
from mtmoe.eval.heatmap import can_plot, figure_pixels, heatmap_figure, task_shares


class MetricsLogger:
    """Writes one record per call to every sink.

    Args:
        cfg: The run config (logged to wandb as the run config).
        run_dir: The run directory.
        enabled: False on ranks other than 0.
        total_steps: Length of the progress bar.
        initial_step: Where a resumed run starts.
    """

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a")
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        mode = os.environ.get("WANDB_MODE") or cfg.log.wandb_mode
        os.environ["WANDB_MODE"] = mode  # wandb re-reads it and rejects an empty value
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.log.wandb_project,
                name=cfg.log.run_name or run_dir.name,
                dir=str(run_dir),
                mode=mode,
                config=to_dict(cfg),
                resume="allow",
                id=_wandb_id(run_dir),
            )

    def log(self, record: dict[str, Any], step: int, console: dict[str, float] | None = None) -> None:
        """Writes `record` (flat keys like `loss/codegen`) at `step`; `console` goes on the progress bar."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if console is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in console.items()}, refresh=True)

    def log_utilization(self, util: dict, step: int) -> None:
        """Logs one heatmap image per layer to wandb, `utilization/L<layer>`.

        Each is tasks × experts, each task's share of its gate mass. Nothing without wandb or matplotlib.
        """
        if not self.enabled or self._wandb is None or not can_plot():
            return
        import wandb

        images = {}
        for layer in sorted(util["layers"], key=int):
            title = f"layer {int(layer)}: gate mass share"
            fig = heatmap_figure(task_shares(util, layer), util["tasks"], title)
            images[f"utilization/L{int(layer):02d}"] = wandb.Image(figure_pixels(fig))
        self._wandb.log(images, step=step)

    def close(self) -> None:
        """Flushes and closes every sink."""
        if not self.enabled:
            return
        self._bar.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so that a resumed run continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
