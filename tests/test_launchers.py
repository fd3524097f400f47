"""Launchers: two-node runs on loopback through the shipped scripts, and an accelerate launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cmd

from mtmoe.parallel.launchers import accelerate_overrides

TINY = "launch/recipes/tiny.yaml"


def test_accelerate_settings_become_overrides():
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "3",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    assert accelerate_overrides(env) == [
        "parallel.zero_stage=1",
        "train.grad_accum=3",
        "model.dtype=bfloat16",
    ]
    assert accelerate_overrides({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}) == []  # not a DeepSpeed launch
    zero3 = accelerate_overrides({**env, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert zero3[0] == "parallel.zero_stage=3"
    with pytest.raises(ValueError, match="zero_stage=4"):
        accelerate_overrides({**env, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "4"})
    with pytest.raises(ValueError, match="mixed_precision='fp16'"):
        accelerate_overrides({**env, "ACCELERATE_MIXED_PRECISION": "fp16"})


def _run_nodes(commands, env_per_node, timeout=400):
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd, env in zip(commands, env_per_node, strict=True)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-5000:]


def _trained_two_ranks(run):
    result = json.loads((run / "eval.json").read_text())
    assert result["train"]["world_size"] == 2 and result["step"] == 4
    return result


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_loopback(demo_data, tmp_path, launcher):
    run = tmp_path / "run"
    args = ["--config", TINY, f"data.tokenized={demo_data}", f"train.output_dir={run}"]
    port = {"torchrun": "29651", "deepspeed": "29652"}[launcher]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    if launcher == "torchrun":
        script, node_env = "launch/multinode_torchrun.sh", {"NNODES": "2", "NPROC_PER_NODE": "1"}
    else:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        script, node_env = "launch/multinode_deepspeed.sh", {"HOSTFILE": str(hostfile), "NO_SSH": "1"}
    commands = [["bash", script, *args]] * 2
    _run_nodes(commands, [{**common, **node_env, "NODE_RANK": str(i)} for i in range(2)])
    _trained_two_ranks(run)


def test_accelerate_launch_applies_its_deepspeed_plugin(demo_data, tmp_path):
    shipped = yaml.safe_load((ROOT / "launch/accelerate/single_node.yaml").read_text())
    shipped["deepspeed_config"]["zero_stage"] = 1
    shipped["main_process_port"] = 29661
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump(shipped))
    run = tmp_path / "run"
    run_cmd(
        [
            "accelerate",
            "launch",
            "--config_file",
            config,
            "launch/train.py",
            "--config",
            TINY,
            f"data.tokenized={demo_data}",
            f"train.output_dir={run}",
        ]  # fmt: skip
    )
    _trained_two_ranks(run)
    assert yaml.safe_load((run / "config.yaml").read_text())["parallel"]["zero_stage"] == 1


def test_shipped_accelerate_configs_are_deepspeed_with_a_supported_stage():
    for path in sorted((ROOT / "launch/accelerate").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["distributed_type"] == "DEEPSPEED", path
        assert cfg["deepspeed_config"]["zero_stage"] in (0, 1, 2, 3), path
