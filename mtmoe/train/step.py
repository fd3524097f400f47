"""One optimizer step of the loop.

Sample the micro-batches, count the global batch's tokens, then forward, the balanced loss (plus Quality
Retaining's term), backward and the step, with the non-finite guard's agreement.

Shape legend: B batch, S sequence, N target tokens, V vocabulary, X tasks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtmoe.balance.quality_retain import QualityRetainer, distillation_sums, retain_loss
from mtmoe.balance.task_loss import balanced_loss, task_loss_sums, task_token_counts
from mtmoe.config import DataConfig
from mtmoe.data.collate import Batch, collate, pack
from mtmoe.data.sampler import MixingSampler
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.token_loss import target_mask
from mtmoe.parallel.dist import all_reduce_sum
from mtmoe.train import checkpoint, faults
from mtmoe.train.guard import NonFiniteGuard


def micro_batch(sampler: MixingSampler, shards: list, size: int, pad_id: int, data: DataConfig) -> Batch:
    """The next micro-batch this rank draws, collated (or packed, with `data.packing`)."""
    draws = sampler.draw_batch(size)
    samples = [shards[d.task][d.index] for d in draws]
    task_ids = [shards[d.task].task_id for d in draws]
    if data.packing:
        return pack(samples, task_ids, pad_id, data.pack_length)
    return collate(samples, task_ids, pad_id)


def global_counts(batches: list[Batch], num_tasks: int) -> tuple[torch.Tensor, int, int]:
    """Per-task target tokens, real tokens and computed positions (real plus padding), summed over ranks.

    Everything is over the whole global batch.
    """
    local = torch.zeros(num_tasks + 2, dtype=torch.float64)
    for b in batches:
        local[:num_tasks] += task_token_counts(b.loss_mask_BS, b.task_ids, num_tasks)
        local[num_tasks] += b.num_tokens()
        local[num_tasks + 1] += b.input_ids_BS.numel()
    total = all_reduce_sum(local)
    return total[:num_tasks], int(total[num_tasks]), int(total[num_tasks + 1])


def train_step(
    engine,
    batches: list[Batch],
    counts_X: torch.Tensor,
    weights_X: torch.Tensor,
    normalize_by: str,
    grad_scale: float,
    device,
    guard: NonFiniteGuard,
    step: int,
    retainer: QualityRetainer | None,
):
    """One optimizer step over the micro-batches.

    Returns:
        (global per-task losses, mean weighted router loss, skipped, Quality Retaining term):
        `skipped` is True when a rank saw a non-finite loss or gradient; then no rank changed its
        weights or optimizer state.
    """
    sums_X = torch.zeros_like(counts_X)
    aux_sum, qr_sum, skipped = 0.0, 0.0, False
    adamw = checkpoint.inner_optimizer(engine)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        teachers = teacher_logits(engine.module, batch, retainer) if retainer and retainer.teachers else None
        out = engine(
            batch.input_ids_BS,
            batch.attention_mask_BS,
            batch.loss_mask_BS,
            batch.task_ids,
            return_logits=teachers is not None,
            position_ids_BS=batch.position_ids_BS,
        )
        loss_BS, aux = out[0], out[1]
        mb_sums_X = task_loss_sums(loss_BS, batch.task_ids, len(counts_X))
        loss = balanced_loss(mb_sums_X, counts_X, grad_scale, weights_X, normalize_by) + aux
        if teachers is not None:
            qr = retain_term(out[2], batch, teachers, retainer, counts_X, grad_scale)
            loss = loss + qr
            qr_sum += float(qr.detach()) / grad_scale
        loss = faults.nan_loss(loss, step, dist.get_rank())
        guard.check_loss(loss)
        engine.backward(loss)
        if i == len(batches) - 1:  # the optimizer steps in this engine.step(): every rank agrees first
            skipped = guard.agree()
            adamw.skip_next_step = skipped
        engine.step()
        adamw.skip_next_step = False
        sums_X += mb_sums_X.detach().double().cpu()
        aux_sum += float(aux.detach())
    task_loss_X = all_reduce_sum(sums_X) / counts_X.clamp_min(1)
    qr_total = float(all_reduce_sum(torch.tensor([qr_sum], dtype=torch.float64))[0])
    return task_loss_X, aux_sum / len(batches), skipped, qr_total


@torch.no_grad()
def teacher_logits(module: MoELM, batch: Batch, retainer: QualityRetainer) -> dict[int, torch.Tensor]:
    """Each teacher's logits at the target tokens of its task's rows (teacher weights swapped in).

    Every rank runs every teacher (a one-row filler when it has no row of that task, its result
    dropped): an expert-parallel forward is a collective.
    """
    out = {}
    was_training, recording = module.training, module.context.record
    module.eval()  # dropless, like evaluation
    module.context.record = False
    for task in sorted(retainer.teachers):
        rows_B = (batch.task_ids == task).nonzero(as_tuple=True)[0]
        sub = rows_B if len(rows_B) else torch.zeros(1, dtype=torch.long, device=rows_B.device)
        with retainer.teacher_weights(task):
            logits_NV = module(
                batch.input_ids_BS[sub],
                batch.attention_mask_BS[sub],
                batch.loss_mask_BS[sub],
                batch.task_ids[sub],
                return_logits=True,
            )[2]
        if len(rows_B):
            out[task] = logits_NV
    module.train(was_training)
    module.context.record = recording
    return out


def retain_term(
    student_logits_NV, batch: Batch, teachers: dict, retainer: QualityRetainer, counts_X, grad_scale: float
) -> torch.Tensor:
    """This micro-batch's Quality Retaining loss (see `mtmoe.balance.quality_retain`)."""
    target_bi, _ = target_mask(batch.loss_mask_BS).nonzero(as_tuple=True)
    task_N = batch.task_ids[target_bi]
    kl_sums_X = student_logits_NV.new_zeros(retainer.num_tasks)
    for task, teacher_NV in teachers.items():
        mine_N = task_N == task  # the student's targets in this task's rows, in the teacher's order
        kl_sums_X = kl_sums_X + distillation_sums(
            student_logits_NV[mine_N], teacher_NV, task_N[mine_N], retainer.num_tasks
        )
    return retain_loss(kl_sums_X, counts_X, retainer.ce_X, retainer.coef, grad_scale)
