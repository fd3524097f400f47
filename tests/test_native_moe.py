"""Native MoE experts (Mixtral, Qwen2-MoE, Qwen3-MoE): injected models equal HF's, the export folds LoRA
into an HF model of the same architecture (pruned too), the grouped fast path equals a loop over experts,
expert parallelism on 2 gloo processes equals one process, and training lowers the loss."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from mtmoe.model.dispatch import dispatch
from mtmoe.model.lora import LoRALinear
from mtmoe.model.moe_base import RoutingContext
from mtmoe.model.native import (
    NativeMoELoRA,
    export_native,
    inject_native_moe,
    is_native_moe,
    native_num_experts,
)
from mtmoe.model.routers import RouterOutput
from mtmoe.parallel.expert_parallel import ExpertPlacement, is_expert_param
from mtmoe.parallel.spawn import run_ranks

E, K, RANK, ALPHA = 4, 2, 4, 8.0
COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=K,
    initializer_range=0.1,
    attn_implementation="eager",
)


def tiny_moe(arch: str, seed: int = 0) -> nn.Module:
    """A tiny random HF MoE causal LM, in eval mode."""
    torch.manual_seed(seed)
    if arch == "mixtral":
        cfg = MixtralConfig(**COMMON, intermediate_size=48, num_hidden_layers=2, num_local_experts=E)
    elif arch.startswith("qwen2"):  # layer 1 is a dense FFN
        cfg = Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_hidden_layers=3,
            num_experts=E,
            mlp_only_layers=[1],
            norm_topk_prob=arch == "qwen2-norm",
        )
    else:
        cfg = Qwen3MoeConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_hidden_layers=2,
            num_experts=E,
        )
    return AutoModelForCausalLM.from_config(cfg).eval()


def randomize_lora_b(block: NativeMoELoRA, gen: torch.Generator, local: slice | None = None) -> None:
    """Draws every expert's B (for all E experts, so that any slice of them matches) and keeps `local`."""
    with torch.no_grad():
        for proj in ("gate", "up", "down"):
            b = block.experts.factors(proj)[1]
            full = torch.randn((E, *b.shape[1:]), generator=gen) * 0.3
            b.copy_(full[local or slice(0, E)])


def inject(model: nn.Module, **kw) -> tuple[list[int], RoutingContext]:
    ctx = RoutingContext()
    return inject_native_moe(model, RANK, ALPHA, ctx, **kw), ctx


LORA = [f"experts.{p}_{ab}" for p in ("gate", "up", "down") for ab in "ab"]
IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen2", "qwen2-norm", "qwen3"])
def test_injected_with_zero_lora_equals_hf(arch):
    hf = tiny_moe(arch)
    ours = copy.deepcopy(hf)
    replaced, _ = inject(ours)
    assert replaced == ([0, 2] if arch.startswith("qwen2") else [0, 1])
    assert is_native_moe(hf) and is_native_moe(ours) and native_num_experts(hf) == (E, K)
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-5, rtol=0)
    # Block level, on unit-scale inputs (where a wrong expert or weight shows far above the tolerance).
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    for i in replaced:
        with torch.no_grad():
            ref, got = hf.model.layers[i].mlp(x.clone()), ours.model.layers[i].mlp(x)
        assert ref.abs().max() > 0.05
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if arch == "mixtral":  # Mixtral's training-time jitter: the same noise (same RNG draws) as HF's
        hf_block, block = hf.model.layers[0].mlp.train(), ours.model.layers[0].mlp.train()
        hf_block.jitter_noise = block.jitter_noise = 0.2
        torch.manual_seed(11)
        ref = hf_block(x.clone())
        torch.manual_seed(11)
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)
        torch.manual_seed(12)
        assert (block(x) - ref).abs().max() > 1e-3
    # No HF expert tensors are kept; the frozen ones are in grouped_mm layout; only LoRA and routers train.
    names = {n for n, _ in ours.named_parameters()}
    assert not any("gate_up_proj" in n or n.endswith("mlp.gate.weight") for n in names)
    block = ours.model.layers[0].mlp
    F_ = block.ffn_dim
    assert block.gate_up_LDG.shape == (E, 32, 2 * F_) and block.down_LFD.shape == (E, F_, 32)
    assert block.gate_up_LDG.is_contiguous() and not block.gate_up_LDG.requires_grad
    trainable = {n.split(".mlp.")[1] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"router.weight_ED", *LORA}


class MaskedRouter(nn.Module):
    """The block's router with the dropped experts' logits at -inf: what a pruned HF router computes."""

    def __init__(self, router, keep):
        super().__init__()
        self.router, self.hidden_E = router, torch.ones(E, dtype=torch.bool)
        self.hidden_E[keep] = False

    def forward(self, x_TD, valid_T=None, task_T=None):
        r = self.router
        logits_TE = (x_TD.float() @ r.weight_ED.float().t()).masked_fill(self.hidden_E, float("-inf"))
        top_TK, ids_TK = logits_TE.softmax(-1).topk(r.top_k, dim=-1)
        if r.normalize:
            top_TK = top_TK / top_TK.sum(-1, keepdim=True)
        return RouterOutput(weights_TK=top_TK, ids_TK=ids_TK, aux_loss=x_TD.new_zeros(()))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2"])
@pytest.mark.parametrize("pruned", [False, True], ids=["all", "keep3"])
def test_export_loads_into_hf_and_equals_the_injected_model(arch, pruned):
    model = tiny_moe(arch)
    replaced, _ = inject(model)
    gen = torch.Generator().manual_seed(2)
    for i in replaced:
        randomize_lora_b(model.model.layers[i].mlp, gen)
    attn = model.model.layers[0].self_attn  # attention LoRA is folded too
    attn.q_proj = LoRALinear(attn.q_proj, RANK, ALPHA)
    nn.init.normal_(attn.q_proj.lora_b, std=0.3, generator=gen)
    keep = {i: [[0, 2, 3], [3, 1, 0]][n % 2] for n, i in enumerate(replaced)} if pruned else None
    state, config = export_native(model, keep)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.load_state_dict(state, strict=True)
    assert native_num_experts(hf) == ((3, K) if pruned else (E, K))
    if pruned:
        for i in replaced:
            block = model.model.layers[i].mlp
            block.router = MaskedRouter(block.router, keep[i])
    got, ref = logits(hf), logits(model)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    zero = copy.deepcopy(model)  # the tolerance is meaningful: the LoRA moves the logits far more
    for i in replaced:
        for proj in ("gate", "up", "down"):
            zero.model.layers[i].mlp.experts.factors(proj)[1].data.zero_()
    assert (logits(zero) - ref).abs().max() > 1e-2


def loop_reference(block: NativeMoELoRA, x_TD: torch.Tensor, valid_T, capacity: float) -> torch.Tensor:
    """Loops experts and their tokens; every expert is a full FFN with W_e + ΔW_e; drops contribute 0."""
    route = block.router(x_TD)
    d = dispatch(route.ids_TK, route.weights_TK, E, valid_T, capacity)
    expert_N = torch.repeat_interleave(torch.arange(E), d.groups.counts_E)
    kept = set(zip(d.token_N.tolist(), expert_N.tolist(), strict=True))
    ex, s, F_ = block.experts, block.experts.scaling, block.ffn_dim
    out = []
    for t in range(x_TD.shape[0]):
        y = x_TD.new_zeros(x_TD.shape[1])
        for j in range(K):
            e = int(route.ids_TK[t, j])
            if (t, e) not in kept:
                continue
            delta = {p: s * (ex.factors(p)[0][e] @ ex.factors(p)[1][e]).t() for p in ("gate", "up", "down")}
            w_gu = block.gate_up_LDG[e].t()
            w_gate, w_up = w_gu[:F_] + delta["gate"], w_gu[F_:] + delta["up"]
            w_down = block.down_LFD[e].t() + delta["down"]
            h = F.silu(w_gate @ x_TD[t]) * (w_up @ x_TD[t])
            y = y + route.weights_TK[t, j] * (w_down @ h)
        out.append(y)
    out_TD = torch.stack(out)
    if block.shared_expert is not None:
        out_TD = out_TD + torch.sigmoid(block.shared_expert_gate(x_TD)) * block.shared_expert(x_TD)
    return out_TD


@pytest.mark.parametrize(
    "arch,capacity",
    [("mixtral", 0.0), ("qwen2", 0.0), ("mixtral", 0.5)],
    ids=["mixtral", "qwen2", "capacity"],
)
def test_fast_path_equals_loop_over_experts_forward_and_backward(arch, capacity):
    model = tiny_moe(arch)
    inject(model, capacity_factor=capacity)
    block = model.model.layers[0].mlp.train()
    randomize_lora_b(block, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 32, generator=gen)
    grad_out = torch.randn(2, 6, 32, generator=gen)
    valid_T = None
    if capacity:
        valid_T = torch.ones(12, dtype=torch.bool)
        valid_T[-2:] = False
    block.context.valid_T = valid_T
    results = []
    for run in (block, lambda x_BSD: loop_reference(block, x_BSD.reshape(12, 32), valid_T, capacity)):
        block.zero_grad()
        xr = x.clone().requires_grad_()
        y = run(xr).reshape(2, 6, 32)
        y.backward(grad_out)
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
        results.append((y.detach(), xr.grad, grads))
    (y_fast, gx_fast, g_fast), (y_ref, gx_ref, g_ref) = results
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_fast, gx_ref, atol=1e-5, rtol=1e-4)
    assert g_fast.keys() == g_ref.keys() and len(g_fast) == 7
    for n in g_fast:
        torch.testing.assert_close(g_fast[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=n)
    if capacity:
        assert block.context.dropped > 0
        assert y_fast[1, -2:].abs().max() == 0  # padding tokens get nothing from the experts


def _ep_worker(rank, world):
    import torch.distributed as dist

    from mtmoe.parallel.dist import init_distributed
    from mtmoe.parallel.expert_parallel import create_placement

    init_distributed("gloo")
    placement = create_placement(2, E)
    hf_block = tiny_moe("qwen2").model.layers[0].mlp  # same weights on every rank (seeded)
    blocks = {}
    for name, p in (("full", None), ("ep", placement)):
        torch.manual_seed(7)  # same LoRA A draws for every placement
        blocks[name] = NativeMoELoRA(hf_block, RoutingContext(), RANK, ALPHA, p)
        randomize_lora_b(blocks[name], torch.Generator().manual_seed(8), p.local if p else None)
    full, ep = blocks["full"], blocks["ep"]
    errors = {
        "held": ep.gate_up_LDG.shape[0] + ep.down_LFD.shape[0] + ep.experts.gate_a.shape[0],
        "frozen": (ep.gate_up_LDG - full.gate_up_LDG[placement.local]).abs().max().item(),
    }
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 5 + 3 * rank, 32, generator=gen)  # ranks hold different numbers of tokens
    grad_out = torch.randn(x.shape, generator=gen)
    for capacity in (0.0, 0.75):
        outs = {}
        for name, block in blocks.items():
            block.train().zero_grad()
            block.capacity_factor = capacity
            xr = x.clone().requires_grad_()
            y = block(xr)
            y.backward(grad_out)
            outs[name] = (
                y.detach(),
                xr.grad,
                {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad},
            )
        (y_f, gx_f, g_f), (y_e, gx_e, g_e) = outs["full"], outs["ep"]
        errors[f"out@{capacity}"] = (y_f - y_e).abs().max().item()
        errors[f"x_grad@{capacity}"] = (gx_f - gx_e).abs().max().item()
        errors[f"router_grad@{capacity}"] = (
            (g_f["router.weight_ED"] - g_e["router.weight_ED"]).abs().max().item()
        )
        for n in g_f:
            if n.startswith("experts."):  # an expert's gradient on its owner sums every rank's tokens
                total = g_f[n].clone()
                dist.all_reduce(total, group=placement.group)
                errors[f"{n}@{capacity}"] = (total[placement.local] - g_e[n]).abs().max().item()
    errors["dropped"] = full.context.dropped
    dist.barrier()
    return errors


@pytest.mark.timeout(300)
def test_expert_parallel_block_on_two_processes_equals_one_process():
    for rank, errors in enumerate(run_ranks(_ep_worker, 2)):
        assert errors.pop("held") == 3 * 2, "each rank holds 2 of the 4 experts"
        assert errors.pop("dropped") > 0, "the capacity run should drop assignments"
        for key, err in errors.items():
            assert err < 1e-5, f"rank {rank}: {key} differs by {err}"


def test_a_placement_keeps_the_local_experts_and_marks_them_for_deepspeed():
    model = tiny_moe("mixtral")
    ref = copy.deepcopy(model.model.layers[1].mlp)
    inject(model, placement=ExpertPlacement(E, ep_size=2, ep_rank=1))  # no process group needed
    block = model.model.layers[1].mlp
    torch.testing.assert_close(block.gate_up_LDG, ref.experts.gate_up_proj[2:].transpose(1, 2))
    torch.testing.assert_close(block.down_LFD, ref.experts.down_proj[2:].transpose(1, 2))
    # Every expert tensor, LoRA and frozen, is marked: DeepSpeed must not broadcast rank 0's experts.
    marked = {n for n, p in block.named_parameters() if is_expert_param(p)}
    assert marked == {"gate_up_LDG", "down_LFD", *LORA}
    assert block.ds_moe_marker.num_local_experts == 2 and block.ds_moe_marker.expert_group_name == "ep_size_2"
    with pytest.raises(ValueError, match="ep_size 1"):
        block.merged_hf_weights()


def test_training_steps_lower_the_loss_and_leave_frozen_weights_alone():
    model = tiny_moe("mixtral")
    model.config.output_router_logits = True  # HF's router loss needs its routers: inject turns it off
    _, ctx = inject(model)
    ctx.aux_coef = 0.01
    model.train()
    frozen = model.model.layers[0].mlp.gate_up_LDG.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(6):
        ctx.aux_losses = []
        loss = model(ids, labels=ids).loss + torch.stack(ctx.aux_losses).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(model.model.layers[0].mlp.gate_up_LDG, frozen)
    assert ctx.routed == 6 * 2 * 24 * K  # steps x layers x tokens x top-k


def test_errors_name_the_problem():
    dense = AutoModelForCausalLM.from_config(
        Qwen2MoeConfig(
            **COMMON, intermediate_size=32, num_hidden_layers=1, num_experts=E, mlp_only_layers=[0]
        )
    )
    assert not is_native_moe(dense)
    with pytest.raises(ValueError, match="no sparse MoE block"):
        inject(dense)
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="placement has 8 experts"):
        NativeMoELoRA(model.model.layers[0].mlp, RoutingContext(), RANK, ALPHA, ExpertPlacement(8))
    inject(model)
    with pytest.raises(ValueError, match="no experts given for layers \\[1\\]"):
        export_native(model, {0: [0, 1]})
    with pytest.raises(ValueError, match="distinct ids in 0..3"):
        export_native(model, {0: [0, 0], 1: [0, 1]})
    with pytest.raises(ValueError, match="same number of experts"):
        export_native(model, {0: [0, 1], 1: [0, 1, 2]})
