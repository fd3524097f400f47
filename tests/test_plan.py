"""The memory plan: planned bytes against a real step measured in this process, for every family;
the expert-parallel path against 2 real ranks; the two big recipes planned on the meta device."""

import importlib.util
import json

import pytest
from conftest import ROOT

from mtmoe.config import load_config
from mtmoe.parallel.spawn import run_ranks
from mtmoe.plan.measure import comparable, measure
from mtmoe.plan.planner import plan
from mtmoe.plan.workload import GIB, Workload

RECIPES = ROOT / "launch" / "recipes"
TASKS = ["codegen", "docstring", "translate"]
VOCAB = 49152  # the demo tokenizer's, which the tiny recipe trains with


def _check(recipe, overrides, seq_len=64, vocab=512, padded=True):
    cfg = load_config(RECIPES / recipe, [*overrides, "parallel.zero_stage=0"])  # plain AdamW, world 1
    planned = comparable(plan(cfg, Workload(world=1, seq_len=seq_len, padded=padded), vocab, TASKS))
    return planned, measure(cfg, seq_len, vocab, TASKS, padded=padded)


def test_tiny_recipe_plan_matches_a_measured_step():
    planned, measured = _check("tiny.yaml", [], seq_len=128, vocab=VOCAB)
    for key in ("frozen", "trainable", "grads"):
        assert planned[key] == measured[key], key
    # AdamW's step counters are the only state the plan leaves out: one scalar per parameter.
    assert planned["optimizer"] == pytest.approx(measured["optimizer"], rel=1e-3)
    assert planned["activations"] == pytest.approx(measured["activations"], rel=0.02)
    assert planned["total"] == pytest.approx(measured["total"], rel=0.25)
    assert planned["total"] == pytest.approx(measured["total"], rel=0.02)  # what we actually get


def test_bf16_stored_base_plans_and_measures_half_the_frozen_linear_bytes():
    planned, measured = _check("tiny.yaml", ["model.frozen_dtype=bfloat16"], seq_len=128, vocab=VOCAB)
    full, _ = _check("tiny.yaml", [], seq_len=128, vocab=VOCAB)
    assert planned["frozen"] == measured["frozen"]
    # Only the RMSNorm weights (hidden size 64: 2 per layer and the final one) stay fp32.
    norms = (2 * 2 + 1) * 64 * 4
    assert planned["frozen"] == (full["frozen"] - norms) // 2 + norms


FAMILIES = {
    "bf16, no attention LoRA": ("tiny.yaml", ["model.dtype=bfloat16", "moe.attn_lora_rank=0"]),
    "o_proj LoRA only": ("tiny.yaml", ["moe.attn_targets=[o_proj]"]),
    "capacity factor": ("tiny.yaml", ["moe.capacity_factor=1.0"]),
    "gradient checkpointing": ("tiny.yaml", ["model.gradient_checkpointing=true"]),
    "bf16-stored frozen base": ("tiny.yaml", ["model.frozen_dtype=bfloat16"]),
    "native Mixtral, bf16, jitter": (
        "native_tiny.yaml",
        ["model.dtype=bfloat16", "model.tiny={router_jitter_noise: 0.1}"],
    ),
    "native Qwen2-MoE": ("native_tiny.yaml", ["model.base=tiny-qwen2-moe"]),
    "MoEfied soft": ("moefied.yaml", ["model.base=tiny-llama"]),
    "MoEfied top-1": ("moefied.yaml", ["model.base=tiny-llama", "moe.router=topk", "moe.top_k=1"]),
    "task gate": ("task_gate.yaml", ["model.base=tiny-llama"]),
    "shared and reserved experts": ("upcycled_multitask.yaml", ["model.base=tiny-llama"]),
}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_planned_activations_match_the_saved_tensors_of_every_family(name, padded):
    recipe, overrides = FAMILIES[name]
    planned, measured = _check(recipe, overrides, padded=padded)
    assert planned["activations"] == pytest.approx(measured["activations"], rel=0.02)
    assert planned["frozen"] + planned["trainable"] == measured["frozen"] + measured["trainable"]
    assert planned["total"] == pytest.approx(measured["total"], rel=0.05)


EP_CASES = {"upcycled": ("tiny.yaml", ["moe.attn_lora_rank=0"]), "native": ("native_tiny.yaml", [])}


def _ep_config(name):
    recipe, overrides = EP_CASES[name]
    return load_config(RECIPES / recipe, [*overrides, "parallel.ep_size=2", "parallel.zero_stage=0"])


def _ep_rank(rank, world):
    import torch.distributed as dist

    from mtmoe.model.moe_lm import block_num_experts
    from mtmoe.parallel.expert_parallel import ExpertPlacement

    dist.init_process_group("gloo")
    out = {}
    for name in EP_CASES:
        cfg = _ep_config(name)
        placement = ExpertPlacement(block_num_experts(cfg, TASKS), world, rank, dist.group.WORLD)
        out[name] = measure(cfg, 64, 512, TASKS, placement=placement)
    dist.destroy_process_group()
    return out


def test_expert_parallel_activations_match_two_real_ranks():
    ranks = run_ranks(_ep_rank, 2)
    for name in EP_CASES:
        planned = comparable(plan(_ep_config(name), Workload(world=2, seq_len=64), 512, TASKS))
        # The ranks receive different rows, but every row sent is received once: the sum is exact.
        measured = sum(r[name]["activations"] for r in ranks)
        assert 2 * planned["activations"] == pytest.approx(measured, rel=0.02), name
        assert (
            planned["frozen"] + planned["trainable"] == ranks[0][name]["frozen"] + ranks[0][name]["trainable"]
        )


def test_mixtral_holds_an_eighth_of_the_experts_per_rank_and_needs_expert_parallelism():
    cfg = load_config(RECIPES / "mixtral_8x7b.yaml")
    ep8 = plan(cfg, Workload(world=8, seq_len=4096))
    expert_weights = 32 * 8 * 3 * 4096 * 14336  # layers × experts × (gate, up, down) × D × F
    assert ep8["parameters"]["frozen_expert"]["numel"] == expert_weights // 8
    assert ep8["model"]["experts_per_rank"] == 1
    assert ep8["memory"]["fits"]
    ep1 = plan(
        load_config(RECIPES / "mixtral_8x7b.yaml", ["parallel.ep_size=1"]), Workload(world=8, seq_len=4096)
    )
    assert ep1["parameters"]["frozen_expert"]["numel"] == expert_weights
    assert ep1["memory"]["persistent"] > 80 * GIB and not ep1["memory"]["fits"]
    # More nodes shard the expert optimizer state over the expert-data-parallel group (world / ep_size).
    ep8_w16 = plan(cfg, Workload(world=16, seq_len=4096))
    assert ep8_w16["optimizer"]["adam"] < ep8["optimizer"]["adam"]
    rows_out = [c for c in ep8["traffic"]["collectives"] if c["what"] == "all-to-all rows out"][0]
    assert rows_out["payload"] == 32 * 8 * 2 * (4096 - 1) * 2 * 4096 * 2  # layers·accum·passes·N·D·b


def test_llama3_70b_fits_one_node_only_with_zero3():
    cfg = load_config(RECIPES / "llama3_70b_upcycled_zero3.yaml")
    frozen = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672) + 2 * 128256 * 8192  # + norms
    z3 = {world: plan(cfg, Workload(world=world, seq_len=4096)) for world in (8, 16)}
    assert z3[8]["parameters"]["frozen_dense"]["numel"] == pytest.approx(frozen, rel=1e-4)
    for world, p in z3.items():
        assert (
            p["memory"]["frozen_held"] == pytest.approx(2 * frozen / world, rel=1e-3) and p["memory"]["fits"]
        )
    assert z3[16]["memory"]["peak"] < z3[8]["memory"]["peak"]
    z2 = plan(
        load_config(RECIPES / "llama3_70b_upcycled_zero3.yaml", ["parallel.zero_stage=2"]), Workload(world=8)
    )
    assert z2["memory"]["persistent"] > 130 * GIB and not z2["memory"]["fits"]


@pytest.mark.parametrize(
    "recipe,world,experts_per_rank",
    [("qwen3_30b_a3b_native.yaml", 8, 16), ("qwen3_235b_a22b_native.yaml", 32, 4)],
)
def test_qwen3_moe_recipes_fit_with_expert_parallelism_and_zero3(recipe, world, experts_per_rank):
    p = plan(load_config(RECIPES / recipe), Workload(world=world, seq_len=4096))
    assert p["model"]["experts"] == 128 and p["model"]["experts_per_rank"] == experts_per_rank
    params = p["parameters"]
    # ZeRO-3 keeps 1/world of the dense base; the experts are already 1/ep_size each (EDP group of 1)
    held = params["frozen_dense"]["bytes"] / world + params["frozen_expert"]["bytes"]
    assert p["memory"]["frozen_held"] == pytest.approx(held, rel=1e-6) and p["memory"]["fits"]


def test_ep_size_that_divides_neither_experts_nor_world_names_the_key():
    cfg = load_config(RECIPES / "mixtral_8x7b.yaml")
    with pytest.raises(ValueError, match="parallel.ep_size"):
        plan(cfg, Workload(world=4, seq_len=128))


def test_plan_command_on_the_smollm2_recipe_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "plan.json"
    cli.main(
        [
            "--config",
            str(RECIPES / "smollm2_1.7b_upcycled.yaml"),
            "--world",
            "8",
            "--seq-len",
            "2048",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "planned peak" in printed and "fits in 80 GiB" in printed
    p = json.loads(out.read_text())
    assert p["model"]["layers"] == 24 and p["model"]["experts_per_rank"] == 8
    assert p["parameters"]["frozen_dense"]["numel"] == pytest.approx(1.71e9, rel=0.01)
    # ZeRO-2 over 8 ranks: each keeps an eighth of the fp32 masters of the trainable tensors.
    trainable = p["parameters"]["trainable_dense"]["numel"] + p["parameters"]["trainable_expert"]["numel"]
    assert p["optimizer"]["master"] == pytest.approx(trainable * 4 / 8, rel=1e-3)
