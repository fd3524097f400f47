"""The export comparison (`python -m experiments.export_comparison`) on a tiny faded run: every row is scored,
the exact row keeps all of the gain, the export reloads without mtmoe, and the JSON renders as the README
table."""

import dataclasses
import json
import sys

import pytest
from conftest import run_cmd

from experiments import export_comparison as comparison

pytestmark = pytest.mark.timeout(300)


def test_every_merge_and_pruning_level_is_scored_and_the_faded_export_is_exact(demo_data, tmp_path, capsys):
    run = tmp_path / "run"
    run_cmd([sys.executable, "launch/train.py", "--config", "launch/recipes/tiny.yaml",
             f"data.tokenized={demo_data}", f"train.output_dir={run}", "train.steps=6",
             "moe.fade_fraction=0.5"])  # fmt: skip
    settings = dataclasses.replace(
        comparison.load_settings(), samples=3, ada_steps=2, ada_samples=1, batch=2, seq=16, rounds=2, warmup=0
    )
    result = comparison.run_comparison(run, settings)

    rows = result["rows"]
    assert [(r["method"], r["experts_kept"]) for r in rows[1:]] == [
        (m, k) for m in settings.methods for k in (4, 2, 1)
    ]
    exact = rows[0]
    assert (exact["weights"], exact["method"], exact["experts_kept"]) == ("fade", "average", 4)
    for task, moe_loss in result["moe"].items():
        assert exact["loss"][task] == pytest.approx(moe_loss, abs=1e-5)
        assert exact["retention_pct"][task] == pytest.approx(100.0, abs=0.1)
    for r in rows:
        for task, kept in r["retention_pct"].items():
            base, moe = result["base"][task], result["moe"][task]
            assert kept == pytest.approx(100 * (base - r["loss"][task]) / (base - moe))
        assert r["mean_retention_pct"] == pytest.approx(sum(r["retention_pct"].values()) / 3)
    ada = [r["adamerging"] for r in rows if r["method"] == "adamerging"]
    assert len(ada) == 3 and all(a["steps"] == 2 for a in ada)

    assert result["load_check"]["loaded_as"] == "LlamaForCausalLM"
    assert result["load_check"]["max_abs_logit_diff"] < 1e-4
    assert set(result["inference"]["median_ms"]) == {"base", "dense_export", "moe_lora"}
    assert result["inference"]["setup"]["export"] == "fade shares, average (exact)"

    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(result))
    capsys.readouterr()
    comparison.main(["--render", str(path)])
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2 + len(rows)  # header, rule, base, MoE, one per export
    assert lines[0].startswith("| export | experts kept | codegen loss")
    assert "| fade shares, average (exact) | 4 |" in table and "**100.0** |" in table
    assert "| `ties` | 2 |" in table and "dense export" in table
