"""Expert parallelism on 2 processes: one MoE-LoRA block step with `ep_size` 2 against replicated experts.

Two real gloo processes each hold 4 x 128 tokens at SmolLM2-135M's FFN shape (D 576, F 1536, top-2).
A step is the block's forward and backward plus the gradient reduction each layout needs:

    replicated: every rank holds all E experts; expert and router gradients are all-reduced over both
        ranks (what DeepSpeed does for `ep_size` 1).
    ep2: each rank holds E/2 experts; assignment rows go to their expert's owner and back by
        all-to-all; expert gradients need no reduction (the expert-data-parallel group has one rank),
        router gradients are all-reduced.

Two expert sizes: `small` (E 4, LoRA rank 8: the demo's experts) and `large` (E 8, rank 256).
For `ep2` the parts are timed too, each as its own variant: the router (forward and backward), the
dispatch (sort and capacity index math) and the two all-to-all exchanges with their backward (rows of
the real sizes, experts replaced by the identity). Their share is reported against the ep2 step.

Timing: wall clock (the exchanges block on the peer, so CPU time would hide them), after a barrier,
the slower rank's time, variants interleaved and rotated each round, median of the rounds.

Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ep_bench.py           # full, writes JSON
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ep_bench.py --quick   # short, prints only
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from block_bench import SwiGLU
from harness import CliDefaults, Table, format_table, machine_info, parse_cli, rotated, write_result
from torch import nn

from mtmoe.model.block import MoELoRAFFN, RoutingContext
from mtmoe.model.dispatch import dispatch
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.router import TopKRouter
from mtmoe.parallel.dist import free_port
from mtmoe.parallel.expert_parallel import ExpertPlacement, expert_parallel_apply

WORLD = 2
SHAPE = {"batch": 4, "seq": 128, "hidden": 576, "ffn": 1536, "top_k": 2}
SIZES = {"small": {"experts": 4, "rank": 8}, "large": {"experts": 8, "rank": 256}}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ep_bench.json"
CLI = CliDefaults(rounds=8, iters=3, warmup=2, quick=(2, 1, 1), iter_name="steps", out=DEFAULT_OUT)
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


def time_variants(steps: dict, rounds: int, iters: int, warmup: int) -> dict[str, list[float]]:
    """Per variant, the slower rank's wall time per step (ms) of every round."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in rotated(names, r):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            ms = torch.tensor((time.perf_counter() - t0) / iters * 1e3)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            per_round[name].append(float(ms))
    return per_round


def _worker(rank: int, port: int, rounds: int, iters: int, warmup: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    result = {}
    for size_name, size in SIZES.items():
        steps, info = make_variants(size, rank, group)
        per_round = time_variants(steps, rounds, iters, warmup)
        median = {n: statistics.median(t) for n, t in per_round.items()}
        result[size_name] = {
            **size,
            **info,
            "median_ms": median,
            "ratio_to_replicated": {n: median[n] / median["replicated"] for n in STEPS},
            "median_per_round_ratio_to_replicated": {
                n: statistics.median(
                    a / b for a, b in zip(per_round[n], per_round["replicated"], strict=True)
                )
                for n in STEPS
            },
            "share_of_ep2_step": {n: median[n] / median["ep2"] for n in PARTS},
            "per_round_ms": per_round,
        }
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def run(rounds: int, iters: int, warmup: int) -> dict:
    """Times both expert sizes in 2 processes; returns the result record."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(free_port(), rounds, iters, warmup, queue), nprocs=WORLD, start_method="spawn"
    )
    sizes = queue.get()
    return {
        "benchmark": "ep_bench",
        "shape": SHAPE,
        "world": WORLD,
        "backend": "gloo",
        "sizes": sizes,
        "timing": {
            "clock": "time.perf_counter (wall), after a barrier; the slower rank",
            "rounds": rounds,
            "iters_per_round": iters,
            "warmup_iters": warmup,
            "order": "interleaved, rotated each round",
        },
        "machine": machine_info(),
    }


TABLE = Table(
    [f"{s}/{v}" for s in SIZES for v in (*STEPS, *PARTS)],
    header=f"{'size/variant':<26}{'median ms':>11}{'x replicated':>14}{'share of ep2':>14}",
    row="{name:<26}{ms:>11.1f}{ratio:>14}{share:>14}",
)


def flat_rows(result: dict) -> dict:
    """The per-row fields of the printed table."""
    ms, ratio, share = {}, {}, {}
    for s, r in result["sizes"].items():
        for v in (*STEPS, *PARTS):
            key = f"{s}/{v}"
            ms[key] = r["median_ms"][v]
            ratio[key] = f"{r['ratio_to_replicated'][v]:.2f}" if v in STEPS else ""
            share[key] = f"{r['share_of_ep2_step'][v]:.1%}" if v in PARTS else ""
    return {"ms": ms, "ratio": ratio, "share": share}


def main(argv: list[str] | None = None) -> dict:
    """Parses the command line, runs, prints the table and writes the JSON."""
    args = parse_cli(__doc__.splitlines()[0], argv, CLI)
    result = run(args.rounds, args.iters, args.warmup)
    result["quick"] = args.quick
    print(format_table(flat_rows(result), TABLE))
    write_result(result, args.out if args.out is not None else (None if args.quick else CLI.out))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
