"""Train a multitask MoE-LoRA model.

deepspeed --num_gpus 2 launch/train.py --config launch/recipes/demo.yaml [key=value ...] [--resume]
torchrun --nproc_per_node 2 launch/train.py --config ...
python launch/train.py --config ...
"""

from __future__ import annotations

import argparse
import os
import sys

from mtmoe.runtime import configure_process, set_torch_threads  # noqa: E402

configure_process()


def main(argv: list[str] | None = None) -> None:
    """Parses the command line and trains; ends the process cleanly on every rank."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a YAML recipe in launch/recipes/")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from mtmoe.config import load_config
    from mtmoe.parallel.launchers import accelerate_overrides
    from mtmoe.train.loop import train

    set_torch_threads()
    from_launcher = accelerate_overrides()
    cfg = load_config(args.config, [*from_launcher, *args.overrides])
    if from_launcher and int(os.environ.get("RANK", "0")) == 0:
        print(f"[mtmoe] from the accelerate config: {' '.join(from_launcher)}")
    result = train(cfg, resume=args.resume)
    if dist.get_rank() == 0 and not result.get("preempted"):
        losses = ", ".join(f"{name} {v['loss']:.4f}" for name, v in result["tasks"].items())
        print(f"[mtmoe] done: {result['step']} steps; held-out loss {losses}; run dir {cfg.train.output_dir}")
    # gloo can abort at interpreter exit after the work is done; leave through a barrier and _exit.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
