"""Utilization heatmaps (tasks × experts, one per layer) as PNG files, with no imaging library.

A cell's darkness is the task's share of its gate mass that went to that expert (each row sums to 1):
white is 0, dark blue is 1. Rows are the tasks in `utilization.json` order, columns the experts.

Shape legend: X tasks, E experts.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

WHITE, BLUE = (255, 255, 255), (8, 48, 107)


def png_bytes(rgb_HW3: torch.Tensor) -> bytes:
    """Encodes an 8-bit RGB image (H, W, 3) as PNG."""
    height, width, _ = rgb_HW3.shape
    raw = b"".join(b"\x00" + bytes(row.reshape(-1).tolist()) for row in rgb_HW3.to(torch.uint8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def heatmap_rgb(shares_XE: torch.Tensor, cell: int = 24) -> torch.Tensor:
    """Colours each cell between white (0) and dark blue (1), each `cell` pixels square."""
    t_XE1 = shares_XE.clamp(0, 1).float()[..., None]
    rgb_XE3 = torch.tensor(WHITE) * (1 - t_XE1) + torch.tensor(BLUE) * t_XE1
    return rgb_XE3.round().repeat_interleave(cell, 0).repeat_interleave(cell, 1)


def task_shares(util: dict, layer: str, key: str = "mass") -> torch.Tensor:
    """Per task, its share of `key` per expert in one layer (rows sum to 1; zero rows stay zero)."""
    table_XE = torch.tensor(util["layers"][layer][key], dtype=torch.float64)
    return table_XE / table_XE.sum(1, keepdim=True).clamp_min(1e-12)


def write_heatmaps(util: dict, out_dir: Path) -> list[Path]:
    """Writes `L<layer>.png` per layer into `out_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in sorted(util["layers"], key=int):
        path = out_dir / f"L{int(layer):02d}.png"
        path.write_bytes(png_bytes(heatmap_rgb(task_shares(util, layer))))
        paths.append(path)
    return paths
