"""Loading a native MoE checkpoint under expert parallelism: each rank reads only the experts it keeps.

A tiny Mixtral and a tiny Qwen2-MoE are saved by transformers in several shards (the hub's per-expert
layout); each of 2 ranks loads them with `load_local_experts` and must hold exactly what the whole load
gives for its experts, having read only its share of the expert bytes.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from training_runs import final, losses, train_run

from mtmoe.data.shards import load_manifest
from mtmoe.model.base import load_base_model, load_tokenizer, resolve_base, tiny_moe
from mtmoe.model.moe_base import RoutingContext
from mtmoe.model.native import NativeMoELoRA
from mtmoe.model.sharded_load import PER_EXPERT, ReadStats, load_local_experts, stored_tensors
from mtmoe.model.walk import decoder_layers
from mtmoe.parallel.expert_parallel import ExpertPlacement

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=["tiny-mixtral", "tiny-qwen2-moe"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    tiny_moe(request.param, 96).save_pretrained(folder, max_shard_size="60KB")
    return folder


def test_a_rank_reads_only_its_experts_and_holds_what_the_whole_load_gives(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4  # really sharded
    whole = load_base_model(saved)
    full = dict(whole.named_parameters())
    stored = stored_tensors(saved)
    nbytes = {n: t.dtype.itemsize * torch.Size(t.shape).numel() for n, t in stored.items()}
    expert_bytes = sum(b for n, b in nbytes.items() if PER_EXPERT.match(n))
    for rank in range(2):
        local = ExpertPlacement(4, 2, rank).local
        stats = ReadStats()
        model = load_local_experts(saved, torch.float32, local, stats)
        for name, p in model.named_parameters():
            want = (
                full[name][local]
                if name.endswith(("experts.gate_up_proj", "experts.down_proj"))
                else full[name]
            )
            assert torch.equal(p, want), name
        # every non-expert tensor, and this rank's half of the expert tensors; the other half never read
        assert stats.bytes_read == sum(nbytes.values()) - expert_bytes // 2
        assert stats.tensors_skipped == sum(1 for n in stored if PER_EXPERT.match(n)) // 2


def test_native_blocks_built_on_a_sharded_load_equal_those_built_on_the_whole_load(saved):
    whole = load_base_model(saved)
    placement = ExpertPlacement(4, 2, 1)
    sharded = load_local_experts(saved, torch.float32, placement.local)
    blocks = [
        NativeMoELoRA(decoder_layers(m)[0].mlp, RoutingContext(), 4, 8.0, placement) for m in (whole, sharded)
    ]
    for name, p in blocks[0].named_parameters():
        if not name.startswith("experts."):  # the LoRA factors are drawn at random
            assert torch.equal(p, dict(blocks[1].named_parameters())[name]), name
    with pytest.raises(ValueError, match="loaded with experts"):
        NativeMoELoRA(decoder_layers(sharded)[1].mlp, RoutingContext(), 4, 8.0, ExpertPlacement(4, 2, 0))


def test_a_fused_expert_checkpoint_is_read_by_rows(tmp_path):
    model = tiny_moe("tiny-mixtral", 96)
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")  # fused 3-D experts, as a tool may write them
    stats = ReadStats()
    local = slice(2, 4)
    loaded = load_local_experts(tmp_path, torch.float32, local, stats)
    fused = dict(loaded.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(fused, model.model.layers[0].mlp.experts.gate_up_proj[local])
    expert_bytes = sum(v.numel() * 4 for k, v in state.items() if ".experts." in k)
    assert stats.bytes_read == sum(v.numel() * 4 for v in state.values()) - expert_bytes // 2


def test_a_tensor_the_model_has_no_place_for_is_named(tmp_path):
    model = tiny_moe("tiny-mixtral", 96)
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="'model.layers.0.extra.weight' is not a parameter"):
        load_local_experts(tmp_path, torch.float32, slice(0, 2))
    del state["model.layers.0.extra.weight"], state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="do not provide"):
        load_local_experts(tmp_path, torch.float32, slice(0, 2))


def test_a_sharded_mixtral_folder_trains_under_ep2_exactly_as_the_whole_load(demo_data, tmp_path):
    """`model.base` a saved (sharded) Mixtral folder: with `ep_size` 2 each rank reads only its experts,
    and the run equals the replicated one, which reads the whole checkpoint."""
    vocab = len(load_tokenizer(resolve_base(load_manifest(demo_data).tokenizer)))
    folder = tmp_path / "mixtral"
    tiny_moe("tiny-mixtral", vocab).save_pretrained(folder, max_shard_size="2MB")
    extra = [f"model.base={folder}", "moe.family=native", "moe.router_options.aux_loss_coef=0.01"]
    ep2 = train_run(demo_data, tmp_path / "ep2", 2, 2, *extra, steps=3, save_every=0)
    rep = train_run(demo_data, tmp_path / "rep", 2, 1, *extra, steps=3, save_every=0)
    a, b = losses(rep), losses(ep2)
    assert all(b[s] == pytest.approx(a[s], rel=1e-6) for s in a), (a, b)
    wa, wb = final(rep, step=3), final(ep2, step=3)
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)  # as tests/test_ep_training.py
