"""The data-balanced loss: per-task token means over the global batch, exact across ranks."""

import pytest
import torch

from mtmoe.balance.task_loss import balanced_loss, task_loss_sums, task_token_counts
from mtmoe.config import load_config
from mtmoe.data.collate import collate
from mtmoe.model.token_loss import token_losses
from mtmoe.parallel.spawn import run_ranks


def test_balanced_loss_is_mean_of_task_token_means():
    loss_BS = torch.tensor([[0.0, 1.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 10.0, 20.0, 30.0]])
    mask_BS = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    tasks_B = torch.tensor([0, 0, 2])
    counts = task_token_counts(mask_BS, tasks_B, 3)
    assert counts.tolist() == [3.0, 0.0, 3.0]  # position 0 never counts: it predicts nothing
    sums = task_loss_sums(loss_BS, tasks_B, 3)
    got = balanced_loss(sums, counts, grad_scale=1.0)
    assert got.item() == pytest.approx(((1 + 3 + 2) / 3 + (10 + 20 + 30) / 3) / 2)


def test_target_only_lm_head_equals_full_logits_path():
    from mtmoe.model.token_loss import target_token_losses

    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 1, 0]])
    torch.testing.assert_close(
        target_token_losses(hidden, head, ids, mask), token_losses(head(hidden), ids, mask)
    )


def test_token_losses_only_on_targets():
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[1, 0, 1, 1]])
    loss = token_losses(logits, ids, mask)
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert loss[0, 0] == 0 and loss[0, 1] == 0
    torch.testing.assert_close(loss[0, 2:], ref[1:])


# Rank r's micro-batches: different task mixes and lengths on each rank.
PLAN = {
    0: [([0, 0], [9, 5]), ([0, 1], [7, 12])],
    1: [([2, 2], [6, 6]), ([1, 2], [3, 10])],
}


def _samples(rank):
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for tasks, lengths in PLAN[rank]:
        rows = []
        for n in lengths:
            ids = torch.randint(0, 96, (n,), generator=g).numpy()
            mask = (torch.rand(n, generator=g) > 0.4).to(torch.uint8).numpy()
            rows.append((ids, mask))
        out.append(collate(rows, tasks, pad_id=0))
    return out


def _cfg(zero_stage=0):
    return load_config(
        None,
        [
            "model.base=tiny-llama",
            "model.tiny={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
            " num_attention_heads: 4, num_key_value_heads: 2}",
            "moe.rank=4",
            "moe.attn_lora_rank=2",
            "train.micro_batch_size=2",
            "train.grad_accum=2",
            f"parallel.zero_stage={zero_stage}",
            "parallel.ds_config=ds_configs/zero0.json" if zero_stage == 0 else "parallel.ds_config=",
        ],
    )


def _make_model(cfg):
    from mtmoe.model.moe_lm import build_model

    model = build_model(cfg, vocab_size=96, num_tasks=3)
    with torch.no_grad():  # non-zero B factors so that every trainable tensor gets a gradient
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith(("_b", "lora_b")):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def _grads_on_ranks(rank, world):
    from mtmoe.parallel.dist import all_reduce_sum, init_distributed
    from mtmoe.parallel.engine import build_engine

    cfg = _cfg()
    init_distributed("gloo")
    engine = build_engine(_make_model(cfg), cfg, world)
    batches = _samples(rank)
    counts = all_reduce_sum(sum(task_token_counts(b.loss_mask_BS, b.task_ids, 3) for b in batches))
    shown = torch.zeros(3, dtype=torch.float64)
    for i, b in enumerate(batches):
        loss_BS, _ = engine(b.input_ids_BS, b.attention_mask_BS, b.loss_mask_BS, b.task_ids)
        sums = task_loss_sums(loss_BS, b.task_ids, 3)
        engine.backward(balanced_loss(sums, counts, grad_scale=world * 2))
        shown += sums.detach().double()
        if i == 0:
            engine.step()  # not a boundary: only advances the micro-step counter
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    return grads, (all_reduce_sum(shown) / counts).tolist()


def test_loss_and_gradients_across_two_ranks_equal_single_process_reference():
    results = run_ranks(_grads_on_ranks, 2)
    # Reference: one process, all four micro-batches, the global formula written out plainly.
    model = _make_model(_cfg())
    batches = _samples(0) + _samples(1)
    sums, counts = torch.zeros(3), torch.zeros(3)
    for b in batches:
        # The reference takes the full-vocabulary logits path, not the trainer's target-only path.
        logits = model.lm(input_ids=b.input_ids_BS, attention_mask=b.attention_mask_BS).logits
        loss_BS = token_losses(logits, b.input_ids_BS, b.loss_mask_BS)
        for row, task in enumerate(b.task_ids.tolist()):
            sums[task] = sums[task] + loss_BS[row].sum()
            counts[task] += b.loss_mask_BS[row, 1:].sum()
    ref_loss = (sums / counts).mean()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for grads, task_losses in results:
        torch.testing.assert_close(
            torch.tensor(task_losses, dtype=torch.float32), (sums / counts).detach(), atol=1e-5, rtol=1e-5
        )
        assert grads.keys() == ref_grads.keys()
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-4, msg=n)
    # The ranks really did see different task mixes.
    assert set(PLAN[0][0][0]) != set(PLAN[1][0][0])
