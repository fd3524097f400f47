"""`model.frozen_dtype: bfloat16`: the frozen base stored in bf16 under fp32 compute.

It must compute exactly what an fp32 model whose base weights were rounded to bf16 computes (bf16 -> fp32
is exact), keep tied weights tied, load from a real safetensors folder tensor by tensor into the same
weights `from_pretrained` gives, name the file and key of a tensor it cannot place, train under the real
DeepSpeed engine (expert-parallel exactly as replicated), and hand the export a full-precision base.
"""

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from torch import nn
from training_runs import final, losses, train_run

from mtmoe.config import load_config
from mtmoe.export.run import load_trained_model
from mtmoe.model.base import load_base_model, tiny_llama
from mtmoe.model.frozen_store import StoredEmbedding, StoredLinear, store_frozen_
from mtmoe.model.moe_lm import build_model
from mtmoe.model.sharded_load import load_streamed

TINY = ROOT / "launch" / "recipes" / "tiny.yaml"
TASKS = ["codegen", "docstring", "translate"]


def _frozen_weights(lm):
    """The frozen Linear and Embedding weights, once each (a tied weight counts once)."""
    seen, out = set(), []
    for m in lm.modules():
        frozen = isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.requires_grad
        if frozen and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


def _tiny_model(frozen_dtype, ckpt):
    cfg = load_config(
        TINY, [f"model.frozen_dtype={frozen_dtype}", f"model.gradient_checkpointing={str(ckpt).lower()}"]
    )
    model = build_model(cfg, 100, len(TASKS), None, TASKS).train()
    for name, p in model.named_parameters():  # make the LoRA experts differ from the base
        if p.requires_grad and name.endswith("_b"):
            nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def _step(model):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding
    loss_BS, aux, logits_NV = model(ids, mask, mask, torch.tensor([0, 2]), return_logits=True)
    fused_BS, _ = model(ids, mask, mask, torch.tensor([0, 2]))
    (fused_BS.sum() + aux).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss_BS.detach(), fused_BS.detach(), logits_NV.detach(), grads


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "grad_ckpt"])
def test_bf16_stored_base_computes_what_fp32_with_a_rounded_base_computes(ckpt):
    reference = _tiny_model("float32", ckpt)
    with torch.no_grad():
        for w in _frozen_weights(reference.lm):
            w.copy_(w.bfloat16().float())
    stored = _tiny_model("bfloat16", ckpt)

    frozen = _frozen_weights(stored.lm)
    assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    lm = stored.lm
    assert lm.get_input_embeddings().weight is lm.get_output_embeddings().weight  # still tied, one copy
    assert isinstance(lm.get_input_embeddings(), StoredEmbedding)
    assert sum(isinstance(m, StoredLinear) for m in lm.modules()) > 0
    ref_bytes = sum(w.numel() * 4 for w in _frozen_weights(reference.lm))
    assert sum(w.numel() * w.element_size() for w in frozen) * 2 == ref_bytes

    ref, got = _step(reference), _step(stored)
    for a, b in zip(got[:3], ref[:3], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(got[3]) == set(ref[3]) and got[3]
    for n in ref[3]:
        torch.testing.assert_close(got[3][n], ref[3][n], rtol=1e-4, atol=1e-6)


def test_store_frozen_leaves_trainable_modules_and_same_dtype_alone():
    lm = tiny_llama(100)
    lm.lm_head.weight.requires_grad_(False)
    lm.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    for p in lm.parameters():
        if p is not lm.model.layers[0].mlp.up_proj.weight:
            p.requires_grad_(False)
    assert store_frozen_(lm, torch.float32, torch.float32) == 0
    stored = store_frozen_(lm, torch.bfloat16, torch.float32)
    assert lm.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert type(lm.model.layers[0].mlp.up_proj) is nn.Linear
    assert lm.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert lm.model.norm.weight.dtype == torch.float32
    expected = sum(w.numel() for w in _frozen_weights(lm))
    assert stored == expected


def _save_tiny(folder):
    model = tiny_llama(100, seed=3)
    model.save_pretrained(folder)
    return folder


def test_streamed_load_gives_from_pretrained_weights_rounded_once(tmp_path):
    folder = _save_tiny(tmp_path / "tiny")
    full = load_base_model(folder)
    streamed = load_streamed(folder, torch.float32, torch.bfloat16)
    assert streamed.get_input_embeddings().weight is streamed.get_output_embeddings().weight
    narrow = {f"{n}.weight" for n, m in full.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    params = dict(streamed.named_parameters())
    for name, p in full.named_parameters():
        want = p.detach().bfloat16() if name in narrow else p.detach()
        assert params[name].dtype == want.dtype, name
        assert torch.equal(params[name].detach(), want), name
    for (name, b), (_, a) in zip(streamed.named_buffers(), full.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # the rotary frequencies are computed, not left empty
    assert not streamed.training
    streamed.requires_grad_(False)
    store_frozen_(streamed, torch.bfloat16, torch.float32)
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name in narrow:
                p.copy_(p.bfloat16().float())
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(streamed(input_ids=ids).logits, full(input_ids=ids).logits)


def test_streamed_load_names_the_file_and_key_of_a_stray_missing_misshapen_or_cut_tensor(tmp_path):
    folder = _save_tiny(tmp_path / "tiny")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    good = dict(state)
    save_file({**state, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.extra\.weight"):
        load_streamed(folder, torch.float32, torch.bfloat16)
    del state["model.norm.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"do not provide.*model\.norm\.weight"):
        load_streamed(folder, torch.float32, torch.bfloat16)
    save_file({**state, "model.norm.weight": torch.zeros(3)}, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.norm\.weight.*shape \(3,\)"):
        load_streamed(folder, torch.float32, torch.bfloat16)
    save_file(good, weights)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: the file ends inside tensor"):
        load_streamed(folder, torch.float32, torch.bfloat16)


@pytest.mark.parametrize(
    "overrides",
    [["model.frozen_dtype=float16"], ["model.frozen_dtype=bfloat16", "moe.family=moefied"]],
    ids=["unknown dtype", "moefied"],
)
def test_bad_frozen_dtype_names_the_key(overrides):
    with pytest.raises(ValueError, match=r"model\.frozen_dtype"):
        load_config(TINY, overrides)


def test_bf16_stored_base_trains_with_ep2_as_replicated_and_reloads_in_full(demo_data, tmp_path):
    """Two gloo ranks on the DeepSpeed engine: expert parallelism equals replication, and the run's reload
    for export has an fp32 base and the trained tensors."""
    extra = ["model.frozen_dtype=bfloat16", "moe.capacity_factor=1.5"]
    rep = train_run(demo_data, tmp_path / "rep", 2, 1, *extra, steps=3, save_every=3)
    ep2 = train_run(demo_data, tmp_path / "ep2", 2, 2, *extra, steps=3, save_every=3)
    a, b = losses(rep), losses(ep2)
    assert len(a) == 3 and all(b[s] == pytest.approx(a[s], rel=1e-6) for s in a), (a, b)
    wa, wb = final(rep, step=3), final(ep2, step=3)
    assert set(wa) == set(wb) and wa
    for k in wa:  # the tolerance of test_ep_training: the CPU fused path against EP's grouped one, via AdamW
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    cfg, model, _ = load_trained_model(ep2)
    assert cfg.model.frozen_dtype == "bfloat16"  # the run's config, unchanged
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(isinstance(m, (StoredLinear, StoredEmbedding)) for m in model.modules())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n].detach(), t) for n, t in wb.items())


def test_a_cast_workspace_reuses_one_buffer_and_belongs_to_its_model():
    from mtmoe.model.frozen_store import CastWorkspace

    workspace = CastWorkspace()
    big, small = torch.randn(6, 5).bfloat16(), torch.randn(2, 3).bfloat16()
    a = workspace.widened(big, torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, big.float())
    ptr = a.data_ptr()
    b = workspace.widened(small, torch.float32)  # fits in the same buffer: no new allocation
    assert b.data_ptr() == ptr and b.shape == (2, 3) and torch.equal(b, small.float())
    assert CastWorkspace().widened(small, torch.float32).data_ptr() != ptr  # another model's: its own
    lm = tiny_llama(vocab_size=64).requires_grad_(False)
    store_frozen_(lm, torch.bfloat16, torch.float32)
    stored = [m for m in lm.modules() if isinstance(m, StoredLinear)]
    assert stored and all(m.workspace is stored[0].workspace for m in stored)  # one per model
