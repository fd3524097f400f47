"""What a launcher's own configuration says about the run.

`accelerate launch` with a DeepSpeed plugin exports its settings as ACCELERATE_* variables. They are
turned into config overrides that sit between the recipe and the command line:
recipe < accelerate config < command-line overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PRECISION = {"no": "float32", "bf16": "bfloat16"}


def accelerate_overrides(env: Mapping[str, str] | None = None) -> list[str]:
    """Dotted overrides from an accelerate DeepSpeed launch (empty for any other launcher).

    Args:
        env: The environment to read (defaults to `os.environ`).

    Raises:
        ValueError: For a setting mtmoe cannot honour (fp16, a stage above 3), naming the accelerate field.
    """
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return []
    out = []
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env:
        stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        if stage not in (0, 1, 2, 3):
            raise ValueError(
                f"accelerate config deepspeed_config.zero_stage={stage}: mtmoe supports 0, 1, 2 or 3"
            )
        out.append(f"parallel.zero_stage={stage}")
    if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in env:
        out.append(f"train.grad_accum={int(env['ACCELERATE_GRADIENT_ACCUMULATION_STEPS'])}")
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        out.append(f"parallel.ds_config={env['ACCELERATE_DEEPSPEED_CONFIG_FILE']}")
    precision = env.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None:
        if precision not in PRECISION:
            raise ValueError(
                f"accelerate config mixed_precision={precision!r}: mtmoe supports 'no' or 'bf16'"
            )
        out.append(f"model.dtype={PRECISION[precision]}")
    return out
