"""Expert parallelism on 2 processes: one MoE-LoRA block step with `ep_size` 2 against replicated experts.

Two gloo processes each hold 4 x 128 tokens at SmolLM2-135M's FFN shape, top-2. A step is the block's
forward and backward plus the gradient reduction its layout needs: `replicated` all-reduces expert and
router gradients; `ep2` moves assignment rows to their expert's owner and back by all-to-all and
all-reduces only the router's. Two expert sizes; the ep2 step's parts (router, dispatch, all-to-all) are
timed as variants of their own. Wall clock after a barrier, the slower rank, interleaved rounds.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.ep [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import cli
from benchmarks.harness import machine_info, summarize, time_rounds, timing_settings
from benchmarks.reference import SwiGLU
from benchmarks.tables import paragraph, table
from mtmoe.model.block import MoELoRAFFN, RoutingContext
from mtmoe.model.dispatch import dispatch
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.routers import TopKRouter
from mtmoe.parallel.dist import free_port
from mtmoe.parallel.expert_parallel import ExpertPlacement, expert_parallel_apply

WORLD = 2
SHAPE = {"batch": 4, "seq": 128, "hidden": 576, "ffn": 1536, "top_k": 2}
SIZES = {"small": {"experts": 4, "rank": 8}, "large": {"experts": 8, "rank": 256}}
CLI = cli.CliDefaults(cli.RESULTS / "ep.json", rounds=8, iters=3, warmup=2, quick=(2, 1, 1))
STEPS = ("replicated", "ep2")
PARTS = ("ep2_router", "ep2_dispatch", "ep2_all_to_all")


def build_block(size: dict, placement: ExpertPlacement) -> MoELoRAFFN:
    """The block at the benchmark shape, holding the experts of `placement` (same init on every rank)."""
    torch.manual_seed(0)
    d, f, e = SHAPE["hidden"], SHAPE["ffn"], size["experts"]
    base = SwiGLU(d, f).requires_grad_(False)
    router = TopKRouter(d, e, SHAPE["top_k"])
    experts = UpcycledLoRAExperts(e, d, f, size["rank"], 2.0 * size["rank"], placement.local)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.02)
    return MoELoRAFFN(base, router, experts, RoutingContext(), placement)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sums the gradients over the world in one flat buffer (as DeepSpeed's bucketed all-reduce does)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)


def make_variants(size: dict, rank: int, ep_group) -> tuple[dict, dict]:
    """One zero-argument step per variant, and the counts each measures."""
    full = build_block(size, ExpertPlacement(size["experts"]))
    ep = build_block(size, ExpertPlacement(size["experts"], WORLD, rank, ep_group))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(SHAPE["batch"], SHAPE["seq"], SHAPE["hidden"], generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)

    def block_step(block: MoELoRAFFN, reduce_experts: bool):
        def step():
            block.zero_grad(set_to_none=False)
            xr = x.clone().requires_grad_()
            block(xr).backward(grad_out)
            block.context.aux_losses.clear()
            params = list(block.router.parameters())
            if reduce_experts:
                params += list(block.experts.parameters())
            all_reduce_grads(params)

        return step

    x_TD = x.reshape(-1, SHAPE["hidden"])

    def router_step():
        ep.router.zero_grad(set_to_none=False)
        route = ep.router(x_TD)
        (route.weights_TK.sum() + route.aux_loss).backward()

    route = ep.router(x_TD)
    ids_TK, weights_TK = route.ids_TK.detach(), route.weights_TK.detach()

    def dispatch_step():
        dispatch(ids_TK, weights_TK, size["experts"])

    d = dispatch(ids_TK, weights_TK, size["experts"])
    width_in = SHAPE["hidden"] + 2 * SHAPE["ffn"]
    rows = torch.randn(len(d.token_N), width_in, generator=gen)
    out_width = SHAPE["ffn"] + SHAPE["hidden"]

    def a2a_step():
        r = rows.clone().requires_grad_()
        out = expert_parallel_apply(r, d.groups.counts_E, ep.placement, lambda m, c: m[:, :out_width])
        out.backward(torch.ones_like(out))

    steps = {
        "replicated": block_step(full, reduce_experts=True),
        "ep2": block_step(ep, reduce_experts=False),
        "ep2_router": router_step,
        "ep2_dispatch": dispatch_step,
        "ep2_all_to_all": a2a_step,
    }
    info = {
        "expert_params_per_rank": {
            "replicated": sum(p.numel() for p in full.experts.parameters()),
            "ep2": sum(p.numel() for p in ep.experts.parameters()),
        },
        "assignment_rows_per_rank": len(d.token_N),
    }
    return steps, info


def _worker(rank: int, port: int, rounds: int, iters: int, warmup: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    result = {}
    for size_name, size in SIZES.items():
        steps, info = make_variants(size, rank, group)
        per_round = time_rounds(
            steps,
            rounds,
            iters,
            warmup,
            scale=1e3,
            clock=time.perf_counter,
            before=dist.barrier,
            reduce=slowest,
        )
        summary = summarize(per_round, "replicated", "ms")  # median_ms, ratio_to_replicated, ...per_round...
        median = summary["median_ms"]
        result[size_name] = {
            **size,
            **info,
            **summary,
            "share_of_ep2_step": {n: median[n] / median["ep2"] for n in PARTS},
            "per_round_ms": per_round,
        }
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def slowest(ms: float) -> float:
    """The slowest rank's time."""
    t = torch.tensor(ms)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Times both expert sizes in 2 processes; returns the result record."""
    rounds, iters, warmup = args.rounds, args.iters, args.warmup
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(free_port(), rounds, iters, warmup, queue), nprocs=WORLD, start_method="spawn"
    )
    sizes = queue.get()
    return {
        "benchmark": "ep",
        "shape": SHAPE,
        "world": WORLD,
        "backend": "gloo",
        "sizes": sizes,
        "timing": timing_settings(
            rounds, iters, warmup, clock="time.perf_counter (wall), after a barrier; the slower rank"
        ),
        "machine": machine_info(),
    }


README_NOTES = {"small": " (the demo's)"}  # after a size's row label
BYTES_PER_PARAM = 4  # fp32 gradients


def render_markdown(result: dict) -> str:
    """The README's expert-parallel caption, table and gradient-size line, from a result record.

    Pure: no I/O and no timing. Every number comes from `result`.

    Args:
        result: The record `run` returns (as written to `results/ep.json`).

    Returns:
        The caption; per expert size, the expert parameters per rank, both layouts' median ms, the ratio
        ep 2 ÷ replicated (of medians, and the median per-round ratio) and the parts' shares of the ep 2
        step; and the size of the expert gradients the replicated layout all-reduces.
    """
    s, sizes, timing = result["shape"], result["sizes"], result["timing"]
    caption = paragraph(
        f"**Expert parallelism on {result['world']} processes** (`python -m benchmarks.ep` → "
        "`benchmarks/results/ep.json`). One block's forward and backward plus its gradient "
        f"reduction, at SmolLM2's FFN shape (D={s['hidden']}, F={s['ffn']}) with {s['batch']} × {s['seq']} "
        f"tokens per rank and top-{s['top_k']}, on {result['world']} {result['backend']} processes. Times "
        f"are wall clock, the slower rank, with medians over {timing['rounds']} interleaved rounds:"
    )
    header = [
        "experts",
        "expert params per rank (replicated → ep 2)",
        "replicated ms",
        "ep_size 2 ms",
        "ep 2 ÷ replicated (per-round median)",
        "router + dispatch + all-to-all, share of the ep 2 step",
    ]
    rows = [_size_row(name, size) for name, size in sizes.items()]
    return "\n\n".join([caption, table(header, rows, "llrrrr"), _gradients_line(sizes)])


def _size_row(name: str, size: dict) -> list[str]:
    params, ms, share = size["expert_params_per_rank"], size["median_ms"], size["share_of_ep2_step"]
    of_medians = size["ratio_to_replicated"]["ep2"]
    per_round = size["median_per_round_ratio_to_replicated"]["ep2"]
    return [
        f"{name}: {size['experts']} × rank {size['rank']}{README_NOTES.get(name, '')}",
        f"{_millions(params['replicated'])} → {_millions(params['ep2'])}",
        f"{ms['replicated']:.1f}",
        f"{ms['ep2']:.1f}",
        f"{of_medians:.2f} ({per_round:.2f})",
        " + ".join(f"{share[part]:.1%}" for part in PARTS),
    ]


def _gradients_line(sizes: dict) -> str:
    """What the replicated layout all-reduces per step: its expert gradients, per expert size."""
    amounts = [
        f"{_megabytes(size['expert_params_per_rank']['replicated'])} with the {name} experts"
        for name, size in sizes.items()
    ]
    return paragraph(
        f"Per step, the replicated layout all-reduces fp32 expert gradients of {' and '.join(amounts)}."
    )


def _millions(n: int) -> str:
    m = n / 1e6
    return f"{m:.2f}M" if m < 1 else f"{m:.1f}M"


def _megabytes(params: int) -> str:
    mb = params * BYTES_PER_PARAM / 1e6
    return f"{mb:.1f} MB" if mb < 10 else f"{mb:.0f} MB"


MODE = cli.Mode(CLI, run, render_markdown)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.main(__doc__.splitlines()[0], MODE, argv)


if __name__ == "__main__":
    main()
