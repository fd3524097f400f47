"""Issue #8's GPU run, prepared: the training step of mtmoe, PEFT LoRA and the frozen floor, with MFU.

Runs where the device is (`--device auto`: CUDA when there is one, else CPU), bf16 on CUDA and fp32 on
CPU by default. The models are random-weight Llamas built by `build_model` from the demo recipe with
`model.base: tiny-llama` and the shape of a real model (no weights travel to a lent GPU machine, whose
tree is limited to 64 MiB; timing does not depend on the weights' values):
    smollm2_135m_shape: SmolLM2-135M's dimensions (`launch/model_configs/smollm2-135m-instruct`).
    llama_1b: d = 2048, F = 5632, 16 layers, 32 heads (8 KV): a config that fills an H100 at 8 x 2048.
    tiny: 2 layers, d = 64; the CPU smoke test (tests/test_gpu_bench.py).

Per config, three steps (clear grads, forward, backward; no optimizer), as in `model_step_bench.py`:
mtmoe (the demo recipe's MoE-LoRA: 4 experts, top-2, r8 on every FFN, LM head only at the targets),
PEFT LoRA r16 on gate/up/down (HF loss, full-vocabulary head), and the frozen floor. Before timing, the
script checks that the three compute the same objective (fresh adapters: all equal the base's
cross-entropy). Timing is synchronized wall time (`torch.cuda.synchronize` around each call on CUDA),
warm-up calls, then interleaved rounds rotated each round, medians. FLOPs are counted once per step with
`torch.utils.flop_counter.FlopCounterMode`. MFU = counted FLOPs / median step time / the FLOP/s of a large
matmul in the model dtype timed in the same run; on a known GPU also against its datasheet peak.

Run from the repository root:
    python benchmarks/gpu_bench.py                       # all GPU configs, writes results/gpu_bench.json
    python benchmarks/gpu_bench.py --configs tiny --device cpu --quick   # the CPU smoke run, prints only

On a lent machine mtmoe needs its own dependencies (deepspeed, which `mtmoe.parallel` imports, is
not in that image): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # harness and the other benchmark scripts

from bench_cli import result_path, write_result  # noqa: E402
from harness import machine_info, random_batch, rotated  # noqa: E402
from mfu_bench import EXTRA_FLOP_FORMULAS  # noqa: E402
from model_step_bench import frozen_floor_loss, make_step, trainable  # noqa: E402

RECIPE = REPO / "launch" / "recipes" / "demo.yaml"
DEFAULT_OUT = HERE / "results" / "gpu_bench.json"
PEFT_LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
LOSS_FRACTION = 0.25
VARIANTS = ("mtmoe", "peft_lora_r16", "frozen_floor")
# Dense bf16 tensor-core peaks from the datasheets (SXM parts), FLOP/s.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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
    """`harness.random_batch` for the shape, on the device."""
    batch = random_batch(shape.batch, shape.seq, shape.vocab, LOSS_FRACTION, seed)
    return {k: v.to(device) for k, v in batch.items()}


def build(shape: ModelShape, dtype: str, device: torch.device) -> tuple[Any, Any, float]:
    """The mtmoe model and a PEFT model on the same (seeded, random) base; and the aux-loss coefficient."""
    from peft import LoraConfig, get_peft_model

    from mtmoe.config import load_config
    from mtmoe.model.moe_lm import build_base, build_model

    cfg = load_config(RECIPE, shape.overrides(dtype))
    moe = build_model(cfg, shape.vocab, num_tasks=1).to(device).train()
    lora = LoraConfig(
        r=PEFT_LORA["r"], lora_alpha=PEFT_LORA["lora_alpha"], target_modules=PEFT_LORA["target_modules"]
    )
    peft_model = get_peft_model(build_base(cfg, shape.vocab), lora).to(device).train()
    return moe, peft_model, cfg.moe.aux_loss_coef


def steps_for(
    moe: Any, peft_model: Any, aux_coef: float, b: Mapping[str, torch.Tensor]
) -> dict[str, Callable]:
    """The three training steps (each returns its detached loss)."""
    n_targets = b["loss_mask"].sum()

    def moe_terms():
        loss_BS, aux = moe(b["input_ids"], b["attention_mask"], b["loss_mask"], b["task_ids"])
        return loss_BS.sum() / n_targets, aux

    def peft_terms():
        out = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         use_cache=False)  # fmt: skip
        return out.loss, None

    def floor_terms():
        return frozen_floor_loss(moe, dict(b)), None

    return {
        "mtmoe": make_step(moe_terms, list(trainable(moe).values()), aux_coef),
        "peft_lora_r16": make_step(peft_terms, list(trainable(peft_model).values()), aux_coef),
        "frozen_floor": make_step(floor_terms, [], aux_coef),
    }


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


def time_wall(steps: Mapping[str, Callable], rounds: int, warmup: int, sync: Callable[[], None]) -> dict:
    """Warm-up calls, then interleaved rotated rounds of one synchronized call per step; seconds."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    per_round: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(rounds):
        for name in rotated(list(steps), r):
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            per_round[name].append(time.perf_counter() - t0)
    return per_round


def count_flops(step: Callable) -> int:
    """FLOPs of one call of `step`, as executed (recomputation included)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        step()
    return int(counter.get_total_flops())


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
    moe, peft_model, aux_coef = build(shape, dtype, device)
    steps = steps_for(moe, peft_model, aux_coef, make_batch(shape, device, seed=0))
    losses = check_objective(steps, dtype)
    flops = {n: count_flops(s) for n, s in steps.items()}
    per_round = time_wall(steps, rounds, warmup, synchronizer(device))
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
        "machine": {
            **machine_info(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "settings": {"dtype": dtype, "rounds": rounds, "warmup": warmup, "timer": "synchronized wall time"},
        "matmul_peak": peak,
        "datasheet_peak": None if sheet is None else {"device": sheet[0], "flop_per_s": sheet[1]},
        "configs": results,
        "wall_s": time.perf_counter() - t0,
    }


def render_markdown(result: Mapping[str, Any]) -> str:
    """One table: per config and variant, step time, ratios, tokens/s and MFU; no I/O."""
    sheet = result["datasheet_peak"]
    head = "| config | variant | step ms | × PEFT | × floor | tokens/s | MFU (matmul) |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    if sheet is not None:
        head, sep = head + " MFU (datasheet) |", sep + "---:|"
    lines = [head, sep]
    for name, r in result["configs"].items():
        for v in VARIANTS:
            cells = [
                name,
                v,
                f"{r['median_s'][v] * 1e3:.1f}",
                f"{r['ratio_to_peft'][v]:.2f}",
                f"{r['ratio_to_floor'][v]:.2f}",
                f"{r['tokens_per_s'][v]:,.0f}",
                f"{r['mfu_vs_matmul'][v]:.2f}",
            ]
            if sheet is not None:
                cells.append(f"{r['mfu_vs_datasheet'][v]:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    peak = result["matmul_peak"]
    lines.append("")
    lines.append(
        f"{result['settings']['dtype']} on {result['machine']['device']}; matmul peak {peak['n']}³: "
        f"{peak['flop_per_s'] / 1e12:.1f} TFLOP/s; medians of {result['settings']['rounds']} interleaved "
        "rounds."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument(
        "--dtype", default=None, help="bfloat16 or float32 (default: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--configs", default=None, help=f"comma-separated from {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up; prints only")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    configs = (
        args.configs.split(",") if args.configs else list(GPU_CONFIGS if device.type == "cuda" else ["tiny"])
    )
    if unknown := [c for c in configs if c not in CONFIGS]:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    rounds, warmup = (2, 1) if args.quick else (args.rounds, args.warmup)
    result = run(configs, dtype, device, rounds, warmup)
    print(render_markdown(result))
    write_result(result, result_path(args.out, args.quick, DEFAULT_OUT))
    return result


if __name__ == "__main__":
    main()
