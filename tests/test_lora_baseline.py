"""`moe.family: lora`: one plain PEFT LoRA, trained by mtmoe's own loop, exported by PEFT's merge."""

import json
import sys

import pytest
import torch
from conftest import ROOT, run_cmd
from transformers import AutoModelForCausalLM

from mtmoe.config import load_config
from mtmoe.model.moe_lm import build_base, build_model

TINY = ROOT / "launch" / "recipes" / "tiny.yaml"
VOCAB = 49152


def test_the_baseline_is_peft_lora_on_the_ffn_and_starts_at_the_base_model():
    from peft.tuners.lora import LoraLayer

    cfg = load_config(TINY, ["moe.family=lora", "moe.rank=16", "moe.alpha=32", "moe.attn_lora_rank=0"])
    model = build_model(cfg, VOCAB, 3).eval()
    peft_layers = {n: m for n, m in model.lm.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(n.split(".")[-1] for n in peft_layers) == sorted(["gate_proj", "up_proj", "down_proj"] * 2)
    assert all(m.r["default"] == 16 and m.scaling["default"] == 2.0 for m in peft_layers.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # gate/up: 16·(64 + 128); down: 16·(128 + 64); two layers
    assert sum(p.numel() for p in trainable.values()) == 2 * 3 * 16 * (64 + 128)
    base = build_base(cfg, VOCAB).eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B starts at zero: the injected model is the base model
        torch.testing.assert_close(model.lm(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize(
    "override,key",
    [("parallel.ep_size=2", "parallel.ep_size"), ("moe.fade_fraction=0.2", "moe.fade_fraction")],
)
def test_options_that_need_experts_are_refused(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(TINY, ["moe.family=lora", override])


@pytest.mark.timeout(300)
def test_trained_baseline_exports_to_a_plain_model_equal_to_it(demo_data, tmp_path):
    from mtmoe.export.run import load_trained_model

    run = tmp_path / "run"
    run_cmd([sys.executable, "launch/train.py", "--config", TINY, f"data.tokenized={demo_data}",
             f"train.output_dir={run}", "train.steps=4", "moe.family=lora", "moe.rank=8",
             "train.lr=0.01"])  # fmt: skip
    run_cmd([sys.executable, "launch/export.py", "--run", run, "--out", run / "dense"])
    _, trained, _ = load_trained_model(run)
    lora_b = [p for n, p in trained.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # it trained
    exported = AutoModelForCausalLM.from_pretrained(run / "dense").eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids).logits, trained.lm(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
    report = json.loads((run / "dense" / "export_report.json").read_text())["tasks"]
    for t in report.values():
        assert t["export_loss"] == pytest.approx(t["moe_loss"], abs=1e-5)
        assert t["export_loss"] != pytest.approx(t["base_loss"], abs=1e-5)
    assert "lora" not in json.dumps(exported.config.to_dict()).lower()
