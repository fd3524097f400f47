import os

for key, value in {
    "OMP_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

torch.set_num_threads(1)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# Under `make test` (pytest-xdist, `--dist loadfile`) a file runs whole on one worker. Starting with the
# slowest files keeps both workers busy to the end instead of leaving one long file running alone.
SLOW_FIRST = (
    "test_bench_smoke", "test_ep_training", "test_zero3", "test_reliability", "test_e2e", "test_routers",
    "test_families", "test_fading", "test_expert_parallel", "test_launchers", "test_export_stream",
    "test_quality_retain", "test_task_metrics", "test_export_options",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    """Orders the files as `SLOW_FIRST`, then the rest as collected (stable: tests keep their order)."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(SLOW_FIRST)))


def run_cmd(args, env_extra=None, timeout=600):
    """Runs a command from the repo root with the test environment; fails with its output on error."""
    env = {**os.environ, **(env_extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    command = " ".join(map(str, args))
    assert proc.returncode == 0, (
        f"{command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture(scope="session")
def demo_jsonl(tmp_path_factory):
    """The real demo tasks, small: German translations, 60 docstrings, 20 langid strings per language."""
    root = tmp_path_factory.mktemp("demo_jsonl")
    args = ["--langs", "de", "--max-docstring", "60", "--max-langid", "20"]
    run_cmd([sys.executable, "data_prep/build_demo_tasks.py", "--out", root, *args])
    return root


def _tokenize(jsonl, out, *extra):
    tasks = [f"--task={t}={jsonl / t}.jsonl" for t in ("codegen", "docstring", "translate")]
    common = ["--tokenizer", "smollm2-135m-instruct", "--max-len", "128", "--eval-fraction", "0.2"]
    run_cmd([sys.executable, "data_prep/tokenize_tasks.py", *tasks, *common, "--max-eval", "6", *extra,
             "--out", out])  # fmt: skip
    return out


@pytest.fixture(scope="session")
def demo_data(demo_jsonl, tmp_path_factory):
    """Small slices of the three real demo tasks, tokenized with the real tokenizer (max_len 128);
    scored by loss only, so training runs skip generation."""
    return _tokenize(demo_jsonl, tmp_path_factory.mktemp("demo_data") / "tokenized")


@pytest.fixture(scope="session")
def demo_data_metrics(demo_jsonl, tmp_path_factory):
    """The same slices, with codegen scored by pass@1 and translate by chrF (docstring: loss only)."""
    metrics = ["--metric", "codegen=pass@1", "--metric", "translate=chrf"]
    caps = ["--gen-tokens", "translate=8", "--gen-tokens", "codegen=16"]
    return _tokenize(demo_jsonl, tmp_path_factory.mktemp("demo_data_metrics") / "tokenized", *metrics, *caps)
