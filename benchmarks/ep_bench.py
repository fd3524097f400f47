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
from bench_cli import result_path, write_result
from block_bench import SwiGLU
from harness import CliDefaults, Table, format_table, machine_info, parse_cli, rotated
from md_tables import paragraph, table
from torch import nn

from mtmoe.model.block import MoELoRAFFN, RoutingContext
from mtmoe.model.dispatch import dispatch
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.routers import TopKRouter
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


README_NOTES = {"small": " (the demo's)"}  # after a size's row label
BYTES_PER_PARAM = 4  # fp32 gradients


def render_markdown(result: dict) -> str:
    """The README's expert-parallel caption, table and gradient-size line, from a result record.

    Pure: no I/O and no timing. Every number comes from `result`.

    Args:
        result: The record `run` returns (as written to `results/ep_bench.json`).

    Returns:
        The caption; per expert size, the expert parameters per rank, both layouts' median ms, the ratio
        ep 2 ÷ replicated (of medians, and the median per-round ratio) and the parts' shares of the ep 2
        step; and the size of the expert gradients the replicated layout all-reduces.
    """
    s, sizes, timing = result["shape"], result["sizes"], result["timing"]
    caption = paragraph(
        f"**Expert parallelism on {result['world']} processes** (`benchmarks/ep_bench.py` → "
        "`benchmarks/results/ep_bench.json`). One block's forward and backward plus its gradient "
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


def main(argv: list[str] | None = None) -> dict:
    """Parses the command line, runs, prints the table and writes the JSON."""
    args = parse_cli(__doc__.splitlines()[0], argv, CLI)
    result = run(args.rounds, args.iters, args.warmup)
    result["quick"] = args.quick
    print(format_table(flat_rows(result), TABLE))
    write_result(result, result_path(args.out, args.quick, CLI.out))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
