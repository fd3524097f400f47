"""Sequence packing: the rows it builds, and that a packed micro-batch trains exactly like the unpacked one
(samples never attend to each other), down to a whole training run."""

import numpy as np
import pytest
import torch
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from training_runs import final, losses, records, train_run

from mtmoe.balance.task_loss import task_loss_sums, task_token_counts
from mtmoe.config import load_config
from mtmoe.data.collate import collate, first_fit_decreasing, pack
from mtmoe.model.moe_lm import build_model

TASKS = ["codegen", "docstring", "translate"]
VOCAB = 100


def _samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = np.zeros(n, dtype=np.int64)
        mask[n // 2 :] = 1  # the answer half carries the loss
        out.append((rng.integers(3, VOCAB, n), mask))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=20), st.integers(1, 60))
def test_first_fit_decreasing_places_every_sample_once_within_capacity(lengths, capacity):
    capacity = max(capacity, max(lengths))
    bins = first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # First fit never leaves two bins that could have been one.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_pack_keeps_each_sample_with_its_positions_task_and_loss_mask():
    samples = _samples([5, 3, 7, 2])
    batch = pack(samples, [0, 1, 2, 1], pad_id=0, row_length=10)
    assert batch.packed and batch.input_ids_BS.shape == (2, 16)  # 7+3 and 5+2, padded to a multiple of 8
    seen = 0
    for b in range(2):
        pos = batch.position_ids_BS[b]
        starts = [s for s in range(16) if pos[s] == 0 and batch.attention_mask_BS[b, s]]
        for s in starts:
            n = next(k for k in range(1, 17 - s) if s + k == 16 or pos[s + k] == 0)
            i = next(i for i, (ids, _) in enumerate(samples) if len(ids) == n)
            ids, mask = samples[i]
            assert batch.input_ids_BS[b, s : s + n].tolist() == ids.tolist()
            assert batch.position_ids_BS[b, s : s + n].tolist() == list(range(n))
            assert (batch.task_ids[b, s : s + n] == [0, 1, 2, 1][i]).all()
            assert batch.loss_mask_BS[b, s].item() == 0  # the previous token is another sample's
            assert batch.loss_mask_BS[b, s + 1 : s + n].tolist() == mask[1:].tolist()
            seen += 1
    assert seen == 4 and batch.num_tokens() == 17


def test_packed_task_counts_and_loss_sums_equal_unpacked():
    samples, tasks = _samples([9, 4, 6, 3, 12], seed=1), [2, 0, 1, 0, 2]
    flat, packed = collate(samples, tasks, 0), pack(samples, tasks, 0)
    assert len(packed.input_ids_BS) < len(flat.input_ids_BS)
    assert torch.equal(task_token_counts(flat.loss_mask_BS, flat.task_ids, 3),
                       task_token_counts(packed.loss_mask_BS, packed.task_ids, 3))  # fmt: skip
    ones_flat, ones_packed = (b.loss_mask_BS.float() for b in (flat, packed))
    ones_flat[:, 0], ones_packed[packed.position_ids_BS == 0] = 0, 0
    assert torch.equal(
        task_loss_sums(ones_flat, flat.task_ids, 3), task_loss_sums(ones_packed, packed.task_ids, 3)
    )


def _model(base):
    cfg = load_config(ROOT / "launch" / "recipes" / "tiny.yaml", [f"model.base={base}"])
    if base != "tiny-llama":
        cfg = load_config(ROOT / "launch" / "recipes" / "native_tiny.yaml", [f"model.base={base}"])
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, len(TASKS), None, TASKS)
    with torch.no_grad():  # LoRA B starts at zero; make the experts matter
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("_b"):
                p.normal_(0, 0.05)
    return model


def _objective(model, batch):
    model.zero_grad()
    loss_BS, aux = model(batch.input_ids_BS, batch.attention_mask_BS, batch.loss_mask_BS, batch.task_ids,
                         position_ids_BS=batch.position_ids_BS)  # fmt: skip
    sums_X = task_loss_sums(loss_BS, batch.task_ids, len(TASKS))
    (sums_X.sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums_X.detach(), aux.detach(), grads


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-mixtral"])
def test_packed_forward_and_backward_equal_unpacked(base):
    model = _model(base)
    samples, tasks = _samples([9, 4, 6, 3, 12, 5], seed=2), [2, 0, 1, 0, 2, 1]
    sums_flat, aux_flat, grads_flat = _objective(model, collate(samples, tasks, 0))
    packed = pack(samples, tasks, 0)
    assert len(packed.input_ids_BS) == 4  # 12 | 9+3 | 6+5 | 4
    sums_packed, aux_packed, grads_packed = _objective(model, packed)
    torch.testing.assert_close(sums_packed, sums_flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_packed, aux_flat, rtol=1e-5, atol=1e-6)
    assert grads_flat.keys() == grads_packed.keys() and len(grads_flat) > 0
    for name in grads_flat:
        torch.testing.assert_close(grads_packed[name], grads_flat[name], rtol=1e-4, atol=1e-6, msg=name)

    # The same rows with one causal mask over the whole row (no sample boundaries) differ: the test
    # above would catch samples attending to each other.
    leaky = pack(samples, tasks, 0)
    leaky.position_ids_BS = None
    sums_leaky, _, _ = _objective(model, leaky)
    assert not torch.allclose(sums_leaky, sums_flat, rtol=1e-3)


def test_packed_training_run_equals_unpacked(demo_data, tmp_path):
    one_micro_batch = ["train.micro_batch_size=8", "train.grad_accum=1"]  # 8 samples to pack per step
    flat = train_run(demo_data, tmp_path / "flat", 1, 1, *one_micro_batch, steps=3, save_every=0)
    packed = train_run(
        demo_data, tmp_path / "packed", 1, 1, *one_micro_batch, "data.packing=true", steps=3, save_every=0
    )
    a, b = losses(flat), losses(packed)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (a, b)
    wa, wb = final(flat, step=3), final(packed, step=3)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5, msg=k)
    pad = {r["step"]: r["pad_frac"] for r in records(packed) if "pad_frac" in r}
    pad_flat = {r["step"]: r["pad_frac"] for r in records(flat) if "pad_frac" in r}
    assert all(pad[s] <= pad_flat[s] for s in pad) and sum(pad.values()) < sum(pad_flat.values())


def test_packing_with_quality_retaining_is_refused():
    with pytest.raises(ValueError, match="data.packing"):
        load_config(
            ROOT / "launch" / "recipes" / "tiny.yaml", ["data.packing=true", "balance.quality_retain=true"]
        )
