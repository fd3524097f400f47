"""MoEfied experts (EMTAL): balanced k-means, exactness at ω ≡ 1, export, and the top-k fast path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mtmoe.model.moe_base import RoutingContext
from mtmoe.model.moefied import MoEfiedFFN, balanced_kmeans
from mtmoe.model.routers import SoftSliceRouter, TopKRouter


def mlp_config(d, f):
    return LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act="silu", num_attention_heads=4)


def llama_mlp(d, f, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return LlamaMLP(mlp_config(d, f)).to(dtype)


def make_block(d=16, f=32, e=4, k=0, r=4, dtype=torch.float32, random_b=True, seed=0, **kw):
    mlp = llama_mlp(d, f, dtype, seed)
    reference = LlamaMLP(mlp.config).to(dtype)
    reference.load_state_dict(mlp.state_dict())
    ctx = RoutingContext()
    router = TopKRouter(d, e, k, init_std=0.5).to(dtype) if k not in (0, e) else None
    block = MoEfiedFFN(mlp, e, k, r, 8.0, ctx, router=router, **kw).to(dtype)
    if random_b:
        for p in block.experts.parameters():
            nn.init.normal_(p, std=0.3)
    return block, reference, ctx


# --- balanced k-means ---------------------------------------------------------------------------------


def test_balanced_kmeans_equal_sizes_and_deterministic():
    feats = torch.randn(60, 10)
    a = balanced_kmeans(feats, 5, seed=3)
    assert a.dtype == torch.long and torch.bincount(a, minlength=5).tolist() == [12] * 5
    assert torch.equal(a, balanced_kmeans(feats, 5, seed=3))
    assert torch.bincount(balanced_kmeans(feats, 6, iters=1), minlength=6).tolist() == [10] * 6
    with pytest.raises(ValueError, match="moe.num_experts"):
        balanced_kmeans(feats, 7)


def test_balanced_kmeans_iterations_lower_the_inertia():
    torch.manual_seed(0)
    feats = torch.randn(64, 6, dtype=torch.float64)

    def inertia(a):
        return sum(((feats[a == c] - feats[a == c].mean(0)) ** 2).sum() for c in range(4))

    assert inertia(balanced_kmeans(feats, 4, iters=20)) < 0.95 * inertia(balanced_kmeans(feats, 4, iters=1))


def test_balanced_kmeans_recovers_planted_clusters():
    torch.manual_seed(0)
    E, per, C = 4, 8, 12
    centers = torch.randn(E, C) * 3
    planted = torch.arange(E).repeat_interleave(per)
    feats = centers[planted] + 0.1 * torch.randn(E * per, C)
    shuffle = torch.randperm(E * per)
    for seed in range(3):
        found = balanced_kmeans(feats[shuffle], E, seed=seed)
        truth = planted[shuffle]
        for c in range(E):
            assert truth[found == c].unique().numel() == 1, f"seed {seed}: cluster {c} mixes planted clusters"


# --- exactness at ω ≡ 1 and export ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 2])
def test_all_gates_at_one_equals_dense_ffn(k):
    block, reference, ctx = make_block(k=k, dtype=torch.float64, random_b=False)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = reference(x)
    if k == 0:  # the soft router starts at zero: ω ≡ 1 exactly
        torch.testing.assert_close(block(x), want, atol=1e-10, rtol=1e-10)
    ctx.fade_alpha = 0.0
    torch.testing.assert_close(block(x), want, atol=1e-10, rtol=1e-10)
    ones = torch.ones(10, 4, dtype=torch.float64)
    torch.testing.assert_close(block.dense_forward(x.reshape(10, 16), ones), want.reshape(10, 16))
    # zero LoRA: the export is the original weights, back in the original neuron order
    for name, w in block.dense_weights().items():
        torch.testing.assert_close(w, getattr(reference, name).weight.float(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("k", [0, 2])
def test_faded_block_equals_exported_dense_mlp(k, dtype, tol):
    block, _, ctx = make_block(k=k, dtype=dtype)
    ctx.fade_alpha = 0.0
    x = torch.randn(2, 5, 16, dtype=dtype)
    exported = LlamaMLP(mlp_config(16, 32)).to(dtype)
    exported.load_state_dict({f"{n}.weight": w for n, w in block.dense_weights(dtype).items()})
    torch.testing.assert_close(block(x), exported(x), atol=tol, rtol=tol)
    assert all(w.dtype == torch.float32 for w in block.dense_weights().values())
    torch.testing.assert_close(block.to_dense_mlp()(x), exported(x), atol=tol, rtol=tol)
    assert isinstance(block.to_dense_mlp(), LlamaMLP)


# --- top-k fast path vs a per-slice loop ---------------------------------------------------------------


def slow_topk(block, x_TD, valid_T=None):
    """Loops tokens and chosen slices; each slice is a small FFN with its own W + ΔW."""
    route = block.router(x_TD)
    ex, s, K = block.experts, block.experts.scaling, block.top_k
    lora = {p: ex.factors(p) for p in ("gate", "up", "down")}
    out = []
    for t in range(x_TD.shape[0]):
        y = x_TD.new_zeros(x_TD.shape[1])
        w = route.weights_TK[t] / route.weights_TK[t].sum()
        for j in range(K if valid_T is None or valid_T[t] else 0):
            e = route.ids_TK[t, j]
            wg = block.gate_EDf[e] + s * lora["gate"][0][e] @ lora["gate"][1][e]
            wu = block.up_EDf[e] + s * lora["up"][0][e] @ lora["up"][1][e]
            wd = block.down_EfD[e] + s * lora["down"][0][e] @ lora["down"][1][e]
            h = F.silu(x_TD[t] @ wg) * (x_TD[t] @ wu) * K * w[j]
            y = y + h @ wd
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("d,f,e,k,r,pad", [(16, 32, 4, 2, 4, False), (16, 64, 8, 3, 4, True)])
def test_topk_fast_path_equals_slow_loop_forward_and_backward(d, f, e, k, r, pad):
    block, _, ctx = make_block(d, f, e, k, r)
    T = 12
    x = torch.randn(T, d)
    valid = torch.arange(T) < T - 3 if pad else None
    ctx.valid_T = valid
    grad_out = torch.randn(T, d)
    runs = []
    for fn in (lambda x_: block(x_[None])[0], lambda x_: slow_topk(block, x_, valid)):
        block.zero_grad()
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.backward(grad_out)
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        runs.append((y.detach(), xg.grad, grads))
    (fast, fast_dx, fast_g), (slow, slow_dx, slow_g) = runs
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast_dx, slow_dx, atol=1e-5, rtol=1e-4)
    assert fast_g.keys() == slow_g.keys() and "router.weight_ED" in fast_g
    assert {f"experts.{p}_{ab}" for p in ("gate", "up", "down") for ab in "ab"} <= fast_g.keys()
    for n in fast_g:
        torch.testing.assert_close(fast_g[n], slow_g[n], atol=1e-4, rtol=1e-4, msg=n)
    if pad:
        assert fast[T - 3 :].abs().max() == 0


def test_topk_counts_and_records():
    block, _, ctx = make_block(k=2)
    ctx.record = True
    block.train()
    block(torch.randn(1, 6, 16))
    assert (ctx.routed, ctx.dropped) == (12, 0)
    assert block.util_tokens_XE.sum() == 12 and block.util_mass_XE.sum().item() == pytest.approx(6)
    assert len(ctx.aux_losses) == 1


# --- soft router ----------------------------------------------------------------------------------------


def test_soft_router_omega_sums_to_num_experts_and_tau_scales_it():
    torch.manual_seed(0)
    x = torch.randn(7, 16, dtype=torch.float64)
    w_DE, omegas = torch.randn(16, 4), {}
    for tau in (1.0, 5.0):
        router = SoftSliceRouter(16, 4, tau=tau).double()
        with torch.no_grad():
            router.weight_DE.copy_(w_DE)
        omegas[tau] = 4 * router(x).weights_TK
        torch.testing.assert_close(omegas[tau].sum(-1), torch.full((7,), 4.0, dtype=torch.float64))
    centred = {tau: o.log() - o.log().mean(-1, keepdim=True) for tau, o in omegas.items()}
    torch.testing.assert_close(centred[1.0], 5.0 * centred[5.0])  # log ω ∝ 1/τ
    assert (omegas[5.0] - 1).abs().max() < (omegas[1.0] - 1).abs().max()


def test_soft_block_scales_slices_by_omega_and_records_mass():
    block, _, ctx = make_block(dtype=torch.float64)
    with torch.no_grad():
        block.router.weight_DE.normal_()
    x_TD = torch.randn(6, 16, dtype=torch.float64)
    omega_TE = 4 * block.router(x_TD).weights_TK
    ctx.record = True
    torch.testing.assert_close(block(x_TD[None])[0], block.dense_forward(x_TD, omega_TE))
    torch.testing.assert_close(block.util_mass_XE[0], omega_TE.sum(0) / 4)
    assert block.util_tokens_XE.tolist() == [[6.0] * 4]
    ctx.fade_alpha = 0.25
    torch.testing.assert_close(block(x_TD[None])[0], block.dense_forward(x_TD, 0.25 * omega_TE + 0.75))


# --- gradients, construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 2])
def test_gradients_reach_lora_and_router_not_frozen_weights(k):
    block, _, _ = make_block(k=k)
    if k == 0:
        with torch.no_grad():
            block.router.weight_DE.normal_(std=0.1)
    block(torch.randn(2, 5, 16)).pow(2).sum().backward()
    for name, p in block.named_parameters():
        if name.startswith(("experts.", "router.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    frozen = {n for n, p in block.named_parameters() if not p.requires_grad}
    assert frozen == {"gate_EDf", "up_EDf", "down_EfD"}


def test_construction_checks_and_dtype_move():
    block, _, _ = make_block()
    assert block.gate_EDf.shape == (4, 16, 8) and block.down_EfD.shape == (4, 8, 16)
    assert block.gate_EDf.is_contiguous() and block.down_EfD.is_contiguous()
    assert block.to(torch.bfloat16).up_EDf.dtype == torch.bfloat16
    assert torch.equal(block.perm_F.sort().values, torch.arange(32))
    with pytest.raises(ValueError, match="moe.num_experts"):
        make_block(e=5)
    with pytest.raises(ValueError, match="moe.router"):
        MoEfiedFFN(llama_mlp(16, 32), 4, 2, 4, 8.0, RoutingContext())
    biased = llama_mlp(16, 32)
    biased.up_proj = nn.Linear(16, 32)
    with pytest.raises(ValueError, match="moe.family"):
        MoEfiedFFN(biased, 4, 0, 4, 8.0, RoutingContext())
