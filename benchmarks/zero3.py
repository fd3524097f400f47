"""ZeRO-3 against ZeRO-2 on 2 gloo ranks: step time, memory per rank, and loading a checkpoint.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m benchmarks.zero3 step [--quick]
    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m benchmarks.zero3 loading [--quick]

`step`: the demo recipe (SmolLM2-135M, 4 upcycled experts on every layer, packing, fp32) trains
`--steps` steps with `train()` on 2 ranks under ZeRO-2 and under ZeRO-3, the two runs alternating for
`--rounds` rounds. A run's step time is the median of its logged `step_s` after `--warmup` steps; the
ratio ZeRO-3/ZeRO-2 is taken per round. Memory per rank: the parameter bytes each rank holds
(`eval.json`), against what `launch/plan.py` plans for the run, and the peak RSS of each rank's process.

`loading`: each of 2 ranks loads a checkpoint folder saved in several safetensors shards, in a fresh
process per variant; measured are the bytes read, the peak RSS growth during the load (with every kept
tensor touched afterwards, so that a memory-mapped load counts what its first forward would page in),
and the parameter bytes the rank keeps:
- dense (SmolLM2-135M): the whole model on every rank, against ZeRO-3's load, where each rank reads
  only its partition of each tensor;
- native (a random Mixtral, 8 experts): the whole model, this rank's experts only (`ep_size` 2), and
  its experts with ZeRO-3 partitioning the rest.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.harness import machine_info, rotated
from benchmarks.memory import current_rss_bytes, vm_hwm_bytes

WORLD = 2
STAGES = (2, 3)
RECIPE = "launch/recipes/demo.yaml"
STEP_OVERRIDES = (  # the steps are measured: no fading pass, no checkpoint, a short final evaluation
    "moe.fade_fraction=0",
    "train.save_every=0",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.eval_metrics=false",
    "data.eval_max_samples=4",
)
MIB = 1024 * 1024
MIXTRAL = {  # a random Mixtral big enough that the expert weights dominate (about 0.6 GB in fp32)
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
}
LOADS = {
    "dense": ("whole", "zero3"),
    "native": ("whole", "ep2", "ep2_zero3"),
}
TINY_LOADS = {"dense": ("zero3",), "native": ("ep2_zero3",)}  # `--tiny` smoke: the ZeRO-3 paths only


# ---- step ----


def _train_worker(rank: int, world: int, overrides: list[str]) -> dict[str, Any]:
    from mtmoe.config import load_config
    from mtmoe.train.loop import train

    result = train(load_config(RECIPE, overrides))
    return {"held": result["train"]["param_bytes_per_rank"][rank], "peak_rss": vm_hwm_bytes()}


def _step_run(stage: int, steps: int, out: Path, args) -> dict[str, Any]:
    from mtmoe.parallel.spawn import run_ranks

    tiny, data = args.tiny, args.data
    overrides = [
        *STEP_OVERRIDES,
        *([f"data.tokenized={data}"] if data else []),
        *([f"parallel.ds_config={args.zero3_json}"] if stage == 3 and args.zero3_json else []),
        *([f"train.micro_batch_size={args.micro_batch}"] if args.micro_batch else []),
        f"parallel.zero_stage={stage}",
        f"train.steps={steps}",
        f"train.output_dir={out}",
        *(cli.TINY_OVERRIDES if tiny else ()),
    ]
    ranks = run_ranks(_train_worker, WORLD, overrides)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_s" in r]
    tokens_per_s = [r["tokens_per_s"] * r["step_s"] / WORLD for r in timed if "tokens_per_s" in r]
    return {"step_s": [r["step_s"] for r in timed], "tokens_per_rank": tokens_per_s, "ranks": ranks}


def _planned(stage: int, tiny: bool, data: Path | None) -> dict[str, float]:
    from mtmoe.config import load_config
    from mtmoe.plan.planner import manifest_facts, plan
    from mtmoe.plan.workload import Workload

    data_key = [f"data.tokenized={data}"] if data else []
    cfg = load_config(
        RECIPE, [f"parallel.zero_stage={stage}", *data_key, *(cli.TINY_OVERRIDES if tiny else ())]
    )
    facts = manifest_facts(cfg)
    p = plan(
        cfg, Workload(world=WORLD, seq_len=facts["max_len"] or 512), facts["vocab_size"], facts["task_names"]
    )
    return {"frozen": p["memory"]["frozen_held"], "trainable": p["optimizer"]["trainable"]}


def run_step(args) -> dict[str, Any]:
    steps = 4 if args.quick else args.steps
    per_round: list[dict[str, float]] = []
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            medians = {}
            for stage in rotated(STAGES, r):
                run = _step_run(stage, steps, Path(tmp) / f"z{stage}_r{r}", args)
                medians[stage] = statistics.median(run["step_s"][args.warmup :])
                runs[stage].append(run)
            per_round.append({f"zero{s}_s": medians[s] for s in STAGES} | {"ratio": medians[3] / medians[2]})
    tokens = [t for stage in STAGES for run in runs[stage] for t in run["tokens_per_rank"][args.warmup :]]
    memory = {}
    for stage in STAGES:
        last = runs[stage][-1]["ranks"]
        memory[f"zero{stage}"] = {
            "planned": _planned(stage, args.tiny, args.data),
            "held": [rank["held"] for rank in last],
            "peak_rss": [
                statistics.median(run["ranks"][i]["peak_rss"] for run in runs[stage]) for i in range(WORLD)
            ],
        }
    return {
        "benchmark": "zero3 step",
        "recipe": RECIPE,
        "overrides": list(STEP_OVERRIDES),
        "zero3_json": str(args.zero3_json or "ds_configs/zero3.json"),
        "micro_batch": args.micro_batch or "recipe's",
        "tokens_per_rank_step": statistics.median(tokens) if tokens else None,
        "world": WORLD,
        "steps": steps,
        "warmup": args.warmup,
        "machine": machine_info(),
        "per_round": per_round,
        "ratio_median": statistics.median(r["ratio"] for r in per_round),
        "memory": memory,
    }


def render_step(result: Mapping[str, Any]) -> str:
    rounds = result["per_round"]
    z2 = statistics.median(r["zero2_s"] for r in rounds)
    z3 = statistics.median(r["zero3_s"] for r in rounds)
    ratios = ", ".join(f"{r['ratio']:.3f}" for r in rounds)
    batch = ""
    if result.get("tokens_per_rank_step"):
        mb, tokens = result.get("micro_batch", "recipe's"), result["tokens_per_rank_step"]
        batch = f", micro-batch {mb} samples, about {tokens:.0f} tokens per rank and step"
    lines = [
        f"Step time, {result['world']} gloo ranks, `{result['recipe']}` ({result['steps']} steps per run, "
        f"median after {result['warmup']}; {len(rounds)} rounds, alternating{batch}); ZeRO-3 with "
        f"{result.get('zero3_json', 'ds_configs/zero3.json')}:",
        "",
        "| | ZeRO-2 | ZeRO-3 | ZeRO-3 / ZeRO-2 |",
        "|---|---:|---:|---:|",
        f"| s per step (median of rounds) | {z2:.3f} | {z3:.3f} | **{result['ratio_median']:.3f}** "
        f"(rounds: {ratios}) |",
        "",
        "Memory per rank (MiB): parameters held between steps, planned by `launch/plan.py` and measured "
        "(`eval.json`), and the peak RSS of each rank's process:",
        "",
        "| | frozen, planned | frozen, held | trainable, planned | trainable, held | peak RSS, rank 0 / 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        m = result["memory"][f"zero{stage}"]
        held = m["held"][0]
        rss = " / ".join(f"{x / MIB:.0f}" for x in m["peak_rss"])
        lines.append(
            f"| ZeRO-{stage} | {m['planned']['frozen'] / MIB:.1f} | {held['frozen'] / MIB:.1f} | "
            f"{m['planned']['trainable'] / MIB:.2f} | {held['trainable'] / MIB:.2f} | {rss} |"
        )
    return "\n".join(lines)


# ---- loading ----


def _folders(root: Path, tiny: bool) -> dict[str, Path]:
    """The two checkpoint folders, saved in shards: SmolLM2-135M (or a tiny Llama) and a random Mixtral."""
    import torch
    from transformers import MixtralConfig

    from mtmoe.model.base import ensure_smollm2, load_base_model, tiny_llama, tiny_moe

    dense = tiny_llama(49152) if tiny else load_base_model(ensure_smollm2())
    dense.save_pretrained(root / "dense", max_shard_size="40MB" if not tiny else "200KB")
    del dense
    fields = {"vocab_size": 512} if tiny else MIXTRAL
    torch.manual_seed(0)
    if tiny:
        native = tiny_moe("tiny-mixtral", 512)
    else:
        from transformers import AutoModelForCausalLM

        native = AutoModelForCausalLM.from_config(MixtralConfig(**fields))
    native.save_pretrained(root / "native", max_shard_size="100MB" if not tiny else "100KB")
    return {"dense": root / "dense", "native": root / "native"}


def _load_worker(rank: int, world: int, variant: str, folder: Path) -> dict[str, Any]:
    import torch

    from mtmoe.config import load_config
    from mtmoe.model.base import load_base_model, safetensors_files
    from mtmoe.model.sharded_load import ReadStats, load_local_experts, load_streamed
    from mtmoe.model.zero3 import partitioner
    from mtmoe.parallel.dist import init_distributed
    from mtmoe.parallel.ds_config import build_ds_config
    from mtmoe.parallel.engine import resident_param_bytes

    init_distributed("gloo")
    partition = partitioner(build_ds_config(load_config(None, ["parallel.zero_stage=3"]), world))
    experts = json.loads((folder / "config.json").read_text()).get("num_local_experts", 0)
    local = slice(rank * experts // 2, (rank + 1) * experts // 2)
    stats = ReadStats()
    whole_bytes = sum(f.stat().st_size for f in safetensors_files(folder))
    before = current_rss_bytes()
    if variant == "whole":
        model = load_base_model(folder)
    elif variant == "zero3":
        model = load_streamed(folder, torch.float32, torch.float32, partition, stats)
    else:
        model = load_local_experts(
            folder, torch.float32, local, stats, partition if "zero3" in variant else None
        )
    for p in model.parameters():  # page in what a loader only mapped, as the first forward would
        (p.ds_tensor if hasattr(p, "ds_id") else p).sum()
    peak = vm_hwm_bytes() - before
    kept = resident_param_bytes(model)
    held = kept["frozen"] + kept["trainable"]
    read = stats.bytes_read if variant != "whole" else whole_bytes
    return {"read": read, "peak_growth": peak, "held": held, "files": whole_bytes}


def run_loading(args) -> dict[str, Any]:
    from mtmoe.parallel.spawn import run_ranks

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = _folders(Path(tmp), args.tiny)
        for model, variants in (TINY_LOADS if args.tiny else LOADS).items():
            files = sorted(p.name for p in folders[model].glob("*.safetensors"))
            name = {"dense": "SmolLM2-135M", "native": "random Mixtral, 8 experts"}[model]
            out[model] = {
                "name": f"tiny random ({model})" if args.tiny else name,
                "shards": len(files),
                "variants": {},
            }
            for variant in variants:
                ranks = run_ranks(_load_worker, WORLD, variant, folders[model])
                out[model]["variants"][variant] = ranks
    return {
        "benchmark": "zero3 loading",
        "world": WORLD,
        "mixtral": MIXTRAL,
        "machine": machine_info(),
        "models": out,
    }


LOAD_LABELS = {
    "whole": "whole model on every rank",
    "zero3": "ZeRO-3: each rank reads its part of each tensor",
    "ep2": "ep_size 2: this rank's experts only",
    "ep2_zero3": "ep_size 2 + ZeRO-3 for the rest",
}


def render_loading(result: Mapping[str, Any]) -> str:
    lines = [
        f"Loading a checkpoint on {result['world']} gloo ranks (MiB per rank, rank 0; fp32):",
        "",
        "| model | load | bytes read | peak RSS growth | parameters kept |",
        "|---|---|---:|---:|---:|",
    ]
    for m in result["models"].values():
        for variant, ranks in m["variants"].items():
            r = ranks[0]
            lines.append(
                f"| {m['name']} ({m['shards']} shards) | {LOAD_LABELS[variant]} | {r['read'] / MIB:.0f} | "
                f"{r['peak_growth'] / MIB:.0f} | {r['held'] / MIB:.0f} |"
            )
    return "\n".join(lines)


# ---- plans ----

PLANS = (  # recipe, world, GPU memory (GiB)
    ("llama3_70b_upcycled_zero3.yaml", 8, 80),
    ("llama3_70b_upcycled_zero3.yaml", 16, 80),
    ("qwen3_30b_a3b_native.yaml", 8, 80),
    ("qwen3_235b_a22b_native.yaml", 32, 80),
    ("mixtral_8x7b.yaml", 16, 80),
)
PLAN_SEQ_LEN = 4096


def run_plans(args) -> dict[str, Any]:
    from mtmoe.config import load_config
    from mtmoe.plan.planner import plan
    from mtmoe.plan.workload import Workload

    rows = []
    for recipe, world, gib in PLANS:
        for stage in (2, 3):
            cfg = load_config(f"launch/recipes/{recipe}", [f"parallel.zero_stage={stage}"])
            p = plan(cfg, Workload(world=world, seq_len=PLAN_SEQ_LEN, gpu_mem_gib=gib))
            rows.append(
                {
                    "recipe": recipe,
                    "world": world,
                    "gpu_gib": gib,
                    "zero_stage": stage,
                    "ep_size": cfg.parallel.ep_size,
                    "family": cfg.moe.family,
                    "architecture": p["model"]["architecture"],
                    # the plan's model holds rank 0's experts: 1/ep_size of them
                    "frozen_params": p["parameters"]["frozen_dense"]["numel"]
                    + p["parameters"]["frozen_expert"]["numel"] * cfg.parallel.ep_size,
                    "frozen_held": p["memory"]["frozen_held"],
                    "peak": p["memory"]["peak"],
                    "usable": p["memory"]["usable"],
                    "fits": p["memory"]["fits"],
                }
            )
    return {"benchmark": "zero3 plans", "seq_len": PLAN_SEQ_LEN, "micro_batch": "recipe's", "rows": rows}


def render_plans(result: Mapping[str, Any]) -> str:
    gib = 1024**3
    lines = [
        f"Planned per GPU by `launch/plan.py` (80 GB GPUs, 1 × {result['seq_len']} tokens per micro-batch, "
        "bf16, gradient checkpointing as the recipe says):",
        "",
        "| recipe | model | GPUs | ep_size | ZeRO-2: peak GiB | ZeRO-3: frozen kept GiB | ZeRO-3: peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows = result["rows"]
    for z2, z3 in zip(rows[::2], rows[1::2], strict=True):

        def peak(r: Mapping[str, Any]) -> str:
            return f"{r['peak'] / gib:.1f}" + ("" if r["fits"] else " (does not fit)")

        lines.append(
            f"| `{z2['recipe']}` | {z2['architecture']}, {z2['frozen_params'] / 1e9:.1f} B frozen | "
            f"{z2['world']} | {z2['ep_size']} | {peak(z2)} | {z3['frozen_held'] / gib:.1f} | {peak(z3)} |"
        )
    return "\n".join(lines)


# ---- export ----

_EXPORT_CHILD = (  # runs the export command in this fresh process, then prints its peak RSS (KiB)
    "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
    "runpy.run_path('launch/export.py', run_name='__main__'); "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def _tiny_run(root: Path, data: Path | None) -> Path:
    """A 2-step run of the demo recipe on a tiny random Llama saved as a sharded folder (the smoke test)."""
    from mtmoe.model.base import tiny_llama

    base = root / "base"
    tiny_llama(49152).save_pretrained(base, max_shard_size="2MB")
    run = root / "run"
    overrides = [f"model.base={base}", "train.steps=2", "train.save_every=2", f"train.output_dir={run}",
                 "train.eval_metrics=false", "data.eval_max_samples=2",
                 *([f"data.tokenized={data}"] if data else [])]  # fmt: skip
    subprocess.run([sys.executable, "launch/train.py", "--config", RECIPE, *overrides], check=True)
    return run


def run_export(args) -> dict[str, Any]:
    from safetensors.torch import load_file

    from mtmoe.export.run import run_config
    from mtmoe.model.base import resolve_base, safetensors_files

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = _tiny_run(Path(tmp), args.data) if args.tiny else args.run
        base = resolve_base(run_config(run).model.base)
        for variant, flag in (("in_memory", "--no-metrics"), ("streamed", "--stream")):
            dest = Path(tmp) / variant
            cmd = [sys.executable, "-c", _EXPORT_CHILD, "export", "--run", str(run), "--out", str(dest), flag]
            said = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peak = int(said.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) * 1024
            files = safetensors_files(dest)
            out[variant] = {
                "peak_rss": peak,
                "files": len(files),
                "bytes": sum(f.stat().st_size for f in files),
            }
            out[variant]["tensors"] = {k: v for f in files for k, v in load_file(f).items()}
        a, b = out["in_memory"].pop("tensors"), out["streamed"].pop("tensors")
        identical = all(k in b and bool((a[k].to(b[k].dtype) == b[k]).all()) for k in a)
        base_bytes = sum(f.stat().st_size for f in safetensors_files(base))
    return {
        "benchmark": "zero3 export",
        "run": "tiny random Llama, 2 steps (smoke test)" if args.tiny else str(args.run),
        "base_bytes": base_bytes,
        "identical": identical,
        "machine": machine_info(),
        "variants": out,
    }


def render_export(result: Mapping[str, Any]) -> str:
    labels = {"in_memory": "in memory (`--no-metrics`): the whole model folded", "streamed": "`--stream`"}
    lines = [
        f"Exporting `{result['run']}` (base weights {result['base_bytes'] / MIB:.0f} MiB), each in a fresh "
        f"process; the two exports' tensors are {'identical' if result['identical'] else 'NOT identical'}:",
        "",
        "| export | peak RSS, MiB | weight files | MiB written |",
        "|---|---:|---:|---:|",
    ]
    for variant, v in result["variants"].items():
        lines.append(
            f"| {labels[variant]} | {v['peak_rss'] / MIB:.0f} | {v['files']} | {v['bytes'] / MIB:.0f} |"
        )
    return "\n".join(lines)


def _export_arguments(p) -> None:
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished run (default: the demo's)")
    p.add_argument("--data", type=Path, default=None, help="--tiny: tokenized folder (default: the recipe's)")


def _step_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--data", type=Path, default=None, help="tokenized folder (default: the recipe's)")
    p.add_argument(
        "--zero3-json", type=Path, default=None, help="ZeRO-3's base DeepSpeed JSON (default: shipped)"
    )
    p.add_argument(
        "--micro-batch", type=int, default=0, help="samples per micro-batch (default: the recipe's)"
    )


MODES = {
    "step": cli.Mode(
        cli.CliDefaults(
            cli.RESULTS / "zero3_step.json", rounds=3, iters=None, warmup=2, quick=(1, 1, 1), tiny=True
        ),
        run_step,
        render_step,
        arguments=_step_arguments,
        help="step time and memory per rank, ZeRO-3 against ZeRO-2",
    ),
    "plans": cli.Mode(
        cli.CliDefaults(cli.RESULTS / "zero3_plans.json", iters=None),
        run_plans,
        render_plans,
        help="what fits where: the big recipes planned under ZeRO-2 and ZeRO-3 (no weights needed)",
    ),
    "export": cli.Mode(
        cli.CliDefaults(cli.RESULTS / "zero3_export.json", iters=None, tiny=True),
        run_export,
        render_export,
        arguments=_export_arguments,
        help="peak host memory of the in-memory export against the streamed one",
    ),
    "loading": cli.Mode(
        cli.CliDefaults(cli.RESULTS / "zero3_loading.json", iters=None, tiny=True),
        run_loading,
        render_loading,
        help="bytes read and peak host memory of loading, whole against sharded",
    ),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli.main(__doc__.splitlines()[0], MODES, argv)


if __name__ == "__main__":
    main()
