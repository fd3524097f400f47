"""Score a finished run: base vs trained MoE vs dense export, per task, plus sample generations.

    python launch/report.py --run runs/demo --export runs/demo/dense [--generations 2 --gen-tokens 48]

Writes RUN/report.json and RUN/report.md. The MoE loss comes from the run's final evaluation
(eval.json); the base and the dense export are scored here with the same evaluation code, unless
`launch/export.py` already scored them (its `export_report.json`). For tasks that declared a metric, the
report leads with each model's score, and its generations are the greedy answers the export scored
(`generations.json` of the export); without them, a few answers are generated here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtmoe.runtime import configure_process, set_torch_threads  # noqa: E402

configure_process()


def main(argv: list[str] | None = None) -> dict:
    """Builds and writes the report; returns it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--export", required=True, type=Path, help="the folder written by launch/export.py")
    parser.add_argument("--generations", type=int, default=2, help="generations per task in report.md")
    parser.add_argument("--gen-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from mtmoe.data.shards import load_manifest, open_shard
    from mtmoe.eval.generation import prompt_of
    from mtmoe.eval.heatmap import read_metrics, write_curves
    from mtmoe.eval.heldout import heldout_losses, hf_loss_fn
    from mtmoe.eval.report import generate, write_report
    from mtmoe.export.run import run_config
    from mtmoe.model.base import load_tokenizer, resolve_base
    from mtmoe.model.moe_lm import build_base

    set_torch_threads()
    cfg = run_config(args.run)
    trained = json.loads((args.run / "eval.json").read_text())
    manifest = load_manifest(Path(cfg.data.tokenized))
    tokenizer = load_tokenizer(resolve_base(manifest.tokenizer))
    shards = [open_shard(manifest, name, "eval") for name in trained["tasks"]]
    models = {
        "base": build_base(cfg, len(tokenizer)).eval(),
        "dense": AutoModelForCausalLM.from_pretrained(args.export).eval(),
    }

    losses = {}
    export_report = args.export / "export_report.json"
    if export_report.exists():  # export.py already scored the base and the export on the same shards
        scored = json.loads(export_report.read_text())["tasks"]
        losses["base"] = {n: {"loss": t["base_loss"]} for n, t in scored.items()}
        losses["dense"] = {n: {"loss": t["export_loss"]} for n, t in scored.items()}
    else:
        for kind, model in models.items():
            losses[kind] = heldout_losses(
                hf_loss_fn(model), shards, tokenizer.pad_token_id, 8, cfg.data.eval_max_samples
            )
    scored = json.loads(export_report.read_text())["tasks"] if export_report.exists() else {}
    answers_path = args.export / "generations.json"
    answers = json.loads(answers_path.read_text()) if answers_path.exists() else {}
    generations = {}
    for shard in shards:
        generations[shard.name] = []
        for i in range(min(args.generations, len(shard))):
            prompt, reference = prompt_of(*shard[i])
            sample = {
                "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                "reference": tokenizer.decode(reference, skip_special_tokens=True),
            }
            if shard.name in answers.get("export", {}):  # the answers the metrics scored
                for kind, key in (("base", "base"), ("moe", "moe"), ("dense", "export")):
                    sample[kind] = answers[key][shard.name][i]
            else:
                for kind, model in models.items():
                    sample[kind] = generate(model, tokenizer, prompt, args.gen_tokens)
            generations[shard.name].append(sample)

    tasks = {}
    for name, t in trained["tasks"].items():
        tasks[name] = {
            "base_loss": losses["base"][name]["loss"],
            "moe_loss": t["loss"],
            "dense_loss": losses["dense"][name]["loss"],
            "tokens": t["tokens"],
        }
        if "metric" in scored.get(name, {}):
            s = scored[name]
            tasks[name].update(
                metric=s["metric"],
                samples=s["samples"],
                base_score=s["base_score"],
                moe_score=s["moe_score"],
                dense_score=s["export_score"],
            )
    report = {
        "base": cfg.model.base,
        "tasks": tasks,
        "train": trained["train"],
        "export": {
            "path": str(args.export.resolve()),
            **json.loads((args.export / "mtmoe_export.json").read_text()),
        },
        "generations": generations,
    }
    curves = write_curves(read_metrics(args.run / "metrics.jsonl"), args.run / "report")
    heatmaps = sorted((args.run / "utilization").glob("L*.png"))
    shown = [heatmaps[i] for i in sorted({0, len(heatmaps) // 2, len(heatmaps) - 1})] if heatmaps else []
    report["figures"] = [str(p.relative_to(args.run)) for p in curves + shown]
    write_report(report, args.run)
    for name, t in report["tasks"].items():
        print(
            f"[mtmoe] {name}: base {t['base_loss']:.3f}  moe {t['moe_loss']:.3f}  dense {t['dense_loss']:.3f}"
        )
    print(f"[mtmoe] wrote {args.run / 'report.json'} and {args.run / 'report.md'}")
    return report


if __name__ == "__main__":
    main()
