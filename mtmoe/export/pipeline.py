"""The export pipeline: a trained run → a Hugging Face model, scored against the base and the MoE.

Each FFN becomes base + merge_e(ΔW_e) (ΔW_e = B_e·A_e). The experts are weighed by their share of gate
mass on the held-out set, over all tasks or for one task; a run trained with router fading uses the
shares it faded toward, so that the export is exactly the final model. Pruning keeps the n experts of
each layer with the largest share (or n at random) and renormalises over them. AdaMerging learns the
coefficients of Σ_e λ_e ΔW_e by minimising the prediction entropy on unlabelled held-out inputs.
Attention LoRA folds exactly. The output loads with plain transformers.

By expert family (`moe.family` of the run):
- upcycled: as above. A run with MOELoRA task gates (`moe.router: task_gate`) is weighed by the gate
  of the task (exactly that task's model); shared experts always fold in whole.
- moefied: the dense FFN with every slice's LoRA folded in (exactly the model after router fading).
- native: an HF MoE of the same architecture with each expert's LoRA folded in; pruning keeps n experts
  per layer (by utilization), so a smaller MoE that transformers loads.
- lora (the plain-LoRA baseline): PEFT's own merge of its LoRA into the base.

It also writes `<out>/export_report.json`: per task, the held-out loss of the base, the trained MoE and
the export, and the share of the MoE's gain over the base that the export keeps; for a task that declared
a metric, the three models' scores on greedy answers (the answers go to `<out>/generations.json`). The
MoE's scores are the run's own final ones (`eval.json`, `generations.json`) when they are of the exported
checkpoint, since generating again would give the same answers. With `peft_rank` it also writes a PEFT
LoRA adapter per task (and `all`) under `<out>/adapters/`, for multi-LoRA serving.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtmoe.config import Config
from mtmoe.data.shards import Manifest, TaskShard, load_manifest, open_shard
from mtmoe.eval.generation import hf_step
from mtmoe.eval.heldout import heldout_losses, hf_loss_fn
from mtmoe.eval.task_metrics import has_metrics, metric_summary, score_tasks
from mtmoe.eval.utilization import expert_shares, load_utilization
from mtmoe.export.adamerging import adamerge
from mtmoe.export.dense import fold_to_dense, merged_deltas, save_dense, task_gate_shares
from mtmoe.export.methods import MergeSpec
from mtmoe.export.peft_adapters import write_adapter
from mtmoe.export.prune import keep_experts, renormalise
from mtmoe.export.run import fade_shares, load_trained_model, run_config
from mtmoe.export.stream import file_edits, stream_dense, write_record
from mtmoe.model.base import resolve_base
from mtmoe.model.moe_lm import MoELM, build_base
from mtmoe.model.native import export_native
from mtmoe.model.routers import router_class
from mtmoe.model.walk import moe_blocks
from mtmoe.train.checkpoint import latest_tag

WEIGHTS = ("utilization", "uniform", "fade", "task_gate")
SCORED = ("base", "moe", "export")


@dataclass(kw_only=True)
class ExportConfig:
    """What to export and how (the `mtmoe-export` flags).

    Attributes:
        run: The run directory (`train.output_dir`).
        out: Where to write the Hugging Face folder.
        task: Weigh the experts for this task's data; `all` for every task.
        weights: Expert weights: `utilization`, `uniform`, `fade` or `task_gate`; `auto` picks task_gate for
            a run with task gates, fade for a run that faded, else utilization.
        prune: Keep only this many experts per layer (0 = all).
        prune_by: Which experts to keep: `utilization` or `random`.
        merge_spec: The merge method and its options (`mtmoe.export.methods`); ignored by AdaMerging.
        adamerging: Learn the merge coefficients (AdaMerging) instead of `merge_spec`.
        seed: The seed of random pruning.
        ada_granularity: AdaMerging: λ per `layer`, or per expert (`task`).
        ada_steps: AdaMerging: Adam steps.
        ada_lr: AdaMerging: learning rate.
        ada_samples: AdaMerging: unlabelled inputs per task.
        peft_rank: Also write per-task PEFT adapters of this rank (0 = none).
        metrics: Score the tasks that declared a metric on greedy answers.
        rescore: Generate the MoE's answers even when the run's eval.json scored its final step.
        stream: Write the export from the base's weight files one tensor at a time, never holding the
            base (`mtmoe.export.stream`); nothing is scored.
    """

    run: Path
    out: Path
    task: str = "all"
    weights: str = "auto"
    prune: int = 0
    prune_by: str = "utilization"
    merge_spec: MergeSpec = dataclasses.field(default_factory=MergeSpec)
    adamerging: bool = False
    seed: int = 0
    ada_granularity: str = "layer"
    ada_steps: int = 50
    ada_lr: float = 0.01
    ada_samples: int = 16
    peft_rank: int = 0
    metrics: bool = True
    rescore: bool = False
    stream: bool = False


class Weighting:
    """The merge weights of the experts, as `ExportConfig` resolves them for a run."""

    def __init__(self, cfg: Config, ec: ExportConfig, model: MoELM):
        self.name, self.faded, self.util = expert_weighting(cfg, ec)
        self.model, self.ec = model, ec
        manifest = load_manifest(Path(cfg.data.tokenized))
        self.task_ids = {t.name: k for k, t in enumerate(manifest.tasks)}
        self.task = None if ec.task == "all" else ec.task

    def shares(self, task: str | None) -> dict[int, torch.Tensor] | None:
        """Per layer, each expert's merge weight for `task` (None: every task)."""
        if self.name == "fade" and task is None:
            return self.faded
        if self.name == "task_gate":  # a task's own gate: exactly its model; `all` averages the gates
            return task_gate_shares(self.model, None if task is None else self.task_ids[task])
        return expert_shares(self.util, task) if self.name in ("utilization", "fade") else None

    def kept(self) -> dict[int, list[int]] | None:
        """The experts `--prune` keeps, per layer (None: every expert)."""
        ec = self.ec
        if not ec.prune:
            return None
        shares = self.shares(self.task) or expert_shares(self.util, self.task)
        return keep_experts(shares, ec.prune, ec.prune_by, ec.seed)


def stream_export(ec: ExportConfig) -> Path:
    """The streamed export (`--stream`): the base's files tensor by tensor, plus the trained deltas.

    Raises:
        ValueError: Naming the flag, for an option a streamed export cannot take.
    """
    refused = {"--merge adamerging": ec.adamerging, "--peft-rank": ec.peft_rank, "--rescore": ec.rescore}
    if flags := [flag for flag, on in refused.items() if on]:
        raise ValueError(f"--stream: {flags[0]} needs the model in memory; export without --stream")
    family = run_config(ec.run).moe.family
    if family == "moefied" or (family == "native" and ec.prune):
        what = "a moefied run (its blocks hold the FFN re-sliced)" if family == "moefied" else "--prune"
        raise ValueError(f"--stream cannot write {what}; export without --stream")
    cfg, model, tokenizer = load_trained_model(ec.run, empty_base=True)
    weighting = Weighting(cfg, ec, model)
    shares, kept = weighting.shares(weighting.task), weighting.kept()
    edits, required = file_edits(model, family, shares, kept, ec.merge_spec)
    stats = stream_dense(resolve_base(cfg.model.base), ec.out, edits, required)
    tokenizer.save_pretrained(ec.out)
    options = {"run": str(ec.run), "base": cfg.model.base, "task": ec.task, "weights": weighting.name,
               "prune": ec.prune, "kept_experts": {str(k): v for k, v in kept.items()} if kept else None,
               "merge": ec.merge_spec.record()}  # fmt: skip
    write_record(ec.out, options, stats)
    gib, largest = stats.bytes / 2**30, stats.largest_tensor_bytes / 2**20
    print(f"[mtmoe] streamed {stats.tensors} tensors ({gib:.2f} GiB, {stats.edited} with a delta) in "
          f"{stats.files} file(s) to {ec.out}; largest held at once {largest:.1f} MiB")  # fmt: skip
    return ec.out


def export_run(ec: ExportConfig) -> Path:
    """Exports a run as `ec` says, writes its report, and returns the output folder."""
    if ec.stream:
        return stream_export(ec)
    cfg, model, tokenizer = load_trained_model(ec.run)
    weighting = Weighting(cfg, ec, model)
    weights, task, shares_for = weighting.name, weighting.task, weighting.shares
    shares, kept = shares_for(task), weighting.kept()
    spec = MergeSpec() if ec.adamerging else ec.merge_spec
    manifest = load_manifest(Path(cfg.data.tokenized))
    shards = [open_shard(manifest, t.name, "eval") for t in manifest.tasks]
    scorer = Scorer(ec, cfg, manifest, shards, tokenizer)
    scorer.score("moe", lambda *b: model(*b)[0], model.eval().next_token_logits)  # before the fold
    if ec.peft_rank:
        for name in ["all", *(s.name for s in shards)]:
            deltas = merged_deltas(model, shares_for(None if name == "all" else name), kept, spec)
            write_adapter(build_base(cfg, len(tokenizer)), deltas, ec.peft_rank, ec.out / "adapters" / name)
    lm, ada_record = fold(ec, cfg, model, shards, tokenizer.pad_token_id, shares, kept, spec, task)
    save_dense(lm, tokenizer, ec.out)
    scorer.score("export", hf_loss_fn(lm.eval()), hf_step(lm))
    base_lm = build_base(cfg, len(tokenizer)).eval()
    scorer.score("base", hf_loss_fn(base_lm), hf_step(base_lm))
    options = {
        "run": str(ec.run),
        "base": cfg.model.base,
        "task": ec.task,
        "weights": weights,
        "prune": ec.prune,
        "prune_by": ec.prune_by if ec.prune else None,
        "kept_experts": {str(k): v for k, v in kept.items()} if kept else None,
        "merge": spec.record() if not ec.adamerging else {"method": "adamerging", **ada_record},
        "peft_rank": ec.peft_rank,
    }
    scorer.write(options)
    (ec.out / "mtmoe_export.json").write_text(json.dumps(options, indent=1))
    kind = "an MoE" if cfg.moe.family == "native" else "a dense"
    print(f"[mtmoe] exported {kind} {type(lm).__name__} to {ec.out}")
    return ec.out


def expert_weighting(cfg: Config, ec: ExportConfig) -> tuple[str, Any, dict | None]:
    """The weighting `ec` resolves to for this run, its faded shares and its utilization.

    Raises:
        ValueError: Naming the flag, for a combination the run cannot take.
    """
    family, faded = cfg.moe.family, fade_shares(ec.run)
    util_path = ec.run / "utilization.json"
    merges = ec.adamerging or ec.merge_spec.method != "average"
    if family != "upcycled" and (merges or ec.peft_rank or ec.weights != "auto"):
        raise ValueError(
            f"--merge/--weights/--peft-rank apply to upcycled experts; this run's moe.family is {family}"
        )
    if family in ("moefied", "lora") and ec.prune:
        raise ValueError(f"--prune: a {family} run has no experts to prune; the export writes its FFNs whole")
    gated = cfg.moe.family == "upcycled" and router_class(cfg.moe.router).per_task
    auto = "utilization"
    if gated or faded or family in ("moefied", "lora"):
        auto = "task_gate" if gated else "fade" if faded else "uniform"
    weights = auto if ec.weights == "auto" else ec.weights
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {ec.weights!r}: expected auto|{'|'.join(WEIGHTS)}")
    if weights == "task_gate" and not gated:
        raise ValueError("--weights task_gate needs a run trained with moe.router=task_gate")
    if weights == "fade" and (faded is None or ec.task != "all"):
        raise ValueError("--weights fade needs a run trained with moe.fade_fraction > 0 and --task all")
    if (weights == "utilization" or ec.prune) and not util_path.exists():
        raise ValueError(f"{util_path} is missing (it is written at the end of training)")
    if ec.adamerging and ec.peft_rank:
        raise ValueError("--peft-rank: adapters are not written for --merge adamerging; use another method")
    return weights, faded, load_utilization(util_path) if util_path.exists() else None


def fold(
    ec: ExportConfig,
    cfg: Config,
    model: MoELM,
    shards: list[TaskShard],
    pad_id: int,
    shares: dict | None,
    kept: dict | None,
    spec: MergeSpec,
    task: str | None,
) -> tuple[nn.Module, dict | None]:
    """The exported model (and AdaMerging's record, when it learned the coefficients)."""
    if ec.adamerging:
        experts = {i: b.num_experts for i, b in moe_blocks(model.lm).items()}
        start = shares if shares is not None else {i: torch.full((E,), 1.0 / E) for i, E in experts.items()}
        if kept is not None:  # start where every other method starts: the kept shares summing to one
            start = renormalise(start, kept)
        unlabelled = shards if task is None else [s for s in shards if s.name == task]
        settings = (ec.ada_granularity, ec.ada_steps, ec.ada_lr, ec.ada_samples)
        lm, record = adamerge(model, unlabelled, pad_id, start, kept, *settings)
        print(
            f"[mtmoe] AdaMerging: held-out prediction entropy {record['entropy_before']:.4f} -> "
            f"{record['entropy_after']:.4f}"
        )
        return lm, record
    if cfg.moe.family == "native":  # the same architecture, LoRA folded into every expert, maybe fewer
        from transformers import AutoModelForCausalLM

        state, config = export_native(model.lm, kept)
        lm = AutoModelForCausalLM.from_config(config)
        lm.load_state_dict(state, strict=True)
        lm.generation_config = model.lm.generation_config
        return lm, None
    return fold_to_dense(model, shares, kept, spec), None


class Scorer:
    """Held-out losses and task metrics of the MoE, the export and the base, and the report of them."""

    def __init__(self, ec: ExportConfig, cfg: Config, manifest: Manifest, shards: list[TaskShard], tokenizer):
        self.ec, self.cfg, self.manifest, self.shards, self.tokenizer = ec, cfg, manifest, shards, tokenizer
        self.names = [s.name for s in shards]
        self.losses: dict[str, dict] = {}
        self.scored: dict[str, dict] = {}  # kind -> the declared metrics on greedy answers

    def score(self, kind: str, loss_fn, step) -> None:
        """Scores one model: its held-out losses, then its metrics (the MoE's may be the run's own)."""
        pad, n = self.tokenizer.pad_token_id, self.cfg.data.eval_max_samples
        label = {"moe": "MoE"}.get(kind, kind)
        self.losses[kind] = heldout_losses(loss_fn, self.shards, pad, 8, n, progress=f"loss: {label}")
        if not self.ec.metrics or not has_metrics(self.manifest, self.names):
            return
        metric_names = [t for t in self.names if self.manifest.task(t).metric_spec is not None]
        reused = None if kind != "moe" or self.ec.rescore else run_scores(self.ec.run, metric_names)
        if reused is not None:
            print(f"[mtmoe] MoE scores: the run's own, {self.ec.run / 'eval.json'} (--rescore redoes them)")
            self.scored[kind] = reused
            return
        gen_n = self.cfg.data.eval_gen_samples
        self.scored[kind] = score_tasks(
            step, self.manifest, self.names, self.tokenizer, gen_n, batch_size=8, progress=True
        )

    def write(self, options: dict) -> None:
        """Writes export_report.json (and generations.json) and prints one line per task."""
        report = {"options": options, "tasks": {name: self.task_report(name) for name in self.names}}
        (self.ec.out / "export_report.json").write_text(json.dumps(report, indent=1))
        if self.scored:
            answers = {
                kind: {t: r["answers"] for t, r in by_task.items()} for kind, by_task in self.scored.items()
            }
            (self.ec.out / "generations.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))

    def task_report(self, name: str) -> dict[str, Any]:
        """One task's losses, gain kept and scores; printed as well."""
        base, moe, export = (self.losses[k][name]["loss"] for k in SCORED)
        gain = base - moe
        t = {
            "base_loss": base,
            "moe_loss": moe,
            "export_loss": export,
            "gain_kept": (base - export) / gain if abs(gain) > 1e-12 else None,
        }
        if self.scored and name in self.scored["moe"]:
            summary = {kind: metric_summary(by_task)[name] for kind, by_task in self.scored.items()}
            t["metric"], t["samples"] = summary["moe"]["metric"], summary["moe"]["samples"]
            for kind in SCORED:
                t[f"{kind}_score"] = summary[kind]["score"]
        kept = "n/a" if t["gain_kept"] is None else f"{t['gain_kept']:.1%}"
        print(f"[mtmoe] {name}: base {base:.4f}  moe {moe:.4f}  export {export:.4f}  gain kept {kept}")
        if "metric" in t:
            print(
                f"[mtmoe] {name} {t['metric']}: base {t['base_score']:.1f}  moe {t['moe_score']:.1f}  "
                f"export {t['export_score']:.1f}"
            )
        return t


def run_scores(run: Path, names: list[str]) -> dict | None:
    """The run's own scores of its final model, as `score_tasks` gives them, if of the latest checkpoint.

    None when the run has no such scores: no eval.json or generations.json, an eval.json of another step
    than the newest checkpoint (a run resumed or cut short), or a task without its score or answers.
    """
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
