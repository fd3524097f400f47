"""The trainable model: a frozen HF causal LM with MoE-LoRA blocks, plus how to build it from a config.

Shape legend: B batch, S sequence, D hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from mtmoe.config import Config
from mtmoe.model.base import empty_model, load_base_model, resolve_base, tiny_llama, tiny_moe
from mtmoe.model.frozen_store import store_frozen_
from mtmoe.model.inject import inject_moe_lora
from mtmoe.model.moe_base import RoutingContext
from mtmoe.model.routers import check_router
from mtmoe.model.sharded_load import load_local_experts, load_streamed
from mtmoe.model.token_loss import target_losses_and_logits, target_token_losses
from mtmoe.model.walk import moe_blocks
from mtmoe.model.zero3 import Partition, partitioner, prepare_for_zero3
from mtmoe.parallel.ds_config import build_ds_config
from mtmoe.parallel.expert_parallel import ExpertPlacement

TINY_MOE = ("tiny-mixtral", "tiny-qwen2-moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class MoELM(nn.Module):
    """Wraps the injected LM so that one forward sets the routing context and returns the aux loss.

    Args:
        lm: The HF causal LM after `inject_moe_lora`.
        context: The routing context its blocks share.
    """

    def __init__(self, lm: PreTrainedModel, context: RoutingContext):
        super().__init__()
        self.lm, self.context = lm, context

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        loss_mask_BS: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        return_logits: bool = False,
        position_ids_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Returns (loss_BS, aux_loss), and the target tokens' logits_NV when `return_logits`.

        loss_BS is the next-token loss at every target token (0 elsewhere); aux_loss is the weighted
        router loss (`aux_loss_coef` · load balance + `z_loss_coef` · z-loss, of `moe.router_options`)
        averaged over blocks; logits_NV (fp32) are in row-major order of the targets.

        `task_ids` holds a task per row, (B,), or per token, (B, S). Packed rows (see
        `mtmoe.data.collate.pack`) pass `position_ids_BS`, which restart at 0 with every sample: the
        model then attends only within each sample, and `attention_mask_BS` only marks the padding
        that routing skips.
        """
        hidden_BSD, aux = self.hidden_states(input_ids_BS, attention_mask_BS, task_ids, position_ids_BS)
        lm_head = self.lm.get_output_embeddings()
        if return_logits:
            loss_BS, logits_NV = target_losses_and_logits(hidden_BSD, lm_head, input_ids_BS, loss_mask_BS)
        else:  # the fused, chunked loss: no N×V logits kept
            loss_BS, logits_NV = target_token_losses(hidden_BSD, lm_head, input_ids_BS, loss_mask_BS), None
        return (loss_BS, aux, logits_NV) if return_logits else (loss_BS, aux)

    def hidden_states(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed forward up to the final norm: (hidden_BSD, aux_loss), without the LM head.

        Sets the routing context for the blocks (padding to skip, each token's task) and collects their
        router losses; `forward` adds the loss on top. Arguments as in `forward`.
        """
        ctx = self.context
        ctx.replaying = False
        ctx.valid_T = attention_mask_BS.reshape(-1).bool()
        if task_ids is None:
            ctx.task_T = None
        else:
            ctx.task_T = (
                (task_ids[:, None] if task_ids.dim() == 1 else task_ids).expand_as(input_ids_BS).reshape(-1)
            )
        ctx.aux_losses = []
        if position_ids_BS is None:
            hidden_BSD = self.lm.base_model(
                input_ids=input_ids_BS, attention_mask=attention_mask_BS, use_cache=False
            )[0]
        else:
            # With no attention mask, HF finds the samples from where the positions restart and builds a
            # block-diagonal causal mask (or varlen attention): samples do not see each other.
            hidden_BSD = self.lm.base_model(
                input_ids=input_ids_BS, position_ids=position_ids_BS, use_cache=False
            )[0]
        aux = torch.stack(ctx.aux_losses).mean() if ctx.aux_losses else hidden_BSD.new_zeros(())
        # valid_T and task_T stay set: gradient checkpointing re-runs the blocks in backward, and they
        # must route those tokens as the forward did. The next forward overwrites them.
        ctx.aux_losses = []
        ctx.replaying = True
        return hidden_BSD, aux

    @torch.no_grad()
    def next_token_logits(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        position_ids_BS: torch.Tensor,
        cache: Any,
        task_ids_B: torch.Tensor,
    ) -> tuple[torch.Tensor, Any]:
        """One decoding forward with the KV cache (`mtmoe.eval.generation.StepFn`).

        Routes only the new tokens (`input_ids_BS`, left padding excluded), by their rows' tasks, and
        neither records utilization nor keeps router losses.

        Args:
            input_ids_BS: The new tokens (the prompt, then one token per step).
            attention_mask_BS: The mask of the whole sequence so far (cached tokens and the new ones).
            position_ids_BS: Positions of the new tokens.
            cache: The KV cache of the previous step (None at the prompt).
            task_ids_B: The task of every row.

        Returns:
            (logits_BV at each row's last position, fp32; the updated cache).
        """
        ctx = self.context
        recording, ctx.record, ctx.replaying = ctx.record, False, False
        new = input_ids_BS.shape[1]
        ctx.valid_T = attention_mask_BS[:, -new:].reshape(-1).bool()
        ctx.task_T = task_ids_B[:, None].expand_as(input_ids_BS).reshape(-1)
        ctx.aux_losses = []
        try:
            return decode_step(self.lm, input_ids_BS, attention_mask_BS, position_ids_BS, cache)
        finally:
            ctx.record, ctx.aux_losses = recording, []

    def set_recording(self, on: bool) -> None:
        """Turns utilization counting on or off (and resets the counters when turning it on)."""
        self.context.record = on
        if on:
            for block in moe_blocks(self.lm).values():
                block.reset_utilization()


@torch.no_grad()
def decode_step(
    lm: PreTrainedModel,
    input_ids_BS: torch.Tensor,
    attention_mask_BS: torch.Tensor,
    position_ids_BS: torch.Tensor,
    cache: Any,
) -> tuple[torch.Tensor, Any]:
    """One decoding forward of an HF causal LM with its KV cache.

    The mask covers the whole sequence so far; the ids and positions are the new tokens'.

    Returns:
        (fp32 logits_BV at each row's last position, the updated cache).
    """
    out = lm(
        input_ids=input_ids_BS,
        attention_mask=attention_mask_BS,
        position_ids=position_ids_BS,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.past_key_values


def build_base(
    cfg: Config,
    vocab_size: int,
    cache_dir: Path | None = None,
    local_experts: slice | None = None,
    partition: Partition | None = None,
    empty: bool = False,
) -> PreTrainedModel:
    """Loads (or, for `tiny-llama`, builds deterministically) the frozen base model.

    Args:
        cfg: The run config.
        vocab_size: The tokenizer's vocabulary size (for the tiny random models).
        cache_dir: Where the demo's converted base lives.
        local_experts: For a native MoE folder under expert parallelism: the experts this rank keeps.
            Only their tensors are read (`mtmoe.model.sharded_load`); None reads the whole checkpoint.
        partition: Under ZeRO-3: partitions tensors across the ranks. A checkpoint's tensors are
            partitioned one by one as they are read; a tiny random model is built whole, then partitioned.
        empty: Build the model from its folder's config on the meta device, without weights (for the
            streamed export, which reads the weights from the files itself).
    """
    dtype = DTYPES[cfg.model.dtype]
    if empty:
        if cfg.model.base == "tiny-llama" or cfg.model.base in TINY_MOE:
            raise ValueError(
                f"model.base {cfg.model.base!r} has no weight files; a streamed export needs them"
            )
        return empty_model(resolve_base(cfg.model.base, cache_dir), dtype).eval()
    tiny = None
    if cfg.model.base == "tiny-llama":
        tiny = tiny_llama(vocab_size, seed=cfg.train.seed, **cfg.model.tiny).to(dtype)
    elif cfg.model.base in TINY_MOE:
        tiny = tiny_moe(cfg.model.base, vocab_size, seed=cfg.train.seed, **cfg.model.tiny).to(dtype)
    if tiny is not None:
        if partition is not None:
            partition(tiny.parameters())
        return tiny
    folder = resolve_base(cfg.model.base, cache_dir)
    frozen_dtype = DTYPES.get(cfg.model.frozen_dtype)
    if local_experts is not None:
        return load_local_experts(folder, dtype, local_experts, partition=partition)
    if partition is not None and cfg.moe.family == "native":  # both expert layouts; every expert is ours
        return load_local_experts(folder, dtype, slice(0, _num_experts(folder)), partition=partition)
    if partition is None and frozen_dtype in (None, dtype):
        return load_base_model(folder, dtype=dtype)
    return load_streamed(folder, dtype, frozen_dtype or dtype, partition)


def build_model(
    cfg: Config,
    vocab_size: int,
    num_tasks: int,
    placement: ExpertPlacement | None = None,
    task_names: list[str] | None = None,
    empty_base: bool = False,
) -> MoELM:
    """The base model with MoE-LoRA injected; the LoRA/router initialisation is seeded by `train.seed`.

    Args:
        cfg: The run config.
        vocab_size: The tokenizer's vocabulary size.
        num_tasks: Tasks in the manifest.
        placement: The experts this rank holds, for training (see `inject_moe_lora`); None = all.
        task_names: The manifest's task names in id order (needed by `moe.task_experts`).
        empty_base: The base without weights, on the meta device (`build_base(empty=True)`): only the
            trainable tensors hold numbers, freshly initialised.
    """
    check_router(cfg)
    sharded = cfg.moe.family == "native" and placement is not None and placement.ep_size > 1
    zero3 = placement is not None and cfg.parallel.zero_stage == 3
    partition = partitioner(build_ds_config(cfg, dist.get_world_size())) if zero3 else None
    local = placement.local if sharded else None
    lm = build_base(cfg, vocab_size, local_experts=local, partition=partition, empty=empty_base)
    torch.manual_seed(cfg.train.seed + 1)
    context = inject_moe_lora(lm, cfg.moe, num_tasks, placement, task_names)
    if empty_base:
        materialize_trainable(lm)
    # Fresh LoRA parameters are fp32 masters; compute casts them to the model dtype.
    if cfg.model.frozen_dtype:
        store_frozen_(lm, DTYPES[cfg.model.frozen_dtype], DTYPES[cfg.model.dtype])
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = MoELM(lm, context)
    if zero3:
        prepare_for_zero3(model)
    return model


def materialize_trainable(model: nn.Module) -> None:
    """Gives every trainable parameter still on the meta device real (uninitialised) CPU storage.

    For a model built on an empty base: layers that put their LoRA on the base's device (PEFT does)
    leave it on meta; a checkpoint is then loaded into it.
    """
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta and p.requires_grad:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype))


def _num_experts(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("num_local_experts", config.get("num_experts", 0)))


def block_num_experts(cfg: Config, task_names: list[str]) -> int:
    """Experts per block: the open pool plus the experts reserved for task groups."""
    m = cfg.moe
    if m.family == "native":  # the checkpoint decides
        if cfg.model.base in TINY_MOE:
            return int(cfg.model.tiny.get("num_local_experts", cfg.model.tiny.get("num_experts", 4)))
        return _num_experts(resolve_base(cfg.model.base))
    if not m.task_experts:
        return m.num_experts
    return m.num_experts + m.task_experts * len(m.task_groups or task_names)


TASK_ROUTING = ("task_logits_XE", "task_emb_XD")


def freeze_all_but_task_routing(model: nn.Module) -> list[str]:
    """`train.trainable=task_routing`: only the task gates / task embeddings stay trainable.

    Returns:
        The names of the tensors left trainable.
    """
    kept = []
    for name, p in model.named_parameters():
        keep = p.requires_grad and name.rsplit(".", 1)[-1] in TASK_ROUTING
        p.requires_grad_(keep)
        if keep:
            kept.append(name)
    if not kept:
        raise ValueError(
            "config key 'train.trainable': task_routing, but the model has no task-routing tensors"
        )
    for m in list(model.modules()):  # no expert tensor trains: DeepSpeed must not look for MoE groups
        if hasattr(m, "ds_moe_marker"):
            del m.ds_moe_marker
    return kept


def balance_bias_routers(model: nn.Module) -> list[nn.Module]:
    """The routers that keep an auxiliary-loss-free balancing bias."""
    return [m for m in model.modules() if getattr(m, "balance_bias", False)]


def trainable_state_dict(model: MoELM) -> dict[str, torch.Tensor]:
    """Only the trainable tensors (LoRA factors, routers), detached, on CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
