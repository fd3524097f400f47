"""Every export of a trained run: merge method × pruning level against held-out loss, retention and speed.

For one trained run (the demo: SmolLM2-135M, 4 upcycled LoRA experts, top-2, router fading) the MoE model
is loaded once, and a deep copy is folded into a dense model of the base architecture for every method
and pruning level of `export_comparison.yaml` (experts weighed by their held-out gate mass), plus the
exact export of a faded run. Per row: each task's held-out loss and the retention `gain kept = (base −
export) / (base − MoE)`. One export is saved, reloaded with plain transformers and timed against the base
and the routed MoE (no grad, CPU time, interleaved rounds); it is also loaded in a process without mtmoe.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python -m experiments.export_comparison --run runs/demo
    ... --quick     # ~6 min: the YAML's quick settings; prints only
    ... --render experiments/results/export_comparison.json   # only print the docs' table of a JSON
    ... --only adamerging --update experiments/results/export_comparison.json
        # re-runs only these methods' rows with the JSON's settings and replaces them in it (in place)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, PreTrainedModel

from benchmarks.cli import print_rendered, result_path, write_result
from benchmarks.harness import machine_info, summarize, time_rounds, timing_settings
from benchmarks.models import logit_forwards
from benchmarks.tables import table
from mtmoe.config import Config
from mtmoe.data.shards import load_manifest, open_shard
from mtmoe.eval.heldout import LossFn, heldout_losses, hf_loss_fn
from mtmoe.eval.utilization import expert_shares, load_utilization
from mtmoe.export.adamerging import adamerge
from mtmoe.export.dense import fold_to_dense, save_dense
from mtmoe.export.methods import MERGES, MergeSpec
from mtmoe.export.prune import keep_experts, renormalise
from mtmoe.export.run import fade_shares, load_trained_model, model_experts
from mtmoe.model.moe_lm import MoELM, build_base

CONFIG = Path(__file__).resolve().parent / "export_comparison.yaml"
RESULT = Path(__file__).resolve().parent / "results" / "export_comparison.json"
BASELINE = "base"

# A loaded (plain transformers) export in a process that never imports mtmoe; writes its logits.
LOAD_CHECK = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    assert not any(k.split(".")[0] == "mtmoe" for k in sys.modules), "mtmoe was imported"
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
    print(type(model).__name__)
    """
)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the comparison scores and how it times (`export_comparison.yaml` explains each).

    Attributes:
        samples: Held-out samples per task (0 = all).
        eval_batch: Samples per held-out forward.
        methods: Merge methods of the grid.
        prune: Experts kept per layer (0 = all) of the grid.
        ada_steps: AdaMerging's Adam steps.
        ada_samples: AdaMerging's unlabelled inputs per task.
        ada_batch: AdaMerging's inputs per step.
        ada_lr: AdaMerging's learning rate.
        batch: Rows of the timed forward.
        seq: Tokens per row of the timed forward.
        rounds: Interleaved timing rounds.
        warmup: Untimed forwards per variant before the first round.
        seed: DARE's masks and the timed tokens.
    """

    samples: int
    eval_batch: int
    methods: tuple[str, ...]
    prune: tuple[int, ...]
    ada_steps: int
    ada_samples: int
    ada_batch: int
    ada_lr: float
    batch: int
    seq: int
    rounds: int
    warmup: int
    seed: int

    @classmethod
    def of(cls, fields: Mapping[str, Any]) -> Settings:
        """Settings from a mapping of every field (lists as tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_settings(quick: bool = False, path: Path = CONFIG) -> Settings:
    """The `full` settings of the YAML, with its `quick` ones on top when `quick`."""
    raw = yaml.safe_load(path.read_text())
    return Settings.of({**raw["full"], **(raw["quick"] if quick else {})})


@dataclass
class Loaded:
    """A trained run, loaded once: its model, data and expert shares."""

    run: Path
    cfg: Config
    model: MoELM
    tokenizer: Any
    shards: list
    util_shares: dict[int, torch.Tensor]
    fade_shares: dict[int, torch.Tensor] | None

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding token."""
        return self.tokenizer.pad_token_id


def load_run(run: Path) -> Loaded:
    """Loads the run's trained model, its eval shards and its utilization (which must exist)."""
    util_path = run / "utilization.json"
    if not util_path.exists():
        raise ValueError(f"--run {run}: no utilization.json (it is written at the end of training)")
    cfg, model, tokenizer = load_trained_model(run)
    manifest = load_manifest(Path(cfg.data.tokenized))
    shards = [open_shard(manifest, t.name, "eval") for t in manifest.tasks]
    util = expert_shares(load_utilization(util_path))
    return Loaded(run, cfg, model, tokenizer, shards, util, fade_shares(run))


def heldout(loaded: Loaded, loss_fn: LossFn, s: Settings) -> dict[str, dict[str, float]]:
    """Per task, the held-out loss and target tokens on the first `s.samples` samples."""
    return heldout_losses(loss_fn, loaded.shards, loaded.pad_id, s.eval_batch, s.samples)


def retention(base: Mapping[str, float], moe: Mapping[str, float], export: Mapping[str, float]) -> dict:
    """Per task, the MoE's gain over the base that the export keeps, in % (None where there is no gain)."""
    out = {}
    for task, b in base.items():
        gain = b - moe[task]
        out[task] = 100.0 * (b - export[task]) / gain if abs(gain) > 1e-12 else None
    return out


def mean_or_none(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def export_one(
    loaded: Loaded, method: str, prune: int, weights: str, s: Settings
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Folds a deep copy of the trained model as `launch/export.py` would; returns (dense model, record)."""
    shares = loaded.fade_shares if weights == "fade" else loaded.util_shares
    kept = keep_experts(shares, prune) if prune else None
    model = copy.deepcopy(loaded.model)
    record: dict[str, Any] = {"method": method, "weights": weights, "prune": prune}
    record["experts_kept"] = prune or model_experts(model)
    t0 = time.process_time()
    if method == "adamerging":  # from the kept shares summing to one, as export.py starts it
        start = renormalise(shares, kept) if kept is not None else shares
        lm, ada = adamerge(
            model, loaded.shards, loaded.pad_id, start, kept, "layer",
            s.ada_steps, s.ada_lr, s.ada_samples, s.ada_batch,
        )  # fmt: skip
        record["adamerging"] = {k: ada[k] for k in ("steps", "inputs", "entropy_before", "entropy_after")}
    else:
        lm = fold_to_dense(
            model, shares, kept, MergeSpec.of(method, **({"seed": s.seed} if method == "dare" else {}))
        )
    record["export_cpu_s"] = time.process_time() - t0
    return lm.eval(), record


def score(loaded: Loaded, lm: PreTrainedModel, record: dict, ref: Mapping[str, Mapping], s: Settings) -> dict:
    """Adds the export's per-task held-out loss, retention and mean retention to `record`."""
    losses = {t: v["loss"] for t, v in heldout(loaded, hf_loss_fn(lm), s).items()}
    kept = retention(ref["base"], ref["moe"], losses)
    return {
        **record,
        "loss": losses,
        "retention_pct": kept,
        "mean_retention_pct": mean_or_none(kept.values()),
    }


def grid(
    loaded: Loaded,
    ref: Mapping[str, Mapping],
    s: Settings,
    keep: Callable[[PreTrainedModel], None],
    exact: bool = True,
) -> list[dict]:
    """Exports and scores every row of the comparison, the exact faded export first (if the run faded).

    The first row's export is handed to `keep` (which saves it for the timing and the load check).
    `exact=False` leaves out the exact faded row.
    """
    combos = [("average", 0, "fade")] if exact and loaded.fade_shares is not None else []
    combos += [(m, p, "utilization") for m in s.methods for p in s.prune]
    rows = []
    for k, (method, prune, weights) in enumerate(combos):
        t0 = time.perf_counter()
        lm, record = export_one(loaded, method, prune, weights, s)
        rows.append(score(loaded, lm, record, ref, s))
        if k == 0:
            keep(lm)
        del lm
        mean = rows[-1]["mean_retention_pct"]
        print(
            f"[{k + 1}/{len(combos)}] {method:<16} kept {record['experts_kept']} ({weights}): mean "
            f"retention {'n/a' if mean is None else f'{mean:.1f}%'}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return rows


@torch.no_grad()
def time_forward(loaded: Loaded, export_dir: Path, label: str, s: Settings) -> dict[str, Any]:
    """Times a no-grad forward of the base, the saved export (reloaded) and the routed MoE-LoRA model."""
    base = build_base(loaded.cfg, len(loaded.tokenizer)).eval()
    export = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    gen = torch.Generator().manual_seed(s.seed)
    ids_BS = torch.randint(0, len(loaded.tokenizer), (s.batch, s.seq), generator=gen)
    task_B = torch.arange(s.batch) % len(loaded.shards)
    model, alpha = loaded.model, loaded.model.context.fade_alpha
    model.context.fade_alpha = 1.0  # the routed MoE (top-k), what serving without an export runs
    steps = logit_forwards({"base": base, "dense_export": export}, ("moe_lora", model), ids_BS, task_B)
    try:
        per_round_ms = time_rounds(steps, s.rounds, 1, s.warmup, scale=1e3)
    finally:
        model.context.fade_alpha = alpha
    return {
        "setup": {
            "batch": s.batch,
            "seq": s.seq,
            "tokens": s.batch * s.seq,
            "grad": False,
            "dtype": "float32",
            "logits": "full vocabulary",
            "export": label,
            "moe_fade_alpha": 1.0,
        },
        "timing": timing_settings(s.rounds, 1, s.warmup),
        **summarize(per_round_ms, BASELINE, "ms"),
        "per_round_ms": per_round_ms,
    }


def load_check(export_dir: Path, ids_BS: torch.Tensor, logits_BSV: torch.Tensor) -> dict[str, Any]:
    """Loads the export with plain transformers in a process that never imports mtmoe.

    Its logits on `ids_BS` are compared with `logits_BSV`, the in-process export's before it was saved.
    """
    work = export_dir.parent
    torch.save(ids_BS, work / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_CHECK, str(export_dir.resolve()), "ids.pt", "logits.pt"],
        cwd=work, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"plain transformers could not load the export:\n{proc.stderr[-3000:]}")
    diff = (torch.load(work / "logits.pt") - logits_BSV).abs().max().item()
    return {
        "loaded_as": proc.stdout.strip().splitlines()[-1],
        "mtmoe_imported": False,
        "max_abs_logit_diff": diff,
    }


def run_comparison(run: Path, s: Settings) -> dict[str, Any]:
    """The whole comparison on one run: the result record (see the module docstring)."""
    torch.set_num_threads(1)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    loaded = load_run(run)
    base = build_base(loaded.cfg, len(loaded.tokenizer)).eval()
    scored = {
        "base": heldout(loaded, hf_loss_fn(base), s),
        "moe": heldout(loaded, lambda *b: loaded.model(*b)[0], s),
    }
    del base
    ref = {k: {t: v["loss"] for t, v in losses.items()} for k, losses in scored.items()}
    print(f"base {ref['base']}\nmoe  {ref['moe']}", flush=True)
    check_ids_BS = torch.randint(
        0, len(loaded.tokenizer), (2, 16), generator=torch.Generator().manual_seed(1)
    )
    first: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(tmp) / "export"

        @torch.no_grad()
        def keep(lm: PreTrainedModel) -> None:
            save_dense(lm, loaded.tokenizer, export_dir)
            first["logits"] = lm(input_ids=check_ids_BS).logits

        rows = grid(loaded, ref, s, keep)
        inference = time_forward(loaded, export_dir, row_label(rows[0]), s)
        loaded_check = load_check(export_dir, check_ids_BS, first["logits"])
    return {
        "benchmark": "every export of a trained run: held-out loss, retention, forward time vs the base",
        "machine": machine_info(),
        "settings": settings_record(loaded, s, scored["base"]),
        "base": ref["base"],
        "moe": ref["moe"],
        "rows": rows,
        "inference": inference,
        "load_check": loaded_check,
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
    }


def settings_record(loaded: Loaded, s: Settings, base_scored: Mapping[str, Mapping]) -> dict[str, Any]:
    """The JSON record of the run, the held-out samples and the merge and timing settings."""
    moe = loaded.cfg.moe
    return {
        "run": str(loaded.run),
        "base_model": loaded.cfg.model.base,
        "experts": moe.num_experts,
        "top_k": moe.top_k,
        "rank": moe.rank,
        "fade_fraction": moe.fade_fraction,
        "heldout_samples_per_task": {
            sh.name: min(s.samples, len(sh)) if s.samples else len(sh) for sh in loaded.shards
        },
        "heldout_target_tokens": {t: v["tokens"] for t, v in base_scored.items()},
        "weights": "utilization (held-out gate mass, all tasks); the exact row: fade",
        "prune_by": "utilization",
        "merge_defaults": {m: MergeSpec.of(m).record() for m in MERGES},
        **dataclasses.asdict(s),
    }


def rerun_methods(path: Path, methods: tuple[str, ...], run: Path) -> dict[str, Any]:
    """Re-runs only `methods`' rows of the result JSON at `path` with its settings; replaces them in place.

    The reference losses (base, MoE), the timing and the load check of the JSON are kept; a `rerun` entry
    records which rows were re-run and when.
    """
    result = json.loads(path.read_text())
    stored = result["settings"]
    if Path(stored["run"]) != run:
        raise ValueError(f"--run {run}, but {path} was measured on {stored['run']}")
    s = Settings.of({f.name: stored[f.name] for f in dataclasses.fields(Settings)})
    s = dataclasses.replace(s, methods=methods)
    torch.set_num_threads(1)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    loaded = load_run(run)
    ref = {"base": result["base"], "moe": result["moe"]}
    new = grid(loaded, ref, s, keep=lambda lm: None, exact=False)
    index = {(r["method"], r["weights"], r["prune"]): i for i, r in enumerate(result["rows"])}
    for row in new:
        key = (row["method"], row["weights"], row["prune"])
        if key not in index:
            raise ValueError(f"{path} has no row {key} to replace")
        result["rows"][index[key]] = row
    result.setdefault("rerun", []).append(
        {
            "methods": list(methods),
            "rows": [{"method": r["method"], "weights": r["weights"], "prune": r["prune"]} for r in new],
            "at": at,
            "wall_s": time.perf_counter() - wall0,
            "cpu_s": time.process_time() - cpu0,
            "machine": machine_info(),
        }
    )
    return result


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def row_label(row: Mapping[str, Any]) -> str:
    if row["weights"] == "fade":
        return "fade shares, average (exact)"
    return f"`{row['method']}`"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The README table (and the timing line under it) from a result record."""
    tasks, settings = list(result["base"]), result["settings"]
    head = [
        "export",
        "experts kept",
        *(f"{t} loss" for t in tasks),
        *(f"{t} kept %" for t in tasks),
        "mean kept %",
    ]
    faded = ", faded" if settings["fade_fraction"] else ""
    references = (
        ("base model", "—", "base"),
        (f"trained MoE-LoRA (top-{settings['top_k']}{faded})", str(settings["experts"]), "moe"),
    )
    rows = [
        [name, experts, *(f"{result[key][t]:.4f}" for t in tasks), *["—"] * (len(tasks) + 1)]
        for name, experts, key in references
    ]
    rows += [
        [row_label(row), str(row["experts_kept"]), *(f"{row['loss'][t]:.4f}" for t in tasks),
         *(_fmt(row["retention_pct"][t], ".1f") for t in tasks),
         f"**{_fmt(row['mean_retention_pct'], '.1f')}**"]
        for row in result["rows"]
    ]  # fmt: skip
    return table(head, rows, "l" + "r" * (len(head) - 1)) + "\n\n" + timing_line(result["inference"])


def timing_line(inf: Mapping[str, Any]) -> str:
    """The sentence under the table: forward times and their ratios to the base."""
    ms, per_round, of_medians = inf["median_ms"], inf["median_per_round_ratio_to_base"], inf["ratio_to_base"]
    setup, rounds = inf["setup"], inf["timing"]["rounds"]

    def variant(name: str, label: str) -> str:
        return (
            f"{label} {ms[name]:.0f} ms, **{per_round[name]:.2f}×** the base "
            f"(ratio of medians {of_medians[name]:.2f})"
        )

    return (
        f"Forward of {setup['batch']} × {setup['seq']} tokens (no grad, full-vocabulary logits, fp32, one "
        f"thread, CPU time, median of {rounds} interleaved rounds): base {ms['base']:.0f} ms; "
        f"{variant('dense_export', 'dense export')}; {variant('moe_lora', 'routed MoE-LoRA')}."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="the trained run's directory")
    parser.add_argument("--quick", action="store_true", help="tiny settings; prints only unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULT})")
    parser.add_argument("--samples", type=int, default=None, help="held-out samples per task (0 = all)")
    parser.add_argument("--ada-steps", type=int, default=None, help="AdaMerging's Adam steps")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--render", type=Path, default=None, help="only print the markdown of this JSON")
    parser.add_argument(
        "--only", default=None, help="METHOD[,METHOD...]: re-run only these methods' rows (with --update)"
    )
    parser.add_argument(
        "--update", type=Path, default=None, help="the result JSON whose --only rows are replaced in place"
    )
    args = parser.parse_args(argv)
    if (args.only is None) != (args.update is None):
        parser.error("--only and --update go together")
    if args.only is not None:
        args.only = tuple(m.strip() for m in args.only.split(",") if m.strip())
        methods = load_settings().methods
        unknown = [m for m in args.only if m not in methods]
        if unknown or not args.only:
            parser.error(f"--only: unknown method(s) {unknown}; choose from {', '.join(methods)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render is not None:
        return print_rendered(args.render, render_markdown)
    if args.only is not None:
        result = rerun_methods(args.update, args.only, args.run)
        print(render_markdown(result))
        print(f"re-ran {', '.join(args.only)}: {result['rerun'][-1]['wall_s'] / 60:.1f} min wall")
        write_result(result, args.update)
        return result
    s = load_settings(args.quick)
    overrides = {"samples": args.samples, "ada_steps": args.ada_steps, "rounds": args.rounds}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    result = {**run_comparison(args.run, s), "quick": args.quick}
    print(render_markdown(result))
    print(f"load check: {result['load_check']}; {result['wall_s'] / 60:.1f} min wall")
    write_result(result, result_path(args.out, args.quick, RESULT))
    return result


if __name__ == "__main__":
    main()
