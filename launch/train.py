"""Train a multitask MoE-LoRA model.

deepspeed --num_gpus 2 launch/train.py --config launch/recipes/demo.yaml [key=value ...] [--resume]
torchrun --nproc_per_node 2 launch/train.py --config ...
python launch/train.py --config ...
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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

    import torch
    import torch.distributed as dist

    from mtmoe.config import load_config
    from mtmoe.train.loop import train

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if dist.get_rank() == 0:
        losses = ", ".join(f"{name} {v['loss']:.4f}" for name, v in result["tasks"].items())
        print(f"[mtmoe] done: {result['step']} steps; held-out loss {losses}; run dir {cfg.train.output_dir}")
    # gloo can abort at interpreter exit after the work is done; leave through a barrier and _exit.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
