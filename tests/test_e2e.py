"""End to end, with real processes: the launchers, resume, export, report, and a plain-transformers reload."""

import json
import sys
import textwrap

import pytest
from conftest import run_cmd

TINY = "launch/recipes/tiny.yaml"


def train(data, out, *overrides, launcher=(sys.executable,), env=None, resume=False):
    args = [
        *launcher,
        "launch/train.py",
        "--config",
        TINY,
        f"data.tokenized={data}",
        f"train.output_dir={out}",
        *overrides,
    ]
    return run_cmd(args + (["--resume"] if resume else []), env_extra=env)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    export, tokenized = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    manifest = json.load(open(f"{tokenized}/manifest.json"))
    out = {}
    for task in manifest["tasks"]:
        d = f"{tokenized}/{task['name']}/eval"
        ids, mask, offs = (np.load(f"{d}/{a}.npy") for a in ("ids", "mask", "offsets"))
        total, count = 0.0, 0
        for i in range(len(offs) - 1):
            x = torch.tensor(ids[offs[i]:offs[i + 1]], dtype=torch.long)[None]
            m = torch.tensor(mask[offs[i]:offs[i + 1]], dtype=torch.bool)[1:]
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1]
            ce = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
            total, count = total + ce[m].sum().item(), count + int(m.sum())
        out[task["name"]] = total / count
    assert "mtmoe" not in sys.modules
    print(json.dumps(out))
    """
)


def test_train_export_report_and_plain_transformers_reload(demo_data_metrics, tmp_path):
    demo_data = demo_data_metrics
    run = tmp_path / "run"
    train(demo_data, run, env={"WANDB_MODE": "offline"})
    assert list((run / "wandb").glob("offline-run-*")), "wandb did not write an offline run"
    records = metrics(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert {"routing/L00/max_load", "routing/L00/entropy", "routing/max_load"} <= set(records[0])
    assert not any(k.startswith("expert_util/") for k in records[0])  # no series per expert
    assert {"weight/codegen", "epoch/codegen", "task_tokens_seen/translate"} <= set(records[0])
    exported = run_cmd([sys.executable, "launch/export.py", "--run", run, "--out", run / "dense"]).stdout
    assert "MoE scores: the run's own" in exported  # its final evaluation scored the exported step
    run_cmd(
        [sys.executable, "launch/report.py", "--run", run, "--export", run / "dense", "--gen-tokens", "4"]
    )
    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == {"codegen", "docstring", "translate"}
    for t in report["tasks"].values():
        assert {"base_loss", "moe_loss", "dense_loss"} <= set(t)
    assert report["train"]["steps"] == 4 and report["train"]["tokens_per_s"] > 0
    assert "| codegen |" in (run / "report.md").read_text()
    # the tasks that declared a metric are scored for the base, the MoE and the export, metrics first
    exported = json.loads((run / "dense" / "export_report.json").read_text())["tasks"]
    for name, metric in (("codegen", "pass@1"), ("translate", "chrf")):
        assert exported[name]["metric"] == metric and report["tasks"][name]["metric"] == metric
        assert all(0 <= exported[name][f"{k}_score"] <= 100 for k in ("base", "moe", "export"))
    assert "metric" not in exported["docstring"]
    md = (run / "report.md").read_text()
    assert md.index("| task | metric |") < md.index("Mean held-out token loss") and "**MoE:**" in md
    for figure in ("report/loss.png", "report/weights.png", "utilization/L00.png"):
        assert f"]({figure})" in md and (run / figure).read_bytes()[:4] == b"\x89PNG"
    evaluation = json.loads((run / "eval.json").read_text())["tasks"]
    assert evaluation["translate"]["metric"] == "chrf"
    for name in ("codegen", "translate"):
        assert exported[name]["moe_score"] == evaluation[name]["score"]
    assert "eval_metric/translate" in records[-1]
    plain = json.loads(
        run_cmd([sys.executable, "-c", PLAIN_LOAD, report["export"]["path"], demo_data]).stdout
    )
    for name, loss in plain.items():
        assert loss == pytest.approx(report["tasks"][name]["dense_loss"], abs=1e-4)


WEIGHTED = {
    "famo": ("balance.weighter=famo", "balance.options.lr=0.2"),
    "coba": ("balance.weighter=coba", "balance.options.warmup=1", "balance.options.history=4"),
}


@pytest.mark.parametrize("weighter", sorted(WEIGHTED))
def test_resume_equals_uninterrupted_run(demo_data, tmp_path, weighter):
    full = tmp_path / "full"
    train(demo_data, full, "train.save_every=2", *WEIGHTED[weighter])
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "step_000002").symlink_to(full / "checkpoints" / "step_000002")
    (resumed / "checkpoints" / "latest").write_text("step_000002")
    train(demo_data, resumed, "train.save_every=2", *WEIGHTED[weighter], resume=True)
    a = {r["step"]: r for r in metrics(full) if "loss" in r}
    b = {r["step"]: r for r in metrics(resumed) if "loss" in r}
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
        assert b[step]["lr"] == pytest.approx(a[step]["lr"])
        weights = [k for k in a[step] if k.startswith("weight/")]
        assert len(weights) == 3
        for key in weights + [k for k in a[step] if k.startswith("task_tokens_seen/")]:
            assert b[step][key] == a[step][key], key  # bit for bit
    assert a[4]["weight/codegen"] != pytest.approx(1.0)  # the weighter really moved the weights
    ea, eb = (json.loads((r / "eval.json").read_text())["tasks"] for r in (full, resumed))
    for name in ea:
        assert eb[name]["loss"] == pytest.approx(ea[name]["loss"], rel=1e-5)


def test_two_process_launchers_and_zero_stages_agree(demo_data, tmp_path):
    launches = {
        "ds_zero2": ("parallel.zero_stage=2", ("deepspeed", "--num_gpus", "2", "--master_port", "29611")),
        "torchrun_zero0": (
            "parallel.zero_stage=0",
            ("torchrun", "--nproc_per_node", "2", "--master_port", "29612"),
        ),
    }
    for name, (stage, launcher) in launches.items():
        train(demo_data, tmp_path / name, stage, launcher=launcher)
    ds, tr = tmp_path / "ds_zero2", tmp_path / "torchrun_zero0"
    for run in (ds, tr):
        assert json.loads((run / "eval.json").read_text())["train"]["world_size"] == 2
    a = {r["step"]: r["loss"] for r in metrics(ds) if "loss" in r}
    b = {r["step"]: r["loss"] for r in metrics(tr) if "loss" in r}
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4)


def test_real_model_trains_a_few_steps(demo_data, tmp_path):
    run = tmp_path / "real"
    run_cmd(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            "launch/recipes/demo.yaml",
            f"data.tokenized={demo_data}",
            f"train.output_dir={run}",
            "train.steps=2",
            "train.micro_batch_size=1",
            "train.save_every=0",
            "data.eval_max_samples=2",
        ]
    )
    result = json.loads((run / "eval.json").read_text())
    assert result["step"] == 2
    for t in result["tasks"].values():
        assert 0 < t["loss"] < 20 and t["tokens"] > 0
    util = json.loads((run / "utilization.json").read_text())
    assert len(util["layers"]) == 30 and util["num_experts"] == 4


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.tasks=[codegen, poetry]", r"data\.tasks.*poetry"),
        ("data.caps={poetry: 3}", r"data\.caps.*poetry"),
        ("data.upsample={codegen: 0}", r"data\.upsample.*codegen"),
    ],
)
def test_unknown_task_in_config_names_the_key(demo_data, override, key):
    from mtmoe.config import load_config
    from mtmoe.train.loop import train as train_in_process

    cfg = load_config(TINY, [f"data.tokenized={demo_data}", override])
    with pytest.raises(ValueError, match=key):
        train_in_process(cfg)


def test_periodic_evaluation_changes_nothing_in_training(demo_data_metrics, tmp_path):
    """Held-out routing at a periodic evaluation is counted apart: the training window's routing, the
    losses and the weights of a run that evaluates every 2 steps are those of one that never does."""
    common = ("train.steps=4", "train.log_every=4", "train.eval_metrics=false")
    plain = tmp_path / "plain"
    train(demo_data_metrics, plain, *common)
    evaluated = tmp_path / "evaluated"
    train(demo_data_metrics, evaluated, *common, "train.eval_every=2")
    a, b = metrics(plain), metrics(evaluated)
    assert [r["step"] for r in b if "eval_loss/codegen" in r] == [2, 4]
    last_a, last_b = (next(r for r in m if r["step"] == 4 and "loss" in r) for m in (a, b))
    for key in [k for k in last_a if k.startswith("routing/")] + ["loss", "loss/codegen"]:
        assert last_b[key] == last_a[key], key
