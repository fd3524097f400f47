"""The fast MoE-LoRA block equals a slow, obvious reference (one full FFN per expert)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.config import MoEConfig
from mtmoe.model.base import tiny_llama
from mtmoe.model.block import MoELoRAFFN, RoutingContext
from mtmoe.model.dispatch import sort_by_expert
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.inject import inject_moe_lora
from mtmoe.model.routers import TopKRouter, load_balance_loss
from mtmoe.model.walk import moe_blocks


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, d, bias=False), nn.SiLU()


def make_block(d, f, e, k, r, seed=0):
    torch.manual_seed(seed)
    ctx = RoutingContext()
    block = MoELoRAFFN(
        SwiGLU(d, f), TopKRouter(d, e, k, init_std=0.5), UpcycledLoRAExperts(e, d, f, r, 16.0), ctx
    )
    for p in block.experts.parameters():  # B starts at zero; make the experts differ
        nn.init.normal_(p, std=0.3)
    return block


def slow_reference(block, x_BSD):
    """Loops tokens and experts; every expert is a full FFN with W + ΔW_e."""
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    route = block.router(x_TD)
    s, base, ex = block.experts.scaling, block.base, block.experts
    out = []
    for t in range(x_TD.shape[0]):
        y = 0
        for j in range(route.ids_TK.shape[1]):
            e = route.ids_TK[t, j]
            w = {
                p: getattr(base, f"{p}_proj").weight + s * (ex.factors(p)[0][e] @ ex.factors(p)[1][e]).t()
                for p in ("gate", "up", "down")
            }
            h = F.silu(x_TD[t] @ w["gate"].t()) * (x_TD[t] @ w["up"].t())
            y = y + route.weights_TK[t, j] * (h @ w["down"].t())
        out.append(y)
    return torch.stack(out).reshape(x_BSD.shape)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_fused", "grouped_composition"])
@pytest.mark.parametrize("d,f,e,k,r", [(16, 32, 4, 2, 8), (6, 10, 3, 1, 3), (16, 32, 8, 3, 4)])
def test_fast_block_equals_slow_reference_forward_and_backward(d, f, e, k, r, fused, monkeypatch):
    """Both fast paths: the cache-blocked CPU one and the grouped-matmul composition GPUs take."""
    if not fused:
        monkeypatch.setattr("mtmoe.model.block.SILU_TYPES", ())
    block = make_block(d, f, e, k, r)
    x = torch.randn(2, 5, d, dtype=torch.float32)
    grad_out = torch.randn(2, 5, d, dtype=torch.float32)
    fast = block(x.clone().requires_grad_())
    fast.backward(grad_out)
    fast_grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad()
    slow = slow_reference(block, x)
    slow.backward(grad_out)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    assert fast_grads.keys() == {n for n, p in block.named_parameters() if p.grad is not None}
    for n, p in block.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast_grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)
    assert any("experts" in n for n in fast_grads) and any("router" in n for n in fast_grads)


def test_grouped_path_handles_empty_experts():
    block = make_block(16, 32, 8, 1, 8)
    with torch.no_grad():
        block.router.weight_ED.zero_()
        block.router.weight_ED[5] = 10.0  # every token to expert 5 (inputs are positive)
    x = torch.rand(1, 6, 16, dtype=torch.float32) + 0.1
    ids = block.router(x.reshape(-1, 16)).ids_TK
    assert set(ids.flatten().tolist()) == {5}
    torch.testing.assert_close(block(x), slow_reference(block, x), atol=1e-5, rtol=1e-4)


def test_sort_by_expert_groups_assignments():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    d = sort_by_expert(ids, torch.ones(3, 2), 4)
    assert d.groups.counts_E.tolist() == [2, 2, 2, 0]
    assert d.groups.offsets_E.tolist() == [2, 4, 6, 6]
    assert d.token_N.tolist() == [1, 0, 1, 2, 0, 2]  # first choices before second choices


def test_load_balance_loss_is_one_when_balanced_and_ignores_padding():
    probs = torch.full((4, 2), 0.5)
    ids = torch.tensor([[0], [1], [0], [1]])
    assert load_balance_loss(probs, ids, None).item() == pytest.approx(1.0)
    skew = torch.tensor([[0.9, 0.1]] * 4)
    ids0 = torch.zeros(4, 1, dtype=torch.long)
    assert load_balance_loss(skew, ids0, None).item() == pytest.approx(1.8)
    valid = torch.tensor([True, True, False, False])
    mixed_probs = torch.cat([skew[:2], probs[:2]])
    mixed_ids = torch.cat([ids0[:2], ids[:2]])
    assert load_balance_loss(mixed_probs, mixed_ids, valid).item() == pytest.approx(1.8)


def test_injected_model_at_init_equals_base_model():
    base = tiny_llama(vocab_size=128, seed=3, hidden_size=32, intermediate_size=64)
    ids = torch.randint(0, 128, (2, 7))
    ref = base(input_ids=ids).logits
    inject_moe_lora(base, MoEConfig(num_experts=4, top_k=2, rank=4, attn_lora_rank=4), num_tasks=1)
    assert len(moe_blocks(base)) == 2
    torch.testing.assert_close(base(input_ids=ids).logits, ref)
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(("experts" in n) or ("router" in n) or ("lora" in n) for n in trainable)


def test_injection_rejects_bad_layer_index():
    base = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="moe.layers"):
        inject_moe_lora(base, MoEConfig(layers=[0, 5]), num_tasks=1)


def test_grouped_mm_path_is_taken_for_aligned_fp32_and_matches_loop_fallback():
    from mtmoe.model.dispatch import grouped_linear

    ids = torch.randint(0, 4, (10, 2))
    d = sort_by_expert(ids, torch.ones(10, 2), 4)
    x = torch.randn(20, 16)
    w = torch.randn(4, 16, 8)
    fast = grouped_linear(x, w, d.groups)
    slow = grouped_linear(x.double(), w.double(), d.groups)  # float64 takes the loop fallback
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=1e-5)
