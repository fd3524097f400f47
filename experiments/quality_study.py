"""The quality study: each task's own metric for plain LoRA baselines and MoE-LoRA variants, same budget.

    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.quality_study --jobs 2       # the whole study
    ... --only lora_active_rank upcycled_top2       # some variants (results merge into the JSON)
    ... --smoke --data DIR --json X --out DIR       # the machinery on a tiny random Llama, in seconds
    ... --render experiments/results/quality_study.json
    ... --backfill                                  # re-score the base, add diagnostics to finished runs

The study is data (`experiments/quality_study.yaml`): the recipe, the overrides every run shares, the
variants with their overrides, the learning rates and the seeds. Every run is `launch/train.py` in a
process of its own (one thread; `--jobs` of them side by side), so runs share the recipe, data, sampler,
loss, loop and evaluation and differ only in their adapter and learning rate:
1. **Learning rate.** Every variant trains once per learning rate at the first seed; the rate with the
   lowest mean held-out loss over the tasks goes on (a gate weight below 1 shrinks each expert's
   effective update, so one shared rate would favour the plain LoRA). A variant whose best rate is the
   largest it tried also tries twice that, up to `max_lr`, until the best is inside the grid. The rate
   is chosen on the same held-out samples that are scored: optimistic for every variant alike.
2. **Seeds.** The variants of `seeded`, and the best of `seeded_best_of` (by that mean loss), train at
   the other seeds with their chosen rate.
The `--jobs` slots never idle at a phase boundary: a run starts as soon as what it depends on is known
(a variant's seeds once its rate is settled; the best of `seeded_best_of` once all of them are), and the
one-seed variants (remedies) come last.
Per run, the JSON keeps each task's held-out loss and declared metric (from `eval.json`), how the task's
gate weight spreads over the experts (from `utilization.json`'s gate mass, which a soft router or task
gate moves even though every token reaches every expert: the normalised entropy of its per-layer expert
shares, 1 = even, 0 = one expert; the mean largest share; and the mean total-variation distance between
tasks' shares, 0 = all tasks route alike), the trainable parameters and the seconds per step (wall, with
`--jobs` runs sharing the machine). The base model is scored once, the same way. Results are written after
every run, so a partial study is kept; a run already in the JSON is not repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.cli import TINY_OVERRIDES, print_rendered, write_result
from benchmarks.tables import paragraph, table

ROOT = Path(__file__).resolve().parents[1]
STUDY = Path(__file__).resolve().parent / "quality_study.yaml"
RESULT = Path(__file__).resolve().parent / "results" / "quality_study.json"
SMOKE = {  # the machinery on a tiny random Llama: 2 steps, one rate, two seeds, two variants
    "common": ["train.steps=2", "train.warmup_steps=1", "data.eval_gen_samples=2", "data.eval_max_samples=4"],
    "lrs": [1.0e-3],
    "seeds": [0, 1],
    "only": ["lora_active_rank", "moefied_soft_fade"],  # one of `seeded`, one of `seeded_best_of`
}


def prepare_data(study: dict) -> None:
    """Builds the demo's JSONL (with the langid task) and tokenizes the study's tasks, when missing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not (ROOT / "data" / "demo" / "jsonl" / "langid.jsonl").exists():
        cmd = [sys.executable, "data_prep/build_demo_tasks.py", "--out", "data/demo/jsonl"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    if not (ROOT / study["data"] / "manifest.json").exists():
        cmd = [sys.executable, "data_prep/tokenize_tasks.py", *study["tokenize"], f"--out={study['data']}"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def data_dir(extra: list[str]) -> Path:
    """The tokenized data the runs train on (the `data.tokenized=` override every run carries)."""
    return ROOT / next(o.split("=", 1)[1] for o in extra if o.startswith("data.tokenized="))


def rates(study: dict, variant: str) -> list[float]:
    """The learning rates `variant` is tried at: its own `lrs`, or the study's."""
    return study["variants"][variant].get("lrs", study["lrs"])


def run_key(variant: str, lr: float, seed: int) -> str:
    return f"{variant}|lr={lr:g}|seed={seed}"


def run_dir_of(out: Path, variant: str, lr: float, seed: int) -> Path:
    return out / run_key(variant, lr, seed).replace("|", "_").replace("=", "")


def train_run(study: dict, variant: str, lr: float, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """Trains one (variant, rate, seed) in its own process and reads back what it wrote."""
    run_dir = run_dir_of(out, variant, lr, seed)
    overrides = [*study["common"], *study["variants"][variant]["overrides"], *extra]
    overrides += [f"train.lr={lr}", f"train.seed={seed}", f"train.output_dir={run_dir}"]
    cmd = [sys.executable, "launch/train.py", "--config", study["recipe"], *overrides]
    if run_dir.exists():  # a run cut short earlier: start it afresh rather than append to its logs
        shutil.rmtree(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} lr={lr} seed={seed} failed:\n{proc.stderr[-4000:]}")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    util = json.loads((run_dir / "utilization.json").read_text())
    train = evaluation["train"]
    answers = json.loads((run_dir / "generations.json").read_text())
    add_diagnostics(evaluation["tasks"], answers, data_dir(extra))
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "tasks": evaluation["tasks"],
        "routing": routing_spread(util),
        "trainable_params": trainable_params(run_dir),
        "s_per_step": train["wall_s"] / max(train["steps"], 1),
        "wall_s": time.perf_counter() - start,
    }


def answer_diagnostics(answers: dict[str, list[str]], data: Path) -> dict[str, dict[str, float]]:
    """Per scored task, what the declared metric may hide.

    The answers' mean length in characters against the references', and for a chrF task also chrF at
    β = 1: sacrebleu's default β = 2 weighs recall four times precision, so a long answer that repeats
    the prompt can outscore a short one in the right form.
    """
    import sacrebleu

    from mtmoe.data.shards import load_manifest, open_references

    manifest = load_manifest(data)
    out = {}
    for task, said in answers.items():
        refs = [r.answer for r in open_references(manifest, task)[: len(said)]]
        if not said:
            continue
        diag = {
            "answer_chars": statistics.mean(len(a) for a in said),
            "reference_chars": statistics.mean(len(r) for r in refs),
        }
        if manifest.task(task).metric_spec.name == "chrf":
            diag["chrf_beta1"] = sacrebleu.metrics.CHRF(beta=1).corpus_score(said, [refs]).score
        out[task] = diag
    return out


def add_diagnostics(tasks: dict[str, dict], answers: dict[str, list[str]], data: Path) -> None:
    for task, diag in answer_diagnostics(answers, data).items():
        tasks[task]["diagnostics"] = diag


def trainable_params(run_dir: Path) -> int:
    """Elements in the final checkpoint's trainable tensors (read from the file's header only)."""
    from safetensors import safe_open

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    with safe_open(run_dir / "checkpoints" / latest / "trainable.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def routing_spread(util: dict) -> dict[str, Any] | None:
    """Per task, how its held-out gate weight spreads over the experts (None for a model without experts).

    The gate mass, not the token counts: under a soft router or a task gate every token reaches every
    expert, so the counts are even whatever the gates learned.
    """
    layers = util.get("layers") or {}
    if not layers:
        return None
    tasks, E = util["tasks"], util["num_experts"]
    shares: dict[str, list[list[float]]] = {t: [] for t in tasks}
    for counts in layers.values():
        for x, t in enumerate(tasks):
            row = counts["mass"][x]
            total = sum(row)
            if total > 0:
                shares[t].append([c / total for c in row])
    out: dict[str, Any] = {}
    for t, per_layer in shares.items():
        if not per_layer:
            continue
        entropy = [-sum(p * math.log(p) for p in s if p > 0) / math.log(E) for s in per_layer]
        out[t] = {
            "entropy": statistics.mean(entropy),
            "top_share": statistics.mean(max(s) for s in per_layer),
        }
    seen = [t for t in tasks if shares[t]]
    pairs = [(a, b) for i, a in enumerate(seen) for b in seen[i + 1 :]]
    if pairs:
        tv = [
            0.5 * sum(abs(p - q) for p, q in zip(sa, sb, strict=True))
            for a, b in pairs
            for sa, sb in zip(shares[a], shares[b], strict=True)
        ]
        out["task_distance"] = statistics.mean(tv)
    out["measure"] = "mass"
    return out


def score_base(study: dict, extra: list[str]) -> dict[str, Any]:
    """The base model's held-out loss and metrics, by the same code as every run's final evaluation."""
    import torch

    from mtmoe.config import load_config
    from mtmoe.data.shards import load_manifest, open_shard
    from mtmoe.eval.generation import hf_step
    from mtmoe.eval.heldout import heldout_losses, hf_loss_fn
    from mtmoe.eval.task_metrics import metric_summary, score_tasks
    from mtmoe.model.base import load_tokenizer, resolve_base
    from mtmoe.model.moe_lm import build_base

    torch.set_num_threads(1)
    cfg = load_config(ROOT / study["recipe"], [*study["common"], *extra])
    manifest = load_manifest(Path(cfg.data.tokenized))
    tokenizer = load_tokenizer(resolve_base(manifest.tokenizer))
    names = [t.name for t in manifest.tasks]
    shards = [open_shard(manifest, n, "eval") for n in names]
    base = build_base(cfg, len(tokenizer)).eval()
    losses = heldout_losses(hf_loss_fn(base), shards, tokenizer.pad_token_id, 8, cfg.data.eval_max_samples)
    scored = score_tasks(hf_step(base), manifest, names, tokenizer, cfg.data.eval_gen_samples)
    tasks = {n: {**losses[n], **metric_summary(scored).get(n, {})} for n in names}
    add_diagnostics(tasks, {n: r["answers"] for n, r in scored.items()}, data_dir(extra))
    return tasks


def mean_loss(run: dict) -> float:
    return statistics.mean(t["loss"] for t in run["tasks"].values())


def best_lr(runs: dict, variant: str, seed: int) -> float | None:
    """The rate of `variant` with the lowest mean held-out loss at `seed` (None before any ran)."""
    tried = [r for r in runs.values() if r["variant"] == variant and r["seed"] == seed]
    return min(tried, key=mean_loss)["lr"] if tried else None


def edge_rates(study: dict, runs: dict, variants: list[str]) -> list[tuple[str, float, int]]:
    """Phase 1b: the runs that follow a best rate found at the top of a variant's grid.

    A variant whose best rate is the largest of the several it tried also tries twice that, up to the
    study's `max_lr`, so that a rate at the grid's edge is not taken for the best.
    """
    first, jobs = study["seeds"][0], []
    for v in variants:
        tried = sorted({r["lr"] for r in runs.values() if r["variant"] == v and r["seed"] == first})
        if len(tried) > 1 and best_lr(runs, v, first) == tried[-1] and 2 * tried[-1] <= study["max_lr"]:
            jobs.append((v, 2 * tried[-1], first))
    return jobs


def settled(study: dict, runs: dict, variant: str, busy: set) -> bool:
    """Whether `variant`'s rate is chosen: its grid has run, no edge rate follows, none is in flight."""
    first = study["seeds"][0]
    grid_done = all(run_key(variant, lr, first) in runs for lr in rates(study, variant))
    following = any(v == variant for v, _, _ in edge_rates(study, runs, [variant]))
    in_flight = any(v == variant and s == first for v, _, s in busy)
    return grid_done and not following and not in_flight


def plan_seeds(study: dict, runs: dict, variants: list[str], busy: frozenset = frozenset()) -> list[tuple]:
    """Phase 2: the other seeds of the seeded variants and of the best `seeded_best_of` variant.

    A variant's seeds wait until its rate is settled; the best of `seeded_best_of` waits for all of them.
    """
    first = study["seeds"][0]
    seeded = [v for v in study.get("seeded", []) if v in variants and settled(study, runs, v, busy)]
    candidates = [v for v in study.get("seeded_best_of", []) if v in variants]
    if candidates and all(settled(study, runs, v, busy) for v in candidates):
        score = {v: min(mean_loss(r) for r in runs.values() if r["variant"] == v) for v in candidates}
        seeded.append(min(candidates, key=score.get))
    return [(v, best_lr(runs, v, first), s) for v in seeded for s in study["seeds"][1:]]


def ready_jobs(study: dict, runs: dict, variants: list[str], busy: frozenset = frozenset()) -> list[tuple]:
    """The runs that can start now, most needed first, leaving out those done or in flight.

    The rate grids of the compared variants (those seeded), then the rates that follow a best rate at a
    grid's edge, then the other seeds of the settled variants, and last the one-seed variants (remedies).
    """
    first = study["seeds"][0]
    compared = set(study.get("seeded", [])) | set(study.get("seeded_best_of", []))

    def grid(vs: list[str]) -> list[tuple]:
        return [(v, lr, first) for lr in study["lrs"] for v in vs if lr in rates(study, v)] + [
            (v, lr, first) for v in vs for lr in rates(study, v) if lr not in study["lrs"]
        ]

    order = [
        *grid([v for v in variants if v in compared]),
        *edge_rates(study, runs, variants),
        *plan_seeds(study, runs, variants, busy),
        *grid([v for v in variants if v not in compared]),
    ]
    ready = []
    for job in order:
        if run_key(*job) not in runs and job not in busy and job not in ready:
            ready.append(job)
    return ready


def run_study(study: dict, args: argparse.Namespace, extra: list[str], json_path: Path | None) -> dict:
    result = json.loads(json_path.read_text()) if json_path is not None and json_path.exists() else {}
    result.setdefault("runs", {})
    result["study"] = study
    variants = args.only or list(study["variants"])
    base = result.get("base", {"-": {"metric": "?"}})
    if not all("diagnostics" in t for t in base.values() if t.get("metric")):
        result["base"] = score_base(study, extra)
        write_result(result, json_path)
    for record in result["runs"].values():  # runs recorded before the answer diagnostics existed
        said = run_dir_of(args.out, record["variant"], record["lr"], record["seed"]) / "generations.json"
        if any("diagnostics" not in t for t in record["tasks"].values() if t.get("metric")) and said.exists():
            add_diagnostics(record["tasks"], json.loads(said.read_text()), data_dir(extra))
            write_result(result, json_path)
    for record in result["runs"].values():  # runs recorded when the spread counted tokens, not gate mass
        util = run_dir_of(args.out, record["variant"], record["lr"], record["seed"]) / "utilization.json"
        if record.get("routing") and "measure" not in record["routing"] and util.exists():
            record["routing"] = routing_spread(json.loads(util.read_text()))
            write_result(result, json_path)
    if args.backfill:
        return result
    done = threading.Condition()
    busy: set[tuple] = set()
    failed: set[tuple] = set()  # not retried: the error is raised once every worker is done

    def worker() -> None:
        while True:
            with done:
                while (
                    not (jobs := ready_jobs(study, result["runs"], variants, frozenset(busy | failed)))
                    and busy
                ):
                    done.wait()
                if not jobs:
                    return
                job = jobs[0]
                busy.add(job)
            try:
                record = train_run(study, *job, args.out, extra)
            except BaseException:
                with done:
                    busy.discard(job)
                    failed.add(job)
                    done.notify_all()
                raise
            with done:
                key = run_key(*job)
                result["runs"][key] = record
                busy.discard(job)
                print(
                    f"[study] {key}: mean held-out loss {mean_loss(record):.4f} ({record['wall_s']:.0f} s)",
                    flush=True,
                )
                write_result(result, json_path)
                done.notify_all()

    # a run starts as soon as what it depends on is known (a seed waits for its variant's rate), so no
    # job slot idles at a phase boundary
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(worker) for _ in range(args.jobs)]:
            f.result()
    return result


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def chosen_runs(result: dict) -> dict[str, list[dict]]:
    """Per variant, the runs at its chosen rate (every seed)."""
    study, runs = result["study"], result["runs"]
    out = {}
    for v in study["variants"]:
        lr = best_lr(runs, v, study["seeds"][0])
        if lr is not None:
            out[v] = [r for r in runs.values() if r["variant"] == v and r["lr"] == lr]
    return out


def with_known_rates(study: dict, result: dict) -> dict:
    """`study` with each variant's rate fixed to the one a finished `result` chose: no rate search.

    A rerun then trains each variant at one rate (its seeds, or its one seed); the best of
    `seeded_best_of` is picked again from the rerun's own losses.

    Raises:
        ValueError: Naming the variants `result` chose no rate for.
    """
    chosen = chosen_runs(result)
    if missing := [v for v in study["variants"] if v not in chosen]:
        raise ValueError(f"--rates-from: no rate was chosen for {missing}; finish that study first")
    variants = {v: {**spec, "lrs": [chosen[v][0]["lr"]]} for v, spec in study["variants"].items()}
    return {**study, "variants": variants}


def _short(study: dict, variant: str) -> str:
    """A variant's label up to its closing parenthesis: "(a)"."""
    return study["variants"][variant]["label"].split(")")[0] + ")"


def _rate_cell(result: dict, variant: str, lr: float) -> str:
    """The chosen rate, marked "(top)" when it is the largest of several tried: the grid ended there."""
    first = result["study"]["seeds"][0]
    tried = {r["lr"] for r in result["runs"].values() if r["variant"] == variant and r["seed"] == first}
    return f"{lr:g} (top)" if len(tried) > 1 and lr == max(tried) else f"{lr:g}"


def _spread_cell(spread: dict | None) -> str:
    return "—" if spread is None else f"{spread['entropy']:.2f} / {spread['top_share']:.2f}"


def render_markdown(result: dict) -> str:
    """The README's tables, from the study's JSON (pure).

    Per task, its metric and loss per variant (mean ± std over seeds) and the base model's; how each MoE
    variant routes each task; seconds per step; and one line per task on which variant leads and whether
    its lead exceeds the seed spread.
    """
    study, base = result["study"], result["base"]
    chosen = chosen_runs(result)
    tasks = list(base)
    metric = {t: base[t].get("metric") for t in tasks}
    scored = [t for t in tasks if metric[t]]
    header = ["variant", "lr", "seeds", *[f"{t} {metric[t]}" for t in scored], *[f"{t} loss" for t in tasks]]
    rows = [
        ["base model", "—", "—", *[f"{base[t]['score']:.2f}" for t in scored]]
        + [f"{base[t]['loss']:.3f}" for t in tasks]
    ]
    for v, runs in chosen.items():
        cells = [study["variants"][v]["label"], _rate_cell(result, v, runs[0]["lr"]), str(len(runs))]
        cells += [_mean_std([r["tasks"][t]["score"] for r in runs]) for t in scored]
        cells += [_mean_std([r["tasks"][t]["loss"] for r in runs], 3) for t in tasks]
        rows.append(cells)
    text = table(header, rows, "lrr" + "r" * (len(header) - 3))
    routing_rows = []
    for v, runs in chosen.items():
        spread = runs[0]["routing"]
        if spread is not None:
            cells = [
                f"{spread[t]['entropy']:.2f} / {spread[t]['top_share']:.2f}" if t in spread else "—"
                for t in tasks
            ]
            routing_rows.append([_short(study, v), *cells, f"{spread.get('task_distance', 0.0):.3f}"])
    if routing_rows:
        head = ["variant", *[f"{t}: entropy / largest share" for t in tasks], "distance between tasks"]
        text += "\n\n" + table(head, routing_rows, "l" + "r" * (len(head) - 1))
    text += diagnostics_table(base, chosen, study, scored)
    speed = [
        f"{_short(study, v)} {statistics.mean(r['s_per_step'] for r in runs):.1f} s"
        for v, runs in chosen.items()
    ]
    text += "\n\n" + paragraph(f"Seconds per training step (wall, runs side by side): {', '.join(speed)}.")
    text += "\n\n" + paragraph(" ".join(verdicts(chosen, study, tasks, metric)))
    return paragraph(progress(result)) + "\n\n" + text


def diagnostics_table(base: dict, chosen: dict, study: dict, scored: list[str]) -> str:
    """Answers' length against the references', and chrF at β = 1 beside the declared β = 2.

    Empty before the answer diagnostics exist.
    """
    if not all("diagnostics" in base[t] for t in scored):
        return ""
    beta1 = [t for t in scored if "chrf_beta1" in base[t]["diagnostics"]]
    head = ["variant", *[f"{t}: answer chars" for t in scored], *[f"{t} chrF β=1" for t in beta1]]
    rows = [
        [
            "reference",
            *[f"{base[t]['diagnostics']['reference_chars']:.0f}" for t in scored],
            *["—"] * len(beta1),
        ]
    ]
    rows.append(
        ["base model", *[f"{base[t]['diagnostics']['answer_chars']:.0f}" for t in scored]]
        + [f"{base[t]['diagnostics']['chrf_beta1']:.2f}" for t in beta1]
    )
    for v, runs in chosen.items():
        diag = [r["tasks"] for r in runs if all("diagnostics" in r["tasks"][t] for t in scored)]
        if not diag:
            continue
        cells = [_mean_std([d[t]["diagnostics"]["answer_chars"] for d in diag], 0) for t in scored]
        cells += [_mean_std([d[t]["diagnostics"]["chrf_beta1"] for d in diag]) for t in beta1]
        rows.append([_short(study, v), *cells])
    return "\n\n" + table(head, rows, "l" + "r" * (len(head) - 1))


def progress(result: dict) -> str:
    """Which rates and seeds each variant has run so far (a partial study says so)."""
    study, runs = result["study"], result["runs"].values()
    done = []
    for v in study["variants"]:
        mine = [r for r in runs if r["variant"] == v]
        if mine:
            tried = sorted({r["lr"] for r in mine if r["seed"] == study["seeds"][0]})
            seeds = sorted({r["seed"] for r in mine})
            done.append(f"{_short(study, v)} rates {', '.join(f'{x:g}' for x in tried)}; seeds {seeds}")
    missing = [_short(study, v) for v in study["variants"] if not any(r["variant"] == v for r in runs)]
    total = sum(len(rates(study, v)) for v in study["variants"])
    text = f"Runs so far: {len(result['runs'])} (the rate search alone is {total}). " + "; ".join(done) + "."
    return text + (f" Not run yet: {', '.join(missing)}." if missing else "")


def is_lora(study: dict, variant: str) -> bool:
    """Whether a variant is a plain LoRA (no experts)."""
    return "moe.family=lora" in study["variants"][variant].get("overrides", [])


def render_summary(result: dict) -> str:
    """The headline, for the README: per task, the best plain LoRA against the best mixture (pure).

    Only variants with several seeds compete when there are any, so that every gap has a seed spread to
    be compared with; a gap counts when it exceeds the larger of the two standard deviations.
    """
    study, base = result["study"], result["base"]
    chosen = chosen_runs(result)
    pool = {v: runs for v, runs in chosen.items() if len(runs) > 1} or chosen
    lora = {v: r for v, r in pool.items() if is_lora(study, v)}
    mixture = {v: r for v, r in pool.items() if not is_lora(study, v)}
    if not lora or not mixture:
        return paragraph("No comparison yet: the study has not run both a plain LoRA and a mixture.")
    rows = []
    for t in base:
        name = base[t].get("metric")
        key, sign = ("score", 1) if name else ("loss", -1)

        def best(group: dict, t: str = t, key: str = key, sign: int = sign) -> tuple[str, list[float]]:
            values = {v: [r["tasks"][t][key] for r in runs] for v, runs in group.items()}
            v = max(values, key=lambda v: sign * statistics.mean(values[v]))
            return v, values[v]

        (lv, lvals), (mv, mvals) = best(lora), best(mixture)
        gap = statistics.mean(mvals) - statistics.mean(lvals)
        spreads = [statistics.stdev(x) for x in (lvals, mvals) if len(x) > 1]
        if not spreads:
            beyond = "one seed"
        elif gap == 0:
            beyond = "tie"
        else:
            leader = "mixture" if sign * gap > 0 else "LoRA"
            beyond = f"{leader} ahead, {'beyond' if abs(gap) > max(spreads) else 'within'} {max(spreads):.2f}"
        digits = 2 if name else 3
        base_cell = f"{base[t][key]:.{digits}f}"
        name_of = lambda v: study["variants"][v]["label"].split(":")[0]  # noqa: E731
        lora_cell = f"{name_of(lv)}: {_mean_std(lvals, digits)}"
        mixture_cell = f"{name_of(mv)}: {_mean_std(mvals, digits)}"
        rows.append([t, name or "loss", base_cell, lora_cell, mixture_cell, f"{gap:+.{digits}f}", beyond])
    head = ["task", "metric", "base", "best plain LoRA", "best mixture", "mixture − LoRA", "seed spread"]
    seeds = min(len(r) for r in pool.values())
    note = (
        f"Variants with {seeds} or more seeds, each at its own tuned rate (mean ± std over seeds); the last "
        "column says who is ahead and whether the gap exceeds the larger standard deviation. Every variant, "
        "the routing and the remedies: [docs/quality-study.md](docs/quality-study.md)."
    )
    return table(head, rows, "llrllrl") + "\n\n" + paragraph(note)


def verdicts(chosen: dict, study: dict, tasks: list[str], metric: dict) -> list[str]:
    """Per task: the leading variant by its metric (or loss), and whether its lead beats the seed spread."""
    lines = []
    for t in tasks:
        key, sign = ("score", 1) if metric[t] else ("loss", -1)
        means = {v: statistics.mean(r["tasks"][t][key] for r in runs) for v, runs in chosen.items()}
        if len(means) < 2:
            continue
        best, second = sorted(means, key=lambda v: sign * means[v], reverse=True)[:2]
        gap = abs(means[best] - means[second])
        spreads = [statistics.stdev(r["tasks"][t][key] for r in chosen[v]) for v in (best, second)
                   if len(chosen[v]) > 1]  # fmt: skip
        if spreads:
            note = f"{'beyond' if gap > max(spreads) else 'within'} the seed spread ({max(spreads):.2f})"
        else:
            note = "with one seed each, so no spread to compare with"
        what = metric[t] or "loss"
        if gap == 0:
            tied = [_short(study, v) for v in means if means[v] == means[best]]
            lines.append(f"{t}: {', '.join(tied)} tie at {means[best]:.2f} {what}.")
        else:
            lead = f"{_short(study, best)} leads {_short(study, second)} by {gap:.2f} {what}"
            lines.append(f"{t}: {lead}, {note}.")
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/quality_study"), help="the runs' folder")
    parser.add_argument("--json", type=Path, default=None, help=f"result path (default {RESULT})")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 steps; needs --json")
    parser.add_argument("--data", type=Path, default=None, help="tokenized tasks (default: the recipe's)")
    parser.add_argument("--render", type=Path, default=None, help="only print the tables of this JSON")
    parser.add_argument(
        "--rates-from",
        type=Path,
        default=None,
        help="a finished study's JSON: rerun every variant at the rate it chose (no rate search)",
    )
    parser.add_argument(
        "--backfill",
        action="store_true",
        help="only add what newer code records to the finished runs; train none",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        return print_rendered(args.render, render_markdown)
    study = yaml.safe_load(STUDY.read_text())
    if args.rates_from is not None:
        study = with_known_rates(study, json.loads(args.rates_from.read_text()))
    if unknown := sorted(set(args.only or []) - set(study["variants"])):
        parser.error(f"--only: unknown variant(s) {unknown}; known: {list(study['variants'])}")
    if args.data is None:
        prepare_data(study)
    extra = [f"data.tokenized={args.data or study['data']}"]
    json_path = args.json or RESULT
    if args.smoke:
        if args.json is None:
            parser.error("--smoke: give --json (a smoke run never replaces the real result)")
        study = {
            **study,
            "common": [*study["common"], *SMOKE["common"]],
            "lrs": SMOKE["lrs"],
            "variants": {k: {**v, "lrs": SMOKE["lrs"]} for k, v in study["variants"].items()},
            "seeds": SMOKE["seeds"],
        }
        args.only = args.only or SMOKE["only"]
        extra += list(TINY_OVERRIDES)
    result = run_study(study, args, extra, json_path)
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
