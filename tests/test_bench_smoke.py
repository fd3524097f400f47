"""Every benchmark's quick mode runs end to end on the current code, and its JSON renders as its table.

A benchmark that re-implements part of the library goes stale silently; this runs each benchmark and
experiment as a user would (`python -m benchmarks.NAME [MODE] --quick ...`, in its own process), with a
tiny random Llama where the real model is too slow (`--tiny`). Timings mean nothing here and nothing
asserts on them.
"""

import argparse
import importlib
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cmd

pytestmark = pytest.mark.timeout(300)

# Modules the benchmarks share; every other module of benchmarks/ and experiments/ is run below.
HELPERS = {
    "cli", "harness", "models", "reference", "tables", "render_docs",
    "step.common", "step.__main__",
}  # fmt: skip
# Modes whose quick path has a test file of its own.
TESTED_ELSEWHERE = {
    "experiments.export_comparison": "test_export_comparison.py",
    "benchmarks.step.gpu": "test_gpu_bench.py",
}
# The quick command line of every other benchmark mode, after `python -m`; {data} is the tests' tokenized
# demo slices ({metrics_data} with metrics declared).
QUICK = {
    "benchmarks.family": ["benchmarks.family", "--quick"],
    "benchmarks.loss": ["benchmarks.loss", "--quick"],
    "benchmarks.ep": ["benchmarks.ep", "--quick"],
    "benchmarks.step.compare": ["benchmarks.step", "compare", "--quick", "--tiny"],
    "benchmarks.step.mfu": ["benchmarks.step", "mfu", "--quick", "--tiny"],
    "benchmarks.step.packing": ["benchmarks.step", "packing", "--quick", "--tiny", "--data", "{data}"],
    "benchmarks.inference": ["benchmarks.inference", "--quick"],
    "benchmarks.tokenization": ["benchmarks.tokenization", "--quick", "--data", "{data}"],
    "benchmarks.memory": ["benchmarks.memory", "--quick", "--tiny"],
    "benchmarks.zero3:step": ["benchmarks.zero3", "step", "--quick", "--tiny", "--data", "{data}"],
    "benchmarks.zero3:loading": ["benchmarks.zero3", "loading", "--quick", "--tiny"],
    "benchmarks.zero3:export": ["benchmarks.zero3", "export", "--quick", "--tiny", "--data", "{data}"],
    "benchmarks.zero3:plans": ["benchmarks.zero3", "plans", "--quick"],
    "experiments.balance_study": [
        "experiments.balance_study", "--quick", "--data", "{data}", "--only", "coba", "--out", "{tmp}/runs",
    ],
    "experiments.quality_study": [
        "experiments.quality_study", "--smoke", "--data", "{metrics_data}", "--out", "{tmp}/runs",
    ],
}  # fmt: skip
JSON_FLAG = {"experiments.balance_study": "--json", "experiments.quality_study": "--json"}  # others: --out


def runnable() -> set[str]:
    """Every module of benchmarks/ and experiments/ that is not a helper, as `module` or `module:mode`."""
    names = set()
    for package in ("benchmarks", "experiments"):
        for path in (ROOT / package).rglob("*.py"):
            dotted = ".".join(path.relative_to(ROOT / package).with_suffix("").parts)
            if dotted not in HELPERS and not dotted.endswith("__init__"):
                module = importlib.import_module(f"{package}.{dotted}")
                modes = getattr(module, "MODES", None) if package == "benchmarks" else None
                names |= {f"{module.__name__}:{m}" for m in modes} if modes else {module.__name__}
    return names


def renderer(key):
    """The docs' renderer of a quick command's JSON."""
    name, _, mode = key.partition(":")
    module = importlib.import_module(name)
    found = module.MODES[mode] if mode else getattr(module, "MODE", None)
    return found.render if found is not None else module.render_markdown


def test_every_benchmark_has_a_smoke_test():
    assert runnable() == set(QUICK) | set(TESTED_ELSEWHERE)
    for test_file in TESTED_ELSEWHERE.values():
        assert (ROOT / "tests" / test_file).exists()


@pytest.mark.parametrize("key", sorted(QUICK))
def test_quick_mode_runs_and_renders(key, demo_data, demo_data_metrics, tmp_path):
    out = tmp_path / "result.json"
    args = [a.format(data=demo_data, metrics_data=demo_data_metrics, tmp=tmp_path) for a in QUICK[key]]
    run_cmd([sys.executable, "-m", *args, JSON_FLAG.get(key, "--out"), out])
    table = renderer(key)(json.loads(out.read_text()))
    assert table.count("\n|") >= 2, table  # a header, its rule and rows


def test_tiny_never_writes_the_real_result():
    from benchmarks import cli

    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        cli.check_tiny(parser, tiny=True, quick=False, has_out=False)
    cli.check_tiny(parser, tiny=True, quick=True, has_out=False)  # prints only
    cli.check_tiny(parser, tiny=True, quick=False, has_out=True)  # writes where it is told
    for args in (["benchmarks.step", "compare", "--tiny"], ["experiments.quality_study", "--smoke"]):
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode != 0 and ("--tiny: give" in proc.stderr or "--smoke: give" in proc.stderr)


def test_time_rounds_rotates_the_order_and_times_between_the_hooks():
    from benchmarks.harness import summarize, time_rounds

    now, calls, hooks = [0.0], [], []

    def step(name, cost):
        def run():
            calls.append(name)
            now[0] += cost

        return run

    def after():  # a device synchronization that takes time: it is inside the timed block
        hooks.append("after")
        now[0] += 1.0

    per_round = time_rounds(
        {"a": step("a", 1.0), "b": step("b", 3.0)}, rounds=2, iters=2, warmup=1,
        clock=lambda: now[0], before=lambda: hooks.append("before"), after=after, reduce=lambda s: 10 * s,
    )  # fmt: skip
    assert calls == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a"]  # warm-up, then rotated rounds
    assert hooks == ["before", "after"] * 4
    assert per_round == {"a": [15.0, 15.0], "b": [35.0, 35.0]}  # (2 calls + sync) / 2, x 10
    summary = summarize(per_round, "a", "s")
    assert summary["ratio_to_a"]["b"] == summary["median_per_round_ratio_to_a"]["b"] == 35 / 15


def test_every_balance_study_scheme_is_a_valid_config():
    from experiments import balance_study as study
    from mtmoe.config import load_config

    plan = study.load_study()
    assert list(plan.schemes) == ["plain", "balanced", "temperature", "coba", "famo", "quality_retain"]
    for scheme in plan.schemes.values():
        cfg = load_config(ROOT / plan.recipe, study.scheme_overrides(plan, scheme, plan.steps))
        assert cfg.balance.qr_warmup == 10


def _study_run(variant, lr, loss, seed=0):
    """A quality-study run record with one task's held-out loss."""
    return {"variant": variant, "lr": lr, "seed": seed, "tasks": {"t": {"loss": loss}}}


def _study_runs(study, losses):
    """Run records by their key, from {(variant, lr, seed): loss}."""
    return {study.run_key(v, lr, s): _study_run(v, lr, loss, s) for (v, lr, s), loss in losses.items()}


# a seeded variant, two candidates for the best-of seeds, and a one-rate remedy
STAGED_PLAN = {
    "seeds": [0, 1], "lrs": [5e-4, 1e-3], "max_lr": 4e-3,
    "variants": {"a": {}, "d": {}, "e": {}, "g": {"lrs": [5e-4]}},
    "seeded": ["a"], "seeded_best_of": ["d", "e"],
}  # fmt: skip


def test_quality_study_follows_a_best_rate_at_the_top_of_the_grid():
    from experiments import quality_study as study

    plan = {"seeds": [0, 1], "max_lr": 4e-3}
    run = _study_run

    runs = {
        "a1": run("a", 5e-4, 1.5), "a2": run("a", 1e-3, 1.4),  # best at the top: doubles
        "b1": run("b", 5e-4, 1.3), "b2": run("b", 1e-3, 1.4),  # best inside: stays
        "c1": run("c", 5e-4, 1.3),  # one rate (a remedy): stays
        "d1": run("d", 2e-3, 1.3), "d2": run("d", 4e-3, 1.2),  # at max_lr already: stays
    }  # fmt: skip
    assert study.edge_rates(plan, runs, ["a", "b", "c", "d"]) == [("a", 2e-3, 0)]


def test_quality_study_starts_a_run_once_what_it_depends_on_is_known():
    from experiments import quality_study as study

    plan = STAGED_PLAN
    runs = _study_runs(study, {
        ("a", 5e-4, 0): 1.3, ("a", 1e-3, 0): 1.4,  # settled at 5e-4: its seed may start
        ("d", 5e-4, 0): 1.5, ("d", 1e-3, 0): 1.2,  # best at the edge: 2e-3 follows
    })  # fmt: skip
    # e's grid first, then d's edge rate, then a's seed; the remedy g last; no seed of d or e yet
    assert study.ready_jobs(plan, runs, ["a", "d", "e", "g"]) == [
        ("e", 5e-4, 0), ("e", 1e-3, 0), ("d", 2e-3, 0), ("a", 5e-4, 1), ("g", 5e-4, 0),
    ]  # fmt: skip
    busy = frozenset({("e", 5e-4, 0), ("e", 1e-3, 0), ("d", 2e-3, 0)})
    assert study.ready_jobs(plan, runs, ["a", "d", "e", "g"], busy) == [("a", 5e-4, 1), ("g", 5e-4, 0)]
    runs |= _study_runs(study, {("e", 5e-4, 0): 1.25, ("e", 1e-3, 0): 1.3, ("d", 2e-3, 0): 1.4})
    # d settles at 1e-3 (1.2) and beats e (1.25): d's seed is the best-of's
    assert study.ready_jobs(plan, runs, ["a", "d", "e", "g"], frozenset({("a", 5e-4, 1)})) == [
        ("d", 1e-3, 1), ("g", 5e-4, 0),
    ]  # fmt: skip


def test_a_quality_rerun_at_the_chosen_rates_searches_no_rate():
    from experiments import quality_study as study

    plan = STAGED_PLAN
    finished = {"study": plan, "runs": _study_runs(study, {
        ("a", 5e-4, 0): 1.4, ("a", 1e-3, 0): 1.3, ("d", 5e-4, 0): 1.2, ("d", 1e-3, 0): 1.5,
        ("e", 1e-3, 0): 1.3, ("g", 5e-4, 0): 1.6,
    })}  # fmt: skip
    rerun = study.with_known_rates(plan, finished)
    assert {v: spec["lrs"] for v, spec in rerun["variants"].items()} == {
        "a": [1e-3],
        "d": [5e-4],
        "e": [1e-3],
        "g": [5e-4],
    }
    # one rate per variant: every first seed is ready at once (a's other seed follows its first)
    assert study.ready_jobs(rerun, {}, ["a", "d", "e", "g"]) == [
        ("d", 5e-4, 0), ("a", 1e-3, 0), ("e", 1e-3, 0), ("g", 5e-4, 0),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"no rate was chosen for \['x'\]"):
        study.with_known_rates({**plan, "variants": {**plan["variants"], "x": {}}}, finished)


def test_the_quality_headline_compares_the_best_plain_lora_with_the_best_mixture_over_seeds():
    from experiments import quality_study as study

    plan = {
        "seeds": [0, 1], "lrs": [1e-3],
        "variants": {
            "lo": {"label": "(a) LoRA: x", "overrides": ["moe.family=lora"]},
            "mo": {"label": "(c) MoE: y", "overrides": []},
            "one": {"label": "(g) MoE: z", "overrides": []},  # one seed: left out of the headline
        },
    }  # fmt: skip

    def run(variant, seed, score):
        return {"variant": variant, "lr": 1e-3, "seed": seed, "tasks": {"t": {"loss": 1.0, "score": score}}}

    runs = {f"{v}{s}": run(v, s, x) for v, s, x in [("lo", 0, 10.0), ("lo", 1, 12.0), ("mo", 0, 14.0),
                                                     ("mo", 1, 16.0), ("one", 0, 99.0)]}  # fmt: skip
    result = {"study": plan, "runs": runs, "base": {"t": {"metric": "chrf", "score": 5.0, "loss": 2.0}}}
    row = study.render_summary(result).splitlines()[2]
    # the mixture leads by 4.00, beyond the larger seed spread (std 1.41)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["t", "chrf", "5.00", "(a) LoRA: 11.00 ± 1.41", "(c) MoE: 15.00 ± 1.41", "+4.00",
                     "mixture ahead, beyond 1.41"]  # fmt: skip


def test_routing_spread_follows_the_gate_mass_not_the_token_counts():
    """A task gate sends every token to every expert (even counts) but weighs them as it learned."""
    from experiments.quality_study import routing_spread

    layer = {"tokens": [[10.0, 10.0], [10.0, 10.0]], "mass": [[9.0, 1.0], [1.0, 9.0]]}
    spread = routing_spread({"tasks": ["a", "b"], "num_experts": 2, "layers": {"0": layer}})
    assert spread["a"]["top_share"] == pytest.approx(0.9) and spread["b"]["top_share"] == pytest.approx(0.9)
    assert spread["a"]["entropy"] < 0.5 and spread["task_distance"] == pytest.approx(0.8)
