"""The LM head plus cross-entropy at the target tokens: the plain head against mtmoe's fused, chunked one.

SmolLM2-135M's head (D=576, V=49152, frozen), fp32, one CPU thread; forward and backward to the hidden
states of N target tokens through `target_losses_and_logits` (plain: N×V logits, then cross-entropy) and
`fused_cross_entropy` (per chunk of rows, logits, loss and the hidden-state gradient at once). Both are
asserted to give the same gradient first. Memory: the bytes autograd keeps for the backward.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.loss [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import cli
from benchmarks.harness import machine_info, summarize, time_rounds, timing_settings
from benchmarks.tables import table
from mtmoe.model.token_loss import target_losses_and_logits, target_token_losses

D, V = 576, 49152
TARGETS = (128, 1024)  # the step benchmark's ~120 targets, and a long-sequence batch
VARIANTS = {"plain": target_losses_and_logits, "fused": target_token_losses}
CLI = cli.CliDefaults(cli.RESULTS / "loss.json", rounds=8, iters=3, warmup=2, quick=(2, 1, 1))


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
    """Asserts both heads give the same gradient for `n` targets, then times them; their record."""
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks and times both heads at every target count; returns the result record."""
    return {
        "benchmark": "loss",
        "setup": {"hidden": D, "vocab": V, "dtype": "float32"},
        "timing": timing_settings(args.rounds, args.iters, args.warmup),
        "machine": machine_info(),
        "runs": [run_one(n, args.rounds, args.iters, args.warmup) for n in TARGETS],
    }


MODE = cli.Mode(CLI, run, render_markdown)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.main(__doc__.splitlines()[0], MODE, argv)


if __name__ == "__main__":
    main()
