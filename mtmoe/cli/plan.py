"""Plan a run's memory and traffic per GPU from its recipe, on any machine, without the weights.

    python launch/plan.py --config launch/recipes/mixtral_8x7b.yaml --world 16 --seq-len 4096 [k=v ...]
        [--gpu-mem-gib 80] [--json plan.json] [--measure]

The model is built on the meta device as training builds it on rank 0, so nothing is downloaded or
allocated; model.base needs only its config.json. The table lists, per rank: parameters, ZeRO's optimizer
state and gradients, activations per micro-batch with and without gradient checkpointing, the planned
peak and whether it fits the GPU, and the bytes each collective moves per step.
`--measure` also runs one real micro-batch of the model on this machine (world 1, ZeRO-0, a plain AdamW)
and prints the planned numbers next to the measured ones: use it on models that fit in CPU memory.
See `mtmoe/plan/` (its `__init__` docstring) for how each number is found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtmoe.runtime import configure_process, set_torch_threads

configure_process()


def main(argv: list[str] | None = None) -> dict:
    """Prints the plan (and writes it as JSON when asked); returns it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a YAML recipe in launch/recipes/")
    parser.add_argument("--world", type=int, default=1, help="ranks (GPUs) in the job")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per row (default: the manifest's max_len, else 2048)",
    )
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--reserve-gib", type=float, default=1.5, help="kept for the CUDA context and NCCL")
    parser.add_argument("--frag", type=float, default=0.10, help="share lost to allocator fragmentation")
    parser.add_argument("--target-frac", type=float, default=1.0, help="share of positions carrying loss")
    parser.add_argument("--no-padding", action="store_true", help="micro-batches without padding tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan here")
    parser.add_argument("--measure", action="store_true", help="check the plan against a real step here")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.ep_size=8")
    args = parser.parse_args(argv)

    from mtmoe.config import load_config
    from mtmoe.plan.measure import check_here
    from mtmoe.plan.planner import manifest_facts, plan
    from mtmoe.plan.report import format_plan
    from mtmoe.plan.workload import Workload

    set_torch_threads()
    cfg = load_config(args.config, args.overrides)
    facts = manifest_facts(cfg)
    workload = Workload(
        world=args.world,
        seq_len=args.seq_len or facts["max_len"] or 2048,
        target_frac=args.target_frac,
        padded=not args.no_padding,
        gpu_mem_gib=args.gpu_mem_gib,
        reserve_gib=args.reserve_gib,
        frag=args.frag,
    )
    result = plan(cfg, workload, facts["vocab_size"], facts["task_names"])
    if args.measure:
        result["measured"] = check_here(cfg, workload, facts["vocab_size"], facts["task_names"])
    print(f"[mtmoe] plan of {args.config}" + (f" {' '.join(args.overrides)}" if args.overrides else ""))
    print(format_plan(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"[mtmoe] wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
