"""The `gpu` mode: issue #8's GPU run, prepared: the steps of mtmoe, PEFT LoRA and the floor, with MFU.

Runs where the device is (`--device auto`), bf16 on CUDA and fp32 on CPU by default, on random-weight
Llamas built by `build_model` from the demo recipe with `model.base: tiny-llama` and a real model's shape
(no weights travel to a lent machine): `smollm2_135m_shape`, `llama_1b`, and `tiny` (the CPU smoke test).
The three steps are checked to compute the same objective with fresh adapters, their FLOPs counted
(`FlopCounterMode`), and they are timed in synchronized wall time over interleaved rounds. MFU is against
a large matmul in the model dtype timed in the same run and, on a known GPU, against its datasheet peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import cli
from benchmarks.harness import machine_info, time_rounds
from benchmarks.models import REPO, build_mtmoe, build_peft, random_batch, recipe, trainable
from benchmarks.step.common import count_flops, loss_fns, make_step
from benchmarks.tables import table

LOSS_FRACTION = 0.25
VARIANTS = ("mtmoe", "peft_lora_r16", "frozen_floor")
TERMS = dict(zip(VARIANTS, ("mtmoe", "peft", "floor"), strict=True))
# Dense bf16 tensor-core peaks from the datasheets (SXM parts), FLOP/s.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
CLI = cli.CliDefaults(
    cli.RESULTS / "step_gpu.json",
    rounds=8,
    iters=None,
    warmup=2,
    quick=(2, 1, 1),
    quick_help="2 rounds; prints only",
)


@dataclass(frozen=True)
class ModelShape:
    """A random Llama's dimensions and the micro-batch timed on it.

    Attributes:
        hidden: d.
        ffn: F.
        layers: Decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads.
        vocab: Vocabulary size.
        batch: Rows per step.
        seq: Tokens per row.
    """

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int

    def overrides(self, dtype: str) -> list[str]:
        """The demo recipe's overrides that build this shape with random weights in `dtype`."""
        tiny = (
            f"{{hidden_size: {self.hidden}, intermediate_size: {self.ffn}, num_hidden_layers: {self.layers}, "
            f"num_attention_heads: {self.heads}, num_key_value_heads: {self.kv_heads}, "
            f"max_position_embeddings: {max(1024, self.seq)}, tie_word_embeddings: true}}"
        )
        return ["model.base=tiny-llama", f"model.tiny={tiny}", f"model.dtype={dtype}"]


def smollm2_shape(batch: int, seq: int) -> ModelShape:
    """SmolLM2-135M's dimensions, read from the config mtmoe ships."""
    c = json.loads((REPO / "launch" / "model_configs" / "smollm2-135m-instruct" / "config.json").read_text())
    return ModelShape(
        c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
        c["num_key_value_heads"], c["vocab_size"], batch, seq,
    )  # fmt: skip


CONFIGS: dict[str, Callable[[], ModelShape]] = {
    "smollm2_135m_shape": lambda: smollm2_shape(8, 1024),
    "llama_1b": lambda: ModelShape(2048, 5632, 16, 32, 8, 49152, 8, 2048),
    "tiny": lambda: ModelShape(64, 128, 2, 4, 2, 512, 2, 64),
}
GPU_CONFIGS = ("smollm2_135m_shape", "llama_1b")


def make_batch(shape: ModelShape, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """`random_batch` for the shape, on the device."""
    batch = random_batch(shape.batch, shape.seq, shape.vocab, LOSS_FRACTION, seed)
    return {k: v.to(device) for k, v in batch.items()}


def check_objective(steps: Mapping[str, Callable], dtype: str) -> dict[str, float]:
    """Fresh adapters: every variant's loss is the base's cross-entropy (the router loss aside)."""
    losses = {name: float(step()) for name, step in steps.items()}
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    ref = losses["frozen_floor"]
    # mtmoe's loss carries the weighted router loss on top of the cross-entropy: a small, positive term.
    assert abs(losses["peft_lora_r16"] - ref) <= tol * abs(ref), losses
    assert -tol * abs(ref) <= losses["mtmoe"] - ref <= 0.05 * abs(ref), losses
    return losses


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (a no-op on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(device: torch.device, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    """The FLOP/s of a large square matmul in `dtype` (8192 on CUDA, 2048 on CPU), median of rounds."""
    n = 8192 if device.type == "cuda" else 2048
    a_NN, b_NN = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync, times = synchronizer(device), []
    for i in range(rounds + 2):
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a_NN, b_NN)
        sync()
        if i >= 2:
            times.append((time.perf_counter() - t0) / 4)
    return {"n": n, "median_s": statistics.median(times), "flop_per_s": 2 * n**3 / statistics.median(times)}


def datasheet_peak(device: torch.device, dtype: str) -> tuple[str, float] | None:
    """(device name, dense peak FLOP/s) from `DATASHEET_BF16` for a known GPU in bf16, else None."""
    if device.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((name, peak) for key, peak in DATASHEET_BF16.items() if key in name), None)


def run_config(name: str, dtype: str, device: torch.device, rounds: int, warmup: int) -> dict[str, Any]:
    """Builds one config, checks the objective, counts FLOPs, times the three steps; its record."""
    shape = CONFIGS[name]()
    torch.manual_seed(0)
    cfg = recipe(overrides=shape.overrides(dtype))
    moe, peft_model = build_mtmoe(cfg, shape.vocab).to(device), build_peft(cfg, shape.vocab).to(device)
    fns = loss_fns(moe, make_batch(shape, device, seed=0), peft_model)
    params = {
        "mtmoe": list(trainable(moe).values()),
        "peft": list(trainable(peft_model).values()),
        "floor": [],
    }
    steps = {name: make_step(fns[key], params[key]) for name, key in TERMS.items()}
    losses = check_objective(steps, dtype)
    flops = {n: count_flops(s)["total"] for n, s in steps.items()}
    sync = synchronizer(device)
    per_round = time_rounds(steps, rounds, 1, warmup, clock=time.perf_counter, before=sync, after=sync)
    median_s = {n: statistics.median(t) for n, t in per_round.items()}
    record: dict[str, Any] = {
        "shape": shape.__dict__,
        "losses_fresh_adapters": losses,
        "flops": flops,
        "median_s": median_s,
        "ratio_to_peft": {n: median_s[n] / median_s["peft_lora_r16"] for n in median_s},
        "ratio_to_floor": {n: median_s[n] / median_s["frozen_floor"] for n in median_s},
        "tokens_per_s": {n: shape.batch * shape.seq / median_s[n] for n in median_s},
        "per_round_s": per_round,
    }
    if device.type == "cuda":
        record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del moe, peft_model, steps
    return record


def run(configs: list[str], dtype: str, device: torch.device, rounds: int, warmup: int) -> dict[str, Any]:
    """Every config, then the matmul peak; the result record with MFU per config and variant."""
    t0 = time.perf_counter()
    results = {name: run_config(name, dtype, device, rounds, warmup) for name in configs}
    peak = matmul_peak(device, getattr(torch, dtype), rounds)
    sheet = datasheet_peak(device, dtype)
    for r in results.values():
        r["mfu_vs_matmul"] = {n: r["flops"][n] / r["median_s"][n] / peak["flop_per_s"] for n in VARIANTS}
        if sheet is not None:
            r["mfu_vs_datasheet"] = {n: r["flops"][n] / r["median_s"][n] / sheet[1] for n in VARIANTS}
    return {
        "benchmark": "training step (mtmoe, PEFT LoRA r16, frozen floor) and MFU, random-weight Llamas",
        "machine": machine_info(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        ),
        "settings": {"dtype": dtype, "rounds": rounds, "warmup": warmup, "timer": "synchronized wall time"},
        "matmul_peak": peak,
        "datasheet_peak": None if sheet is None else {"device": sheet[0], "flop_per_s": sheet[1]},
        "configs": results,
        "wall_s": time.perf_counter() - t0,
    }


def render_markdown(result: Mapping[str, Any]) -> str:
    """One table: per config and variant, step time, ratios, tokens/s and MFU; no I/O."""
    sheet = result["datasheet_peak"]
    header = ["config", "variant", "step ms", "× PEFT", "× floor", "tokens/s", "MFU (matmul)"]
    header += ["MFU (datasheet)"] if sheet is not None else []
    rows = []
    for name, r in result["configs"].items():
        for v in VARIANTS:
            rows.append(
                [name, v, f"{r['median_s'][v] * 1e3:.1f}", f"{r['ratio_to_peft'][v]:.2f}",
                 f"{r['ratio_to_floor'][v]:.2f}", f"{r['tokens_per_s'][v]:,.0f}",
                 f"{r['mfu_vs_matmul'][v]:.2f}"]
                + ([f"{r['mfu_vs_datasheet'][v]:.2f}"] if sheet is not None else [])
            )  # fmt: skip
    peak = result["matmul_peak"]
    lines = [table(header, rows, "ll" + "r" * (len(header) - 2)), ""]
    lines.append(
        f"{result['settings']['dtype']} on {result['machine']['device']}; matmul peak {peak['n']}³: "
        f"{peak['flop_per_s'] / 1e12:.1f} TFLOP/s; medians of {result['settings']['rounds']} interleaved "
        "rounds."
    )
    return "\n".join(lines)


def arguments(p: argparse.ArgumentParser) -> None:
    """`--device`, `--dtype` and `--configs`."""
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--configs", default=None, help=f"comma-separated from {', '.join(CONFIGS)}")


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    """`run` with the device, dtype and configs of the command line."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    default = GPU_CONFIGS if device.type == "cuda" else ["tiny"]
    configs = args.configs.split(",") if args.configs else list(default)
    if unknown := [c for c in configs if c not in CONFIGS]:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    return run(configs, dtype, device, args.rounds, args.warmup)


MODE = cli.Mode(CLI, run_mode, render_markdown, arguments=arguments, help="issue #8's GPU run: steps and MFU")
