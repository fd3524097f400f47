"""Figures of a run, drawn with matplotlib (the `plots` extra): utilization heatmaps and training curves.

A heatmap is one layer's tasks × experts: a cell is the task's share of its gate mass that went to the
expert (each row sums to 1), from white (0) to dark blue (1). Without matplotlib nothing is drawn and
the numbers stay in `utilization.json` and `metrics.jsonl`.

Shape legend: X tasks, E experts.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch


def can_plot() -> bool:
    """Whether matplotlib (the `plots` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def task_shares(util: dict, layer: str, key: str = "mass") -> torch.Tensor:
    """Per task, its share of `key` per expert in one layer (rows sum to 1; zero rows stay zero)."""
    table_XE = torch.tensor(util["layers"][layer][key], dtype=torch.float64)
    return table_XE / table_XE.sum(1, keepdim=True).clamp_min(1e-12)


def heatmap_figure(shares_XE: torch.Tensor, tasks: list[str], title: str) -> Any:
    """A matplotlib figure of one layer's task × expert shares (the caller closes it)."""
    from matplotlib.figure import Figure

    X, E = shares_XE.shape
    fig = Figure(figsize=(1.2 + 0.5 * E, 0.8 + 0.35 * X), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(shares_XE.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(E), [f"e{e}" for e in range(E)])
    ax.set_yticks(range(X), tasks)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def figure_pixels(fig: Any) -> Any:
    """The figure drawn into an RGB array (H, W, 3), uint8: what wandb.Image takes without pyplot."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_heatmaps(util: dict, out_dir: Path) -> list[Path]:
    """Writes `L<layer>.png` per layer into `out_dir` and returns the paths ([] without matplotlib)."""
    if not can_plot():
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in sorted(util["layers"], key=int):
        path = out_dir / f"L{int(layer):02d}.png"
        fig = heatmap_figure(task_shares(util, layer), util["tasks"], f"layer {int(layer)}: gate mass share")
        fig.savefig(path)
        paths.append(path)
    return paths


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_curves(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per-task training loss and task weight over the steps, one PNG each ([] without matplotlib)."""
    if not can_plot():
        return []
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for prefix, name, ylabel in (
        ("loss/", "loss.png", "training loss"),
        ("weight/", "weights.png", "task weight"),
    ):
        series: dict[str, tuple[list[int], list[float]]] = {}
        for r in records:
            for key, value in r.items():
                if key.startswith(prefix):
                    steps, values = series.setdefault(key[len(prefix) :], ([], []))
                    steps.append(r["step"])
                    values.append(value)
        if not series:
            continue
        fig = Figure(figsize=(6, 3.2), dpi=100)
        ax = fig.add_subplot()
        for task, (steps, values) in sorted(series.items()):
            ax.plot(steps, values, label=task, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        paths.append(out_dir / name)
    return paths
