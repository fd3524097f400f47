"""The streamed export (`mtmoe-export --stream`) writes what the in-memory export writes, tensor for tensor.

Each family's run trains a few steps on a base saved in several shards; the streamed export (which
rebuilds only the adapters, and copies the base files one tensor at a time) must equal the in-memory
export (which folds the whole model), keep the base's sharding, and load with plain transformers.
"""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mtmoe.data.shards import load_manifest
from mtmoe.export.pipeline import ExportConfig, export_run
from mtmoe.model.base import safetensors_files, tiny_llama, tiny_moe
from tests.training_runs import train_run

pytestmark = pytest.mark.timeout(300)

FAMILIES = {
    # family: (how the base is made, the recipe overrides)
    "upcycled": ("llama", []),
    "lora": ("llama", ["moe.family=lora", "moe.attn_lora_rank=0"]),
    "native": (
        "tiny-mixtral",
        ["moe.family=native", "moe.router_options={aux_loss_coef: 0.01, trainable: true}"],
    ),
}


def _tensors(folder):
    return {k: v for path in safetensors_files(folder) for k, v in load_file(path).items()}


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """Per family, once for the module: (its base saved in several shards, a 2-step run on it)."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"stream_{family}")
            vocab = load_manifest(demo_data).vocab_size
            base_kind, extra = FAMILIES[family]
            base = root / "base"
            model = tiny_llama(vocab) if base_kind == "llama" else tiny_moe(base_kind, vocab)
            model.save_pretrained(base, max_shard_size="200KB")
            overrides = (f"model.base={base}", *extra)
            cache[family] = base, train_run(demo_data, root / "run", 1, 1, *overrides, steps=2, save_every=2)
        return cache[family]

    return get


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, trained):
    base, run = trained(request.param)
    root = run.parent
    whole = export_run(ExportConfig(run=run, out=root / "whole", metrics=False))
    streamed = export_run(ExportConfig(run=run, out=root / "streamed", stream=True))
    return base, whole, streamed


def test_streamed_export_equals_the_in_memory_export(exported):
    base, whole, streamed = exported
    expected, got, original = _tensors(whole), _tensors(streamed), _tensors(base)
    assert set(got) == set(original)
    for name, tensor in got.items():  # the in-memory export may drop a tied head
        if name in expected:
            torch.testing.assert_close(tensor, expected[name].to(tensor.dtype), rtol=0, atol=0)
    changed = [n for n in got if not torch.equal(got[n], original[n])]
    assert set(changed) <= set(expected)
    record = json.loads((streamed / "mtmoe_export.json").read_text())["stream"]
    assert len(changed) == record["edited"] > 0
    assert record["largest_tensor_bytes"] == max(t.numel() * t.element_size() for t in original.values())


def test_streamed_export_keeps_the_base_shards_and_loads_with_transformers(exported):
    base, whole, streamed = exported
    assert [p.name for p in safetensors_files(streamed)] == [p.name for p in safetensors_files(base)]
    assert len(safetensors_files(streamed)) >= 2
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(whole)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(streamed)(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, flag", [({"adamerging": True}, "--merge adamerging"), ({"peft_rank": 4}, "--peft-rank")]
)
def test_streamed_export_refuses_what_needs_the_model(tmp_path, options, flag):
    with pytest.raises(ValueError, match=f"--stream: {flag}"):
        export_run(ExportConfig(run=tmp_path, out=tmp_path / "out", stream=True, **options))


def _fused_copy(base, folder):
    """A per-expert Mixtral folder in the fused layout: (E, 2F, D) and (E, D, F) per layer."""
    folder.mkdir()
    shutil.copyfile(base / "config.json", folder / "config.json")
    per_expert, fused = _tensors(base), {}
    layers = sorted({n.split(".experts.")[0] for n in per_expert if ".experts." in n})
    for layer in layers:
        E = len({n for n in per_expert if n.startswith(f"{layer}.experts.") and n.endswith("w1.weight")})
        w = {
            p: [per_expert.pop(f"{layer}.experts.{e}.{p}.weight") for e in range(E)]
            for p in ("w1", "w2", "w3")
        }
        mlp = layer.replace(".block_sparse_moe", ".mlp")
        fused[f"{mlp}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([a, b]) for a, b in zip(w["w1"], w["w3"], strict=True)]
        )
        fused[f"{mlp}.experts.down_proj"] = torch.stack(w["w2"])
    save_file({**per_expert, **fused}, folder / "model.safetensors")
    return fused


def test_a_native_export_streams_a_fused_checkpoint_in_its_own_layout(trained, tmp_path):
    root = tmp_path
    base, trained_run = trained("native")
    run = root / "run"  # a copy: its config is pointed at the fused base below
    shutil.copytree(trained_run, run, symlinks=True)
    export_run(ExportConfig(run=run, out=root / "per_expert", stream=True))
    fused_base = _fused_copy(base, root / "fused_base")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["base"] = str(root / "fused_base")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    fused = _tensors(export_run(ExportConfig(run=run, out=root / "fused", stream=True)))
    assert fused_base.keys() <= fused.keys()
    expected = _fused_copy(root / "per_expert", root / "per_expert_fused")
    for name, tensor in expected.items():
        torch.testing.assert_close(fused[name], tensor, rtol=0, atol=0)
        assert not torch.equal(fused[name], fused_base[name])  # the LoRA is in


def test_streamed_export_refuses_a_moefied_run_before_building_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"moe": {"family": "moefied", "router": "soft"}}))
    with pytest.raises(ValueError, match="--stream cannot write a moefied run"):
        export_run(ExportConfig(run=run, out=tmp_path / "out", stream=True))
