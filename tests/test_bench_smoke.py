"""Every benchmark's quick mode runs end to end on the current code, and its JSON renders as its table.

A benchmark that re-implements part of the library goes stale silently; this runs each script as a user
would (`python benchmarks/<name>.py --quick ...`, in its own process), with a tiny random Llama where
the real model is too slow (`--tiny`). Timings mean nothing here and nothing asserts on them.
"""

import argparse
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cmd

pytestmark = pytest.mark.timeout(300)

HELPERS = {"harness", "bench_cli", "md_tables", "render_docs"}  # libraries of the scripts, not benchmarks
# Scripts whose quick path has a test file of its own.
TESTED_ELSEWHERE = {"export_comparison": "test_export_comparison.py", "gpu_bench": "test_gpu_bench.py"}
# The quick command line of every other benchmark; {data} is the tests' tokenized demo slices ({metrics_data}
# with metrics declared).
QUICK = {
    "block_bench": ["--quick"],
    "family_bench": ["--quick"],
    "loss_bench": ["--quick"],
    "ep_bench": ["--quick"],
    "mfu_bench": ["--quick", "--tiny"],
    "profile_step": ["--quick", "--tiny"],
    "inference_bench": ["--quick"],
    "model_step_bench": ["--quick", "--tiny"],
    "memory_bench": ["--quick", "--tiny"],
    "packing_bench": ["--quick", "--tiny", "--data", "{data}"],
    "data_bench": ["--quick", "--data", "{data}"],
    "balance_study": ["--quick", "--data", "{data}", "--only", "coba", "--out", "{tmp}/runs"],
    "quality_study": ["--smoke", "--data", "{metrics_data}", "--out", "{tmp}/runs"],
}
JSON_FLAG = {"balance_study": "--json", "quality_study": "--json"}  # the others take --out


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - HELPERS
    assert scripts == set(QUICK) | set(TESTED_ELSEWHERE)
    for test_file in TESTED_ELSEWHERE.values():
        assert (ROOT / "tests" / test_file).exists()


@pytest.fixture
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import `harness` as top-level

    def load(name):
        return __import__(name)

    return load


@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_mode_runs_and_renders(name, demo_data, demo_data_metrics, tmp_path, bench_module):
    out = tmp_path / f"{name}.json"
    args = [a.format(data=demo_data, metrics_data=demo_data_metrics, tmp=tmp_path) for a in QUICK[name]]
    run_cmd([sys.executable, f"benchmarks/{name}.py", *args, JSON_FLAG.get(name, "--out"), out])
    result = json.loads(out.read_text())
    table = bench_module(name).render_markdown(result)
    assert table.count("\n|") >= 2, table  # a header, its rule and rows


def test_tiny_never_writes_the_real_result(bench_module):
    cli = bench_module("bench_cli")
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        cli.check_tiny(parser, tiny=True, quick=False, has_out=False)
    cli.check_tiny(parser, tiny=True, quick=True, has_out=False)  # prints only
    cli.check_tiny(parser, tiny=True, quick=False, has_out=True)  # writes where it is told
    for name in ("model_step_bench", "quality_study"):  # end to end: the shared parser and the study's own
        flag = "--tiny" if name == "model_step_bench" else "--smoke"
        proc = subprocess.run([sys.executable, f"benchmarks/{name}.py", flag], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode != 0 and ("--tiny: give" in proc.stderr or "--smoke: give" in proc.stderr)


def test_every_balance_study_scheme_is_a_valid_config(bench_module):
    from mtmoe.config import load_config

    study = bench_module("balance_study")
    for _, overrides in study.SCHEMES.values():
        load_config(ROOT / "launch" / "recipes" / "demo.yaml", [*study.COMMON, *overrides])


def test_quality_study_follows_a_best_rate_at_the_top_of_the_grid(bench_module):
    study = bench_module("quality_study")
    plan = {"seeds": [0, 1], "max_lr": 4e-3}

    def run(variant, lr, loss, seed=0):
        return {"variant": variant, "lr": lr, "seed": seed, "tasks": {"t": {"loss": loss}}}

    runs = {
        "a1": run("a", 5e-4, 1.5), "a2": run("a", 1e-3, 1.4),  # best at the top: doubles
        "b1": run("b", 5e-4, 1.3), "b2": run("b", 1e-3, 1.4),  # best inside: stays
        "c1": run("c", 5e-4, 1.3),  # one rate (a remedy): stays
        "d1": run("d", 2e-3, 1.3), "d2": run("d", 4e-3, 1.2),  # at max_lr already: stays
    }  # fmt: skip
    assert study.edge_rates(plan, runs, ["a", "b", "c", "d"]) == [("a", 2e-3, 0)]


def test_quality_study_starts_a_run_once_what_it_depends_on_is_known(bench_module):
    study = bench_module("quality_study")
    plan = {
        "seeds": [0, 1], "lrs": [5e-4, 1e-3], "max_lr": 4e-3,
        "variants": {"a": {}, "d": {}, "e": {}, "g": {"lrs": [5e-4]}},
        "seeded": ["a"], "seeded_best_of": ["d", "e"],
    }  # fmt: skip

    def run(variant, lr, loss, seed=0):
        return {"variant": variant, "lr": lr, "seed": seed, "tasks": {"t": {"loss": loss}}}

    runs = {study.run_key(*k): run(*k[:2], loss) for k, loss in {
        ("a", 5e-4, 0): 1.3, ("a", 1e-3, 0): 1.4,  # settled at 5e-4: its seed may start
        ("d", 5e-4, 0): 1.5, ("d", 1e-3, 0): 1.2,  # best at the edge: 2e-3 follows
    }.items()}  # fmt: skip
    # e's grid first, then d's edge rate, then a's seed; the remedy g last; no seed of d or e yet
    assert study.ready_jobs(plan, runs, ["a", "d", "e", "g"]) == [
        ("e", 5e-4, 0), ("e", 1e-3, 0), ("d", 2e-3, 0), ("a", 5e-4, 1), ("g", 5e-4, 0),
    ]  # fmt: skip
    busy = frozenset({("e", 5e-4, 0), ("e", 1e-3, 0), ("d", 2e-3, 0)})
    assert study.ready_jobs(plan, runs, ["a", "d", "e", "g"], busy) == [("a", 5e-4, 1), ("g", 5e-4, 0)]
    runs |= {study.run_key(*k): run(*k[:2], loss) for k, loss in {
        ("e", 5e-4, 0): 1.25, ("e", 1e-3, 0): 1.3, ("d", 2e-3, 0): 1.4,
    }.items()}  # fmt: skip
    # d settles at 1e-3 (1.2) and beats e (1.25): d's seed is the best-of's
    assert study.ready_jobs(plan, runs, ["a", "d", "e", "g"], frozenset({("a", 5e-4, 1)})) == [
        ("d", 1e-3, 1), ("g", 5e-4, 0),
    ]  # fmt: skip
