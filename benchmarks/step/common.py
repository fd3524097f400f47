"""What the step modes share: the batch, each variant's loss terms, the frozen floor and the step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.models import VOCAB, random_batch
from benchmarks.reference import LoopMoELoRAFFN
from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.token_loss import target_token_losses, token_losses

SETUP = {"batch": 4, "seq": 128, "loss_fraction": 0.25, "recipe": "launch/recipes/demo.yaml"}

# A variant's loss terms: (cross-entropy over the target tokens, router aux loss or None).
LossFn = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
Shape = tuple[int, ...]


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """4 x 128 random tokens, no padding, a fixed random loss mask (~25%, never position 0), one task."""
    return random_batch(SETUP["batch"], SETUP["seq"], VOCAB, SETUP["loss_fraction"], seed)


def loss_fns(
    moe: MoELM, batch: Mapping[str, torch.Tensor], peft_model: nn.Module | None = None
) -> dict[str, LossFn]:
    """The loss terms of every variant on `batch`: `mtmoe`, `full_head`, `loop`, `floor` (and `peft`).

    `mtmoe` is the model's forward (LM head only at the targets); `full_head` its routed forward with the
    full-vocabulary logits; `loop` the same model with each block run as a per-expert loop; `floor` the
    frozen base alone (`frozen_floor_loss`); `peft` HF's causal-LM loss of `peft_model`.
    """
    ids, attn, mask, task_ids = (batch[k] for k in ("input_ids", "attention_mask", "loss_mask", "task_ids"))
    n_targets = mask.sum()

    def mtmoe() -> tuple[torch.Tensor, torch.Tensor]:
        loss_BS, aux = moe(ids, attn, mask, task_ids)
        return loss_BS.sum() / n_targets, aux

    def full_head() -> tuple[torch.Tensor, torch.Tensor]:
        hidden_BSD, aux = moe.hidden_states(ids, attn, task_ids)
        loss_BS = token_losses(moe.lm.get_output_embeddings()(hidden_BSD), ids, mask)
        return loss_BS.sum() / n_targets, aux

    def loop() -> tuple[torch.Tensor, torch.Tensor]:
        with swapped_blocks(moe, LoopMoELoRAFFN):
            return mtmoe()

    def floor() -> tuple[torch.Tensor, None]:
        return frozen_floor_loss(moe, batch), None

    fns: dict[str, LossFn] = {"mtmoe": mtmoe, "full_head": full_head, "loop": loop, "floor": floor}
    if peft_model is not None:

        def peft() -> tuple[torch.Tensor, None]:
            out = peft_model(input_ids=ids, attention_mask=attn, labels=batch["labels"], use_cache=False)
            return out.loss, None

        fns["peft"] = peft
    return fns


@contextlib.contextmanager
def swapped_blocks(moe: MoELM, wrap: Callable[[MoELoRAFFN], nn.Module]) -> Iterator[dict[int, nn.Module]]:
    """Inside, every MoE block of `moe` is replaced by `wrap(block)` (yielded by layer); then restored."""
    layers = moe.lm.model.layers
    blocks = {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, MoELoRAFFN)}
    swapped = {i: wrap(block) for i, block in blocks.items()}
    for i, module in swapped.items():
        layers[i].mlp = module
    try:
        yield swapped
    finally:  # autograd keeps what it needs
        for i, block in blocks.items():
            layers[i].mlp = block


def _grad_starts_here(module: nn.Module, args: tuple, out_BSD: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output as a leaf that requires grad (where grad is enabled)."""
    return out_BSD.detach().requires_grad_(torch.is_grad_enabled())


def frozen_floor_loss(moe: MoELM, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The frozen base's mean target cross-entropy, differentiable from the first adapted FFN's output on.

    Each MoE block is swapped back to its frozen FFN for the call (no router, no adapters); a hook on the
    first of them makes its output a leaf that requires grad, so the backward of the result computes the
    input grads of every later layer and nothing else (every weight is frozen).
    """
    ids_BS, attn_BS, mask_BS = (batch[k] for k in ("input_ids", "attention_mask", "loss_mask"))
    with swapped_blocks(moe, lambda block: block.base) as frozen:
        hook = frozen[min(frozen)].register_forward_hook(_grad_starts_here)
        try:
            hidden_BSD = moe.lm.base_model(input_ids=ids_BS, attention_mask=attn_BS, use_cache=False)[0]
            loss_BS = target_token_losses(hidden_BSD, moe.lm.get_output_embeddings(), ids_BS, mask_BS)
            return loss_BS.sum() / mask_BS.sum()
        finally:
            hook.remove()


def make_step(terms: LossFn, params: list[nn.Parameter]) -> Callable[[], torch.Tensor]:
    """One training step without the optimizer: clear grads, forward, backward; returns the loss."""

    def step() -> torch.Tensor:
        for p in params:
            p.grad = None
        ce, aux = terms()
        loss = ce if aux is None else ce + aux  # the router loss comes weighted
        loss.backward()
        return loss.detach()

    return step


def check_floor_frozen(floor: LossFn, moe: MoELM) -> None:
    """Asserts that the floor's step backpropagates and leaves every parameter without a gradient."""
    loss = make_step(floor, [])()
    assert torch.isfinite(loss), "frozen_floor: non-finite loss"
    with_grad = [n for n, p in moe.named_parameters() if p.grad is not None]
    assert not with_grad, f"frozen_floor: parameters got gradients: {with_grad[:3]}"


def moe_setup(moe: MoELM) -> dict[str, int]:
    """The MoE-LoRA shape: blocks, layers, experts, top-k and rank."""
    blocks = [m for m in moe.modules() if isinstance(m, MoELoRAFFN)]
    first = blocks[0]
    return {
        "blocks": len(blocks),
        "layers": len(moe.lm.model.layers),
        "num_experts": first.num_experts,
        "top_k": first.router.top_k,
        "rank": first.experts.gate_a.shape[2],
    }


def _addmm_flops(self_shape: Shape, mat1_shape: Shape, mat2_shape: Shape, *args: Any, **kwargs: Any) -> int:
    """FLOPs of (in-place) addmm: those of its matrix product, as the counter's `addmm` formula."""
    (m, k), (_, n) = mat1_shape, mat2_shape
    return 2 * m * k * n


def _sdpa_flops(q_shape: Shape, k_shape: Shape, v_shape: Shape, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention forward: the counter's SDPA formula (full S x S)."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_backward_flops(
    grad_shape: Shape, q_shape: Shape, k_shape: Shape, v_shape: Shape, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of the CPU flash-attention backward: the counter's SDPA backward formula (scores recomputed)."""
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


# Ops the flop counter does not know, with its own formulas: the in-place addmm of the expert kernel and
# the CPU flash attention (the counter registers only the GPU attention kernels).
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten.addmm_: _addmm_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def count_flops(step: Callable[[], object]) -> dict[str, Any]:
    """Runs `step` once under the flop counter; returns the total and the per-op counts."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        step()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "per_op": per_op}


def mtmoe_and_floor(moe: MoELM, batch: Mapping[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """The mtmoe training step (`compare`'s `mtmoe_moe_lora`) and the floor's, on `batch`."""
    fns = loss_fns(moe, batch)
    params = [p for p in moe.parameters() if p.requires_grad]
    return {"mtmoe": make_step(fns["mtmoe"], params), "floor": make_step(fns["floor"], [])}
