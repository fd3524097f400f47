"""The LM head plus cross-entropy at the target tokens: the plain head against mtmoe's fused, chunked one.

SmolLM2-135M's head (D=576, V=49152, the tied embedding, frozen), fp32, one CPU thread. For N target
tokens, forward and backward to the hidden states of:
    plain: `target_losses_and_logits`: the head's N×V logits, then `F.cross_entropy` (what mtmoe used
        before, and what any HF + PEFT trainer does, on every position rather than only the targets);
    fused: `fused_cross_entropy` (mtmoe's default): per chunk of rows, logits, loss and the hidden-state
        gradient at once; only N×D is kept for the backward.
Both are checked to give the same loss and gradient first. Memory is measured as the bytes of the
tensors autograd keeps for the backward (`torch.autograd.graph.saved_tensors_hooks`), which is what
grows with N; CPU time as in the other scripts (interleaved rounds, medians).

Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loss_bench.py          # writes results/loss_bench.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loss_bench.py --quick  # prints only
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_cli import result_path, write_result
from harness import (
    CliDefaults,
    machine_info,
    parse_cli,
    summarize,
    time_rounds,
    timing_settings,
)
from md_tables import table

from mtmoe.model.token_loss import target_losses_and_logits, target_token_losses

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "loss_bench.json"
D, V = 576, 49152
TARGETS = (128, 1024)  # the step benchmark's ~120 targets, and a long-sequence batch
CLI = CliDefaults(rounds=8, iters=3, warmup=2, quick=(2, 1, 1), iter_name="steps", out=DEFAULT_OUT)
VARIANTS = {"plain": target_losses_and_logits, "fused": target_token_losses}


def make_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """Hidden states (requires grad), a frozen head, and n rows of 2 tokens whose second is the target."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=gen) * 0.02)
    hidden_BSD = torch.randn(n, 2, D, generator=gen).requires_grad_(True)
    ids_BS = torch.randint(0, V, (n, 2), generator=gen)
    mask_BS = torch.zeros(n, 2, dtype=torch.long)
    mask_BS[:, 1] = 1
    return hidden_BSD, head, ids_BS, mask_BS


def step_fn(name: str, inputs) -> Callable[[], torch.Tensor]:
    """Forward and backward of one variant; returns the hidden states' gradient."""
    hidden_BSD, head, ids_BS, mask_BS = inputs

    def step() -> torch.Tensor:
        hidden_BSD.grad = None
        out = VARIANTS[name](hidden_BSD, head, ids_BS, mask_BS)
        loss_BS = out[0] if isinstance(out, tuple) else out
        loss_BS.sum().backward()
        return hidden_BSD.grad

    return step


def saved_bytes(step: Callable[[], torch.Tensor], weight: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps between forward and backward in one step.

    Distinct storages only, and not the head's weight, which the model holds anyway.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() != weight.untyped_storage().data_ptr():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def run_one(n: int, rounds: int, iters: int, warmup: int) -> dict[str, Any]:
    inputs = make_inputs(n)
    steps = {name: step_fn(name, inputs) for name in VARIANTS}
    grads = {name: steps[name]().clone() for name in VARIANTS}
    torch.testing.assert_close(grads["fused"], grads["plain"], rtol=1e-4, atol=1e-7)
    per_round = time_rounds(steps, rounds, iters, warmup, scale=1e3)
    return {
        "targets": n,
        **summarize(per_round, "plain", "ms"),
        "saved_for_backward_mib": {
            name: saved_bytes(steps[name], inputs[1].weight) / 2**20 for name in VARIANTS
        },
        "per_round_ms": per_round,
    }


def render_markdown(result: dict[str, Any]) -> str:
    """The README table of a result JSON."""
    rows = []
    for r in result["runs"]:
        for name in VARIANTS:
            rows.append(
                [
                    str(r["targets"]),
                    name,
                    f"{r['median_ms'][name]:.1f}",
                    f"{r['ratio_to_plain'][name]:.2f}",
                    f"{r['saved_for_backward_mib'][name]:.1f}",
                ]
            )
    header = ["target tokens", "LM head + loss", "ms (fwd + bwd)", "× plain", "MiB kept for backward"]
    return table(header, rows, align="llrrr")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_cli(__doc__.splitlines()[0], argv, CLI)
    result = {
        "benchmark": "loss_bench",
        "setup": {"hidden": D, "vocab": V, "dtype": "float32"},
        "timing": timing_settings(args.rounds, args.iters, args.warmup),
        "machine": machine_info(),
        "runs": [run_one(n, args.rounds, args.iters, args.warmup) for n in TARGETS],
        "quick": args.quick,
    }
    print(render_markdown(result))
    write_result(result, result_path(args.out, args.quick, CLI.out))
    return result


if __name__ == "__main__":
    main()
