"""`python -m benchmarks.step MODE [--quick] [--tiny] ...`: the step benchmark's modes (see `__init__`)."""

from __future__ import annotations

from typing import Any

from benchmarks import cli
from benchmarks.step import compare, gpu, mfu, packing

MODES = {
    "compare": compare.MODE,
    "mfu": mfu.MODE,
    "packing": packing.MODE,
    "gpu": gpu.MODE,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.main("One training step of the demo model, in four modes.", MODES, argv)


if __name__ == "__main__":
    main()
