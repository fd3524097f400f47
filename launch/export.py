"""Fold a trained MoE-LoRA run into a dense Hugging Face model of the base architecture.

    python launch/export.py --run runs/demo --out runs/demo/dense \
        [--task all|NAME] [--weights utilization|uniform] [--prune N [--prune-by utilization|random]] \
        [--merge average|task_arithmetic|ties|dare|breadcrumbs [--lam L --density D --drop P ...]] \
        [--peft-rank R]

Each FFN becomes base + merge_e(ΔW_e) (ΔW_e = B_e·A_e). The experts are weighed by their share of gate
mass on the held-out set, over all tasks or for one `--task`; a run trained with router fading uses the
shares it faded toward, so that the export is exactly the final model. `--prune N` keeps the N experts
of each layer with the largest share (or N at random) and renormalises over them. `adamerging` learns
the coefficients of Σ_e λ_e ΔW_e by minimising the prediction entropy on unlabelled held-out inputs.
Attention LoRA folds exactly. The output loads with plain transformers.

By expert family (`moe.family` of the run):
- upcycled: as above. A run with MOELoRA task gates (`moe.task_routing: gate`) is weighed by the gate
  of `--task` (exactly that task's model); shared experts always fold in whole.
- moefied: the dense FFN with every slice's LoRA folded in (exactly the model after router fading).
- native: an HF MoE of the same architecture with each expert's LoRA folded in; `--prune N` keeps N
  experts per layer (by utilization), so a smaller MoE that transformers loads.
- lora (the plain-LoRA baseline): PEFT's own merge of its LoRA into the base.

It also writes `<out>/export_report.json`: per task, the held-out loss of the base, the trained MoE and
the export, and the share of the MoE's gain over the base that the export keeps; for a task that declared
a metric, the three models' scores on greedy answers (the answers go to `<out>/generations.json`;
`--no-metrics` skips this). The MoE's scores are the run's own final ones (`eval.json`, `generations.json`)
when they are of the exported checkpoint, since generating again would give the same answers;
`--rescore` generates them here anyway. `--peft-rank R` also
writes a PEFT LoRA adapter per task (and `all`) under `<out>/adapters/`, for multi-LoRA serving.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtmoe.runtime import configure_process, set_torch_threads

configure_process()


def parse_args(argv: list[str] | None):
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path, help="the run directory (train.output_dir)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the HF folder")
    parser.add_argument(
        "--task", default="all", help="weigh experts for this task's data (default: all tasks)"
    )
    parser.add_argument(
        "--weights",
        default="auto",
        help=(
            "expert weights: utilization|uniform|fade|task_gate (auto: task_gate for a run with "
            "moe.task_routing=gate, fade for a run that faded, else utilization)"
        ),
    )
    parser.add_argument("--prune", type=int, default=0, help="keep only N experts per layer (0 = all)")
    parser.add_argument("--prune-by", default="utilization", help="which experts to keep: utilization|random")
    parser.add_argument(
        "--merge", default="average", help="average|task_arithmetic|ties|dare|breadcrumbs|adamerging"
    )
    parser.add_argument(
        "--lam", type=float, default=None, help="λ of the summing methods (default 1/n, TIES 1)"
    )
    parser.add_argument("--density", type=float, default=0.2, help="TIES: fraction of entries kept")
    parser.add_argument("--drop", type=float, default=0.5, help="DARE: drop rate")
    parser.add_argument("--beta", type=float, default=0.01, help="breadcrumbs: outlier fraction removed")
    parser.add_argument("--gamma", type=float, default=0.8, help="breadcrumbs: small-entry fraction removed")
    parser.add_argument("--seed", type=int, default=0, help="DARE's masks and random pruning")
    parser.add_argument(
        "--ada-granularity", default="layer", help="AdaMerging: λ per layer, or per expert (task)"
    )
    parser.add_argument("--ada-steps", type=int, default=50, help="AdaMerging: Adam steps")
    parser.add_argument("--ada-lr", type=float, default=0.01, help="AdaMerging: learning rate")
    parser.add_argument("--ada-samples", type=int, default=16, help="AdaMerging: unlabelled inputs per task")
    parser.add_argument(
        "--peft-rank", type=int, default=0, help="also write per-task PEFT adapters of this rank"
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="skip the generated-answer metrics of the tasks that declared one (loss only)",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="generate the MoE's answers here even when the run's eval.json already scored its final step",
    )
    return parser.parse_args(argv)


def run_scores(run: Path, names: list[str]) -> dict | None:
    """The run's own scores of its final model, as `score_tasks` gives them, if of the latest checkpoint.

    None when the run has no such scores: no eval.json or generations.json, an eval.json of another step
    than the newest checkpoint (a run resumed or cut short), or a task without its score or answers.
    """
    from mtmoe.train.checkpoint import latest_tag

    evaluation, said, tag = run / "eval.json", run / "generations.json", latest_tag(run)
    if tag is None or not (evaluation.exists() and said.exists()):
        return None
    evaluation, said = json.loads(evaluation.read_text()), json.loads(said.read_text())
    if f"step_{evaluation.get('step', -1):06d}" != tag:
        return None
    tasks = evaluation.get("tasks", {})
    out = {}
    for name in names:
        task = tasks.get(name, {})
        if "score" not in task or name not in said:
            return None
        out[name] = {k: v for k, v in task.items() if k not in ("loss", "tokens")} | {"answers": said[name]}
    return out


def main(argv: list[str] | None = None) -> Path:
    """Exports and returns the output folder."""
    args = parse_args(argv)

    from mtmoe.data.shards import load_manifest, open_shard
    from mtmoe.eval.generation import hf_step
    from mtmoe.eval.heldout import heldout_losses, hf_loss_fn
    from mtmoe.eval.task_metrics import has_metrics, metric_summary, score_tasks
    from mtmoe.eval.utilization import load_utilization
    from mtmoe.export.dense import MergeSpec, fold_to_dense, merged_deltas, save_dense, task_gate_shares
    from mtmoe.export.peft_adapters import write_adapter
    from mtmoe.export.prune import expert_shares, keep_experts, renormalise
    from mtmoe.export.run import fade_shares, load_trained_model
    from mtmoe.model.moe_lm import build_base

    set_torch_threads()
    cfg, model, tokenizer = load_trained_model(args.run)
    util_path = args.run / "utilization.json"
    faded = fade_shares(args.run)
    family = cfg.moe.family
    if family != "upcycled" and (args.merge != "average" or args.peft_rank or args.weights != "auto"):
        raise ValueError(
            f"--merge/--weights/--peft-rank apply to upcycled experts; this run's moe.family is {family}"
        )
    if family in ("moefied", "lora") and args.prune:
        raise ValueError(f"--prune: a {family} run has no experts to prune; the export writes its FFNs whole")
    gated = cfg.moe.task_routing == "gate"
    auto = "utilization"
    if gated or faded or family in ("moefied", "lora"):
        auto = "task_gate" if gated else "fade" if faded else "uniform"
    weights = auto if args.weights == "auto" else args.weights
    if weights not in ("utilization", "uniform", "fade", "task_gate"):
        raise ValueError(f"--weights {args.weights!r}: expected auto|utilization|uniform|fade|task_gate")
    if weights == "task_gate" and not gated:
        raise ValueError("--weights task_gate needs a run trained with moe.task_routing=gate")
    if weights == "fade" and (faded is None or args.task != "all"):
        raise ValueError("--weights fade needs a run trained with moe.fade_fraction > 0 and --task all")
    if (weights == "utilization" or args.prune) and not util_path.exists():
        raise ValueError(f"{util_path} is missing (it is written at the end of training)")
    util = load_utilization(util_path) if util_path.exists() else None
    task = None if args.task == "all" else args.task

    task_ids = {t.name: k for k, t in enumerate(load_manifest(Path(cfg.data.tokenized)).tasks)}

    def shares_for(t):
        if weights == "fade" and t is None:
            return faded
        if weights == "task_gate":  # a task's own gate: exactly its model; `all` averages the gates
            return task_gate_shares(model, None if t is None else task_ids[t])
        return expert_shares(util, t) if weights in ("utilization", "fade") else None

    shares = shares_for(task)
    kept = None
    if args.prune:
        kept = keep_experts(shares or expert_shares(util, task), args.prune, args.prune_by, args.seed)
    ada = args.merge == "adamerging"
    if ada and args.peft_rank:
        raise ValueError("--peft-rank: adapters are not written for --merge adamerging; use another method")
    spec = MergeSpec(
        "average" if ada else args.merge, args.lam, args.density, args.drop, args.beta, args.gamma, args.seed
    )

    manifest = load_manifest(Path(cfg.data.tokenized))
    shards = [open_shard(manifest, t.name, "eval") for t in manifest.tasks]
    pad, n = tokenizer.pad_token_id, cfg.data.eval_max_samples
    names = [s.name for s in shards]
    scored = {}  # kind -> the declared metrics on greedy answers (tasks that declared one)

    def score(kind, step):
        if not args.no_metrics and has_metrics(manifest, names):
            metric_names = [t for t in names if manifest.task(t).metric_spec is not None]
            reused = None if kind != "moe" or args.rescore else run_scores(args.run, metric_names)
            if reused is not None:
                print(f"[mtmoe] MoE scores: the run's own, {args.run / 'eval.json'} (--rescore redoes them)")
                scored[kind] = reused
                return
            scored[kind] = score_tasks(
                step, manifest, names, tokenizer, cfg.data.eval_gen_samples, batch_size=8, progress=True
            )

    losses = {"moe": heldout_losses(lambda *b: model(*b)[0], shards, pad, 8, n, progress="loss: MoE")}
    score("moe", model.eval().next_token_logits)  # before the fold below changes the model
    if args.peft_rank:
        base_for_adapters = args.out / "adapters"
        for name in ["all", *(s.name for s in shards)]:
            deltas = merged_deltas(model, shares_for(None if name == "all" else name), kept, spec)
            write_adapter(build_base(cfg, len(tokenizer)), deltas, args.peft_rank, base_for_adapters / name)
    ada_record = None
    if ada:
        import torch

        from mtmoe.export.adamerging import adamerge

        start = (
            shares
            if shares is not None
            else {i: torch.full((E,), 1.0 / E) for i, E in _experts(model).items()}
        )
        if kept is not None:  # start where every other method starts: the kept shares summing to one
            start = renormalise(start, kept)
        unlabelled = shards if task is None else [s for s in shards if s.name == task]
        lm, ada_record = adamerge(
            model,
            unlabelled,
            pad,
            start,
            kept,
            args.ada_granularity,
            args.ada_steps,
            args.ada_lr,
            args.ada_samples,
        )
        print(
            f"[mtmoe] AdaMerging: held-out prediction entropy {ada_record['entropy_before']:.4f} -> "
            f"{ada_record['entropy_after']:.4f}"
        )
    elif family == "native":  # the same architecture, LoRA folded into every expert, maybe fewer experts
        from transformers import AutoModelForCausalLM

        from mtmoe.model.native import export_native

        state, config = export_native(model.lm, kept)
        lm = AutoModelForCausalLM.from_config(config)
        lm.load_state_dict(state, strict=True)
        lm.generation_config = model.lm.generation_config
    else:
        lm = fold_to_dense(model, shares, kept, spec)
    save_dense(lm, tokenizer, args.out)
    losses["export"] = heldout_losses(hf_loss_fn(lm.eval()), shards, pad, 8, n, progress="loss: export")
    score("export", hf_step(lm))
    base_lm = build_base(cfg, len(tokenizer)).eval()
    losses["base"] = heldout_losses(hf_loss_fn(base_lm), shards, pad, 8, n, progress="loss: base")
    score("base", hf_step(base_lm))

    options = {
        "run": str(args.run),
        "base": cfg.model.base,
        "task": args.task,
        "weights": weights,
        "prune": args.prune,
        "prune_by": args.prune_by if args.prune else None,
        "kept_experts": {str(k): v for k, v in kept.items()} if kept else None,
        "merge": {**vars(spec), "method": args.merge} if not ada else {"method": "adamerging", **ada_record},
        "peft_rank": args.peft_rank,
    }
    report = {"options": options, "tasks": {}}
    for s in shards:
        base, moe, export = (losses[k][s.name]["loss"] for k in ("base", "moe", "export"))
        gain = base - moe
        report["tasks"][s.name] = {
            "base_loss": base,
            "moe_loss": moe,
            "export_loss": export,
            "gain_kept": (base - export) / gain if abs(gain) > 1e-12 else None,
        }
        if scored and s.name in scored["moe"]:
            summary = {kind: metric_summary(by_task)[s.name] for kind, by_task in scored.items()}
            report["tasks"][s.name]["metric"] = summary["moe"]["metric"]
            report["tasks"][s.name]["samples"] = summary["moe"]["samples"]
            for kind in ("base", "moe", "export"):
                report["tasks"][s.name][f"{kind}_score"] = summary[kind]["score"]
        kept_txt = (
            "n/a"
            if report["tasks"][s.name]["gain_kept"] is None
            else f"{report['tasks'][s.name]['gain_kept']:.1%}"
        )
        print(f"[mtmoe] {s.name}: base {base:.4f}  moe {moe:.4f}  export {export:.4f}  gain kept {kept_txt}")
        if "metric" in report["tasks"][s.name]:
            t = report["tasks"][s.name]
            print(
                f"[mtmoe] {s.name} {t['metric']}: base {t['base_score']:.1f}  moe {t['moe_score']:.1f}  "
                f"export {t['export_score']:.1f}"
            )
    (args.out / "export_report.json").write_text(json.dumps(report, indent=1))
    if scored:
        answers = {
            kind: {task: r["answers"] for task, r in by_task.items()} for kind, by_task in scored.items()
        }
        (args.out / "generations.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))
    (args.out / "mtmoe_export.json").write_text(json.dumps(options, indent=1))
    kind = "an MoE" if family == "native" else "a dense"
    print(f"[mtmoe] exported {kind} {type(lm).__name__} to {args.out}")
    return args.out


def _experts(model) -> dict[int, int]:
    """Experts per MoE layer."""
    from mtmoe.model.inject import moe_blocks

    return {i: b.num_experts for i, b in moe_blocks(model.lm).items()}


if __name__ == "__main__":
    main()
