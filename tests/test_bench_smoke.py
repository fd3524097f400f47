"""Every benchmark's quick mode runs end to end on the current code, and its JSON renders as its table.

A benchmark that re-implements part of the library goes stale silently; this runs each script as a user
would (`python benchmarks/<name>.py --quick ...`, in its own process), with a tiny random Llama where
the real model is too slow (`--tiny`). Timings mean nothing here and nothing asserts on them.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cmd

pytestmark = pytest.mark.timeout(300)

HELPERS = {"harness", "bench_cli", "md_tables", "render_readme"}  # libraries of the scripts, not benchmarks
# Scripts whose quick path has a test file of its own.
TESTED_ELSEWHERE = {"export_comparison": "test_export_comparison.py", "gpu_bench": "test_gpu_bench.py"}
# The quick command line of every other benchmark; {data} is the tests' tokenized demo slices.
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
    "balance_study": ["--quick", "--data", "{data}", "--only", "coba", "--out", "{tmp}/runs"],
    "quality_study": ["--smoke", "--data", "{data}", "--out", "{tmp}/runs"],
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
def test_quick_mode_runs_and_renders(name, demo_data, tmp_path, bench_module):
    out = tmp_path / f"{name}.json"
    args = [a.format(data=demo_data, tmp=tmp_path) for a in QUICK[name]]
    run_cmd([sys.executable, f"benchmarks/{name}.py", *args, JSON_FLAG.get(name, "--out"), out])
    result = json.loads(out.read_text())
    table = bench_module(name).render_markdown(result)
    assert table.count("\n|") >= 2, table  # a header, its rule and rows


def test_tiny_never_writes_the_real_result():
    for name in ("model_step_bench", "memory_bench", "packing_bench", "profile_step"):
        args = [sys.executable, f"benchmarks/{name}.py", "--tiny"]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "--tiny: give --quick or --out" in proc.stderr, name
    args = [sys.executable, "benchmarks/quality_study.py", "--smoke"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--smoke: give --json" in proc.stderr


def test_every_balance_study_scheme_is_a_valid_config(bench_module):
    from mtmoe.config import load_config

    study = bench_module("balance_study")
    for _, overrides in study.SCHEMES.values():
        load_config(ROOT / "launch" / "recipes" / "demo.yaml", overrides)
