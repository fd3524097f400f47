"""Merging in weight-delta space, and folding an MoE-LoRA model into a dense HF model."""

import pytest
import torch

from mtmoe.config import load_config
from mtmoe.export.dense import fold_to_dense, load_trainable
from mtmoe.export.merge import weighted_average
from mtmoe.model.moe_lm import build_model, trainable_state_dict
from mtmoe.model.walk import moe_blocks


def test_weighted_average_hand_worked():
    deltas = torch.tensor([[[1.0, 0.0]], [[0.0, 4.0]]])  # two experts, ΔW of shape (1, 2)
    got = weighted_average(deltas, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(got, torch.tensor([[0.75, 1.0]]))
    with pytest.raises(ValueError):
        weighted_average(deltas, torch.tensor([1.0, -1.0]))


def test_merging_deltas_differs_from_merging_factors():
    # The cross terms that averaging A and B separately would add: mean(B)·mean(A) != mean(B·A).
    a = torch.tensor([[[1.0]], [[0.0]]])  # (E, in, R)
    b = torch.tensor([[[0.0]], [[1.0]]])  # (E, R, out)
    per_expert = (a @ b).transpose(1, 2)
    assert weighted_average(per_expert, torch.ones(2)).item() == 0.0
    assert (a.mean(0) @ b.mean(0)).item() == 0.25


def _model():
    cfg = load_config(
        None,
        [
            "model.base=tiny-llama",
            "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
            " num_attention_heads: 4, num_key_value_heads: 2}",
            "moe.rank=4",
            "moe.attn_lora_rank=4",
        ],
    )
    return build_model(cfg, vocab_size=64, num_tasks=1)


def test_dense_export_equals_moe_when_experts_agree():
    model = _model()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        for block in moe_blocks(
            model.lm
        ).values():  # every expert gets expert 0's LoRA: routing no longer matters
            for p in block.experts.parameters():
                p.copy_(p[:1].expand_as(p))
    ids = torch.randint(0, 64, (2, 9))
    ones = torch.ones_like(ids)
    moe_loss, _ = model(ids, ones, ones)
    dense = fold_to_dense(model, {0: torch.tensor([0.7, 0.1, 0.1, 0.1]), 1: torch.ones(4)})
    assert not moe_blocks(dense)
    assert all(not type(m).__module__.startswith("mtmoe") for m in dense.modules())
    logits = dense(input_ids=ids).logits
    dense_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )
    torch.testing.assert_close(dense_loss, moe_loss[:, 1:], atol=1e-5, rtol=1e-5)


def test_export_differs_when_experts_differ_and_weights_matter():
    model = _model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("_b"):
                p.normal_(0, 0.1)
    state = trainable_state_dict(model)
    a = fold_to_dense(model, {0: torch.tensor([1.0, 0, 0, 0]), 1: torch.ones(4)})
    model_b = _model()
    load_trainable(model_b, state)
    b = fold_to_dense(model_b, {0: torch.tensor([0, 0, 0, 1.0]), 1: torch.ones(4)})
    wa, wb = a.model.layers[0].mlp.gate_proj.weight, b.model.layers[0].mlp.gate_proj.weight
    assert not torch.allclose(wa, wb)
    torch.testing.assert_close(a.model.layers[1].mlp.up_proj.weight, b.model.layers[1].mlp.up_proj.weight)


def test_load_trainable_refuses_a_mismatched_checkpoint():
    model = _model()
    state = trainable_state_dict(model)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        load_trainable(model, state)


def test_a_dense_export_larger_than_a_shard_is_written_in_shards_that_load(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mtmoe.export import dense
    from mtmoe.model.base import load_tokenizer, resolve_base, tiny_llama

    monkeypatch.setattr(dense, "SHARD_SIZE", "200KB")  # a big model's 5GB, scaled to a tiny one
    lm = tiny_llama(49152)
    dense.save_dense(lm, load_tokenizer(resolve_base("smollm2-135m-instruct")), tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(lm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
