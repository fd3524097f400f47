"""Routers and expert layouts: sigmoid scores, noisy gating, the z-loss, auxiliary-loss-free balancing,
task embeddings, experts reserved per task group, shared experts, MOELoRA's per-task gate with its exact
per-task export, adding a task later by training only its routing, the router registry and the old flat
router keys."""

import json
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run_cmd
from test_block import SwiGLU, make_block
from training_runs import final, link_checkpoint, losses, train_run

from mtmoe.config import MoEConfig, load_config
from mtmoe.model.base import tiny_llama
from mtmoe.model.block import MoELoRAFFN, RoutingContext
from mtmoe.model.experts import UpcycledLoRAExperts
from mtmoe.model.inject import inject_moe_lora, task_expert_mask
from mtmoe.model.routers import (
    ROUTERS,
    Router,
    RouterOutput,
    TaskGateRouter,
    TopKOptions,
    TopKRouter,
    check_router,
    register_router,
    router_options,
    update_balance_biases,
)
from mtmoe.model.walk import moe_blocks

pytestmark = pytest.mark.timeout(400)


def test_sigmoid_scores_choose_the_top_k_and_renormalise():
    torch.manual_seed(0)
    router = TopKRouter(8, 6, 2, init_std=1.0, score="sigmoid")
    x = torch.randn(20, 8)
    out = router(x)
    scores = torch.sigmoid(x @ router.weight_ED.t())
    top, ids = scores.topk(2, dim=-1)
    assert torch.equal(out.ids_TK, ids)
    torch.testing.assert_close(out.weights_TK, top / top.sum(-1, keepdim=True))


def test_z_loss_is_the_mean_squared_logsumexp_over_real_tokens_and_trains_the_router():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, init_std=1.0)
    x, valid = torch.randn(10, 8), torch.tensor([True] * 7 + [False] * 3)
    out = router(x, valid)
    want = torch.logsumexp(x[:7] @ router.weight_ED.t(), -1).square().mean()
    torch.testing.assert_close(out.z_loss, want)
    out.z_loss.backward()
    assert router.weight_ED.grad.abs().sum() > 0


def test_noisy_gating_perturbs_training_routes_only():
    torch.manual_seed(0)
    router = TopKRouter(8, 8, 2, init_std=0.1, noise_std=1.0)
    x = torch.randn(64, 8)
    clean = router.eval()(x).ids_TK
    assert torch.equal(router(x).ids_TK, clean)  # eval: no noise
    noisy = router.train()(x).ids_TK
    assert not torch.equal(noisy, clean)


def test_balance_bias_evens_out_a_skewed_load_without_changing_gate_values():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 1, normalize=False, init_std=0.2, balance_bias=True).train()
    with torch.no_grad():
        router.weight_ED[0] += 0.5  # expert 0 wins most tokens
    x = torch.randn(256, 8).abs()

    def max_share():
        ids = router(x).ids_TK
        counts = torch.bincount(ids.reshape(-1), minlength=4).float()
        return float(counts.max() / counts.sum())

    before = max_share()
    for _ in range(200):
        router(x)
        update_balance_biases([router], 0.002)
    router.load_E.zero_()
    after = max_share()
    assert before > 0.9 and after < 0.4, (before, after)
    out = router(x)  # the chosen experts' weights are still their plain scores
    probs = (x @ router.weight_ED.t()).softmax(-1)
    torch.testing.assert_close(out.weights_TK, probs.gather(1, out.ids_TK))
    assert not torch.equal(out.ids_TK, probs.topk(1, dim=-1).indices)  # the bias did change the choice


def test_task_embedding_routes_the_same_token_differently_per_task():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 1, init_std=1.0, num_tasks=2)
    with torch.no_grad():
        router.task_emb_XD[1] = -3 * router.weight_ED[router(torch.zeros(1, 8) + 1).ids_TK[0, 0]]
    x = torch.ones(5, 8)
    a = router(x, task_T=torch.zeros(5, dtype=torch.long)).ids_TK
    b = router(x, task_T=torch.ones(5, dtype=torch.long)).ids_TK
    assert not torch.equal(a, b)
    router(x, task_T=torch.ones(5, dtype=torch.long)).z_loss.backward()
    assert router.task_emb_XD.grad[1].abs().sum() > 0


def test_reserved_experts_are_chosen_only_by_their_group():
    cfg = MoEConfig(num_experts=2, top_k=2, task_experts=2, task_groups={"code": ["a", "b"], "text": ["c"]})
    allowed = task_expert_mask(cfg, ["a", "b", "c"])
    assert allowed.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1]]
    torch.manual_seed(0)
    router = TopKRouter(8, 6, 2, init_std=2.0, allowed_XE=allowed, score="sigmoid", balance_bias=True)
    task = torch.randint(0, 3, (200,))
    ids = router(torch.randn(200, 8), task_T=task).ids_TK
    assert bool(allowed[task[:, None], ids].all())
    assert set(ids[task == 2].unique().tolist()) & {4, 5}  # the text group's experts do get used
    with pytest.raises(ValueError, match="moe.task_groups.text.*unknown task 'z'"):
        task_expert_mask(MoEConfig(task_experts=1, task_groups={"text": ["z"]}), ["a"])
    with pytest.raises(ValueError, match="in no group"):
        task_expert_mask(MoEConfig(task_experts=1, task_groups={"x": ["a"]}), ["a", "b"])


def _weights(block, experts, shares):
    """Per projection, W + Σ_e shares_e ΔW_e (+ every shared expert's ΔW)."""
    w = {}
    for p in ("gate", "up", "down"):
        w[p] = getattr(block.base, f"{p}_proj").weight + torch.einsum(
            "e,eoi->oi", shares, experts.weight_delta(p)
        )
        if block.shared is not None:
            w[p] = w[p] + block.shared.weight_delta(p).sum(0)
    return w


def _ffn(x, w):
    return (F.silu(x @ w["gate"].t()) * (x @ w["up"].t())) @ w["down"].t()


def test_shared_experts_join_every_routed_expert():
    block = make_block(16, 32, 4, 2, 4)
    block.shared = UpcycledLoRAExperts(2, 16, 32, 4, 16.0)
    for p in block.shared.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x_TD = torch.randn(6, 16)
    route = block.router(x_TD)
    want = torch.zeros(6, 16)
    for t in range(6):
        for j in range(2):
            e = int(route.ids_TK[t, j])
            w = _weights(block, block.experts, F.one_hot(torch.tensor(e), 4).float())
            want[t] += route.weights_TK[t, j] * _ffn(x_TD[t], w)
    torch.testing.assert_close(block(x_TD[None])[0], want, atol=1e-5, rtol=1e-4)


def test_task_gate_mixes_every_expert_per_projection_with_its_tasks_gate():
    torch.manual_seed(0)
    ctx = RoutingContext(num_tasks=2)
    block = MoELoRAFFN(SwiGLU(16, 32), TaskGateRouter(4, 2), UpcycledLoRAExperts(4, 16, 32, 4, 16.0), ctx)
    for p in [*block.experts.parameters(), block.router.task_logits_XE]:
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 6, 16)
    ctx.task_T = torch.tensor([0, 0, 0, 1, 1, 1])
    out = block(x)[0]
    for t, task in enumerate(ctx.task_T.tolist()):
        gate = block.router.task_logits_XE[task].softmax(-1)
        torch.testing.assert_close(
            out[t], _ffn(x[0, t], _weights(block, block.experts, gate)), atol=1e-5, rtol=1e-4
        )
    out.sum().backward()
    assert block.router.task_logits_XE.grad.abs().sum() > 0


def test_inject_builds_the_configured_routers_and_layouts():
    lm = tiny_llama(100, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    options = {"score": "sigmoid", "z_loss_coef": 0.1}
    cfg = MoEConfig(num_experts=2, top_k=2, task_experts=1, shared_experts=1, router_options=options)
    ctx = inject_moe_lora(lm, cfg, 3, task_names=["a", "b", "c"])
    block = moe_blocks(lm)[0]
    assert block.num_experts == 5 and block.shared.num_local == 1 and ctx.z_coef == 0.1
    assert block.router.allowed_XE.sum(1).tolist() == [3, 3, 3] and block.router.score == "sigmoid"
    for bad, key in {
        ("moe.router=task_gate", "moe.fade_fraction=0.2"): "moe.fade_fraction",
        ("train.trainable=task_routing", "train.init_from=x"): "train.trainable",
        ("moe.router=soft",): "moe.router",  # soft routes MoEfied slices only
        ("moe.router=nope",): "moe.router",
        ("moe.router_options.tau=2",): "moe.router_options.tau",  # a soft option under topk
        ("moe.router_options.noise_std=-1",): "moe.router_options.noise_std",
        ("moe.family=moefied", "moe.top_k=4"): "moe.top_k",
    }.items():
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            check_router(load_config(None, list(bad)))


def test_router_options_train_and_resume_exactly(demo_data, tmp_path):
    """Sigmoid scores, noise, z-loss, balancing biases, reserved and shared experts in one real run; the
    biases and the noise's RNG come back on resume."""
    extra = [
        "moe.router_options.score=sigmoid",
        "moe.router_options.noise_std=0.5",
        "moe.router_options.z_loss_coef=0.001",
        "moe.router_options.balance_bias_rate=0.01",
        "moe.task_experts=1",
        "moe.shared_experts=1",
    ]
    full = train_run(demo_data, tmp_path / "full", 1, 1, *extra)
    biases = {k: v for k, v in final(full).items() if k.endswith("bias_E")}
    assert len(biases) == 2 and all(v.abs().sum() > 0 for v in biases.values())
    resumed = link_checkpoint(full, tmp_path / "resumed", 3)
    train_run(demo_data, resumed, 1, 1, *extra, resume=True)
    a, b = losses(full), losses(resumed)
    assert all(a[s] == b[s] for s in (4, 5, 6)), (a, b)
    ta, tb = final(full), final(resumed)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _export(run, *args):
    run_cmd([sys.executable, "launch/export.py", "--run", run, "--out", run / "dense", *args])
    return json.loads((run / "dense" / "export_report.json").read_text())["tasks"]


def test_task_gated_run_exports_an_exact_dense_model_per_task_and_adds_a_task_later(demo_data, tmp_path):
    gate = ["moe.router=task_gate", "moe.shared_experts=1", "train.lr=2e-2", "train.grad_clip=0"]
    first = tmp_path / "first"
    run_cmd([sys.executable, "launch/train.py", "--config", "launch/recipes/tiny.yaml",
             f"data.tokenized={demo_data}", f"train.output_dir={first}", "train.steps=6",
             "data.tasks=[codegen,docstring]", *gate])  # fmt: skip
    report = _export(first, "--task", "codegen")
    assert report["codegen"]["export_loss"] == pytest.approx(report["codegen"]["moe_loss"], abs=1e-5)
    gates = {k: v for k, v in final(first).items() if k.endswith("task_logits_XE")}
    assert all(v[0].abs().max() > 1e-4 for v in gates.values())  # codegen's gate did train

    later = tmp_path / "later"  # translate: only its own routing scalars train, over the frozen experts
    run_cmd([sys.executable, "launch/train.py", "--config", "launch/recipes/tiny.yaml",
             f"data.tokenized={demo_data}", f"train.output_dir={later}", "train.steps=8",
             "data.tasks=[translate]", f"train.init_from={first}", "train.trainable=task_routing",
             *gate, "train.lr=0.5"])  # fmt: skip
    before, after = final(first), final(later, step=8)
    assert set(after) == {k for k in before if k.endswith("task_logits_XE")}
    for k, rows in after.items():  # the old tasks' gates did not move; translate's did
        assert torch.equal(rows[:2], before[k][:2]) and not torch.equal(rows[2], before[k][2])
    untouched = report["translate"]["moe_loss"]  # the first run's model, translate at its neutral gate
    learned = json.loads((later / "eval.json").read_text())["tasks"]["translate"]["loss"]
    assert learned < untouched - 1e-3, (learned, untouched)
    chained = _export(later, "--task", "translate")  # export rebuilds the experts from train.init_from
    assert chained["translate"]["export_loss"] == pytest.approx(learned, abs=1e-5)


def test_router_lr_scale_gives_the_routers_their_own_rate(demo_data, tmp_path):
    """AdamW moves a parameter by about its rate per step: task-gate logits trained at 50 × lr move about
    50 × as far as at 1 × lr, while the experts' rate stays the recipe's."""
    from mtmoe.parallel.engine import param_groups

    model = tiny_llama(vocab_size=64)
    inject_moe_lora(model, MoEConfig(num_experts=4, top_k=2, router="task_gate"), num_tasks=2)
    groups = {g["name"]: g for g in param_groups(model, 0.0, router_lr=0.05)}
    assert groups["router"]["lr"] == 0.05 and "lr" not in groups["experts"]
    moved = {}
    for scale in (1, 50):
        run = train_run(demo_data, tmp_path / f"x{scale}", 1, 1, "moe.router=task_gate",
                        f"train.router_lr_scale={scale}", steps=4, save_every=0)  # fmt: skip
        gates = [v for k, v in final(run, step=4).items() if k.endswith("task_logits_XE")]
        moved[scale] = max(float(g.abs().max()) for g in gates)
    assert 25 < moved[50] / moved[1] < 75, moved


def test_a_registered_router_is_chosen_by_name_with_its_own_checked_options():
    """The extension point: one class and one registration line; `moe.router_options` is its dataclass."""

    @dataclass(kw_only=True)
    class FirstOptions:
        bias: float = 0.0

    @register_router("first_expert_test", FirstOptions)
    class FirstExpert(Router):  # every token to expert 0 (and 1), a fixed gate
        def __init__(self, num_experts, top_k, bias):
            super().__init__()
            self.num_experts, self.top_k, self.bias = num_experts, top_k, bias

        @classmethod
        def from_options(cls, options, shape):
            return cls(shape.num_experts, shape.top_k, options.bias)

        def forward(self, x_TD, valid_T=None, task_T=None):
            T = x_TD.shape[0]
            ids_TK = torch.arange(self.top_k).expand(T, -1)
            weights_TK = torch.full((T, self.top_k), 1.0 / self.top_k, dtype=x_TD.dtype)
            return RouterOutput(weights_TK=weights_TK, ids_TK=ids_TK, aux_loss=x_TD.new_zeros(()))

    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_router("first_expert_test")(FirstExpert)
        cfg = load_config(None, ["moe.router=first_expert_test", "moe.router_options.bias=0.5"])
        check_router(cfg)
        lm = tiny_llama(100, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
        ctx = inject_moe_lora(lm, cfg.moe, num_tasks=1)
        block = moe_blocks(lm)[0]
        assert isinstance(block.router, FirstExpert) and block.router.bias == 0.5 and ctx.aux_coef == 0.0
        ctx.record = True
        lm(torch.randint(0, 100, (2, 5)))
        assert block.util_tokens_XE[0].tolist() == [10.0, 10.0, 0.0, 0.0]  # routed as the router said
        with pytest.raises(ValueError, match=r"moe\.router_options\.scale"):
            check_router(load_config(None, ["moe.router=first_expert_test", "moe.router_options.scale=2"]))
    finally:
        ROUTERS.pop("first_expert_test", None)


def test_the_old_flat_router_keys_still_load_into_the_router_options(tmp_path):
    """Recipes and run folders written before the registry: moved with a warning, or refused when they set
    another router."""
    with pytest.warns(FutureWarning, match="moe.router_options.noise_std"):
        cfg = load_config(None, ["moe.score=sigmoid", "moe.router_noise=0.5", "moe.soft_tau=5.0"])
    assert cfg.moe.router == "topk" and cfg.moe.router_options == {"score": "sigmoid", "noise_std": 0.5}
    with pytest.warns(FutureWarning):
        gate = load_config(None, ["moe.task_routing=gate", "moe.aux_loss_coef=0.01"])
        emb = load_config(None, ["moe.task_routing=embedding"])
        soft = load_config(None, ["moe.family=moefied", "moe.router=soft", "moe.soft_tau=2.0", "moe.top_k=4"])
    assert (gate.moe.router, gate.moe.router_options) == ("task_gate", {})
    assert emb.moe.router_options == {"task_embedding": True}
    assert soft.moe.router_options == {"tau": 2.0}
    with pytest.raises(ValueError, match="'moe.soft_tau' sets the soft router, but moe.router is topk"):
        load_config(None, ["moe.soft_tau=2.0"])
    # an old run folder's config.yaml holds every flat key at its default: it loads as the same config
    old = {"moe": {
        "router": "topk", "score": "softmax", "router_noise": 0.0, "soft_tau": 5.0, "aux_loss_coef": 0.01,
        "z_loss_coef": 0.0, "balance_bias_rate": 0.0, "task_routing": "none", "native_router_trainable": True,
        "normalize_top_k": True, "router_init_std": 0.02,
    }}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.warns(FutureWarning):
        loaded = router_options(load_config(tmp_path / "config.yaml").moe)
    assert loaded == TopKOptions(aux_loss_coef=0.01)
