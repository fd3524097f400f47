"""Training runs in real gloo processes (`train()` in each), and readers for what they leave behind."""

import json

from safetensors.torch import load_file

from mtmoe.parallel.spawn import run_ranks

TINY = "launch/recipes/tiny.yaml"
GLOBAL_BATCH = 8  # rows per optimizer step in every run: world x micro_batch_size x grad_accum


def _train_worker(rank, world, overrides, resume):
    from mtmoe.config import load_config
    from mtmoe.train.loop import train

    train(load_config(TINY, overrides), resume=resume)
    return rank


def train_run(data, out, world, ep_size=1, *extra, resume=False, steps=6, save_every=3):
    """Trains the tiny recipe on `world` processes with a fixed global batch; returns `out`."""
    overrides = [
        f"data.tokenized={data}",
        f"train.output_dir={out}",
        f"parallel.ep_size={ep_size}",
        f"train.steps={steps}",
        f"train.save_every={save_every}",
        "train.micro_batch_size=2",
        f"train.grad_accum={GLOBAL_BATCH // (2 * world)}",
        *extra,
    ]
    run_ranks(_train_worker, world, overrides, resume)
    return out


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def drops(run):
    return sum(r.get("moe/dropped", 0) for r in records(run))


def final(run, name="trainable", step=6):
    return load_file(run / "checkpoints" / f"step_{step:06d}" / f"{name}.safetensors")


def link_checkpoint(src_run, dst_run, step):
    """Makes `dst_run` a run directory whose only checkpoint is `src_run`'s step `step`."""
    tag = f"step_{step:06d}"
    (dst_run / "checkpoints").mkdir(parents=True)
    (dst_run / "checkpoints" / tag).symlink_to(src_run / "checkpoints" / tag)
    (dst_run / "checkpoints" / "latest").write_text(tag)
    return dst_run
