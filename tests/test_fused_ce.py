"""The fused, chunked LM-head cross-entropy equals the plain one, in loss and in the hidden-state gradient."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from mtmoe.model.fused_ce import fused_cross_entropy
from mtmoe.model.token_loss import target_losses_and_logits, target_token_losses


def _reference(hidden_ND, weight_VD, targets_N, grad_N):
    h = hidden_ND.detach().clone().requires_grad_(True)
    ce_N = F.cross_entropy((h @ weight_VD.t()).float(), targets_N, reduction="none")
    ce_N.backward(grad_N)
    return ce_N.detach(), h.grad


@pytest.mark.parametrize("rows", [1, 7, 64, None])
def test_fused_cross_entropy_equals_plain_loss_and_gradient(rows):
    torch.manual_seed(0)
    N, D, V = 37, 16, 300
    weight_VD = torch.randn(V, D)
    hidden_ND = torch.randn(N, D, requires_grad=True)
    targets_N = torch.randint(0, V, (N,))
    grad_N = torch.rand(N)  # a weighted loss: each token's gradient is scaled differently
    ce_N = fused_cross_entropy(hidden_ND, weight_VD, targets_N, rows)
    ce_N.backward(grad_N)
    want_ce_N, want_grad_ND = _reference(hidden_ND, weight_VD, targets_N, grad_N)
    torch.testing.assert_close(ce_N, want_ce_N, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden_ND.grad, want_grad_ND, rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_in_bfloat16_is_close_to_fp32():
    torch.manual_seed(1)
    weight_VD, targets_N = torch.randn(200, 32), torch.randint(0, 200, (20,))
    hidden_ND = torch.randn(20, 32)
    h16 = hidden_ND.bfloat16().requires_grad_(True)
    ce_N = fused_cross_entropy(h16, weight_VD.bfloat16(), targets_N, rows=8)
    ce_N.sum().backward()
    want_ce_N, want_grad_ND = _reference(hidden_ND, weight_VD, targets_N, torch.ones(20))
    assert ce_N.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ce_N, want_ce_N, rtol=3e-2, atol=0.3)
    torch.testing.assert_close(h16.grad.float(), want_grad_ND, rtol=5e-2, atol=5e-2)


def test_fused_cross_entropy_refuses_a_trainable_head_and_skips_gradients_without_grad():
    weight_VD = torch.randn(50, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen LM head"):
        fused_cross_entropy(torch.randn(4, 8), weight_VD, torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        ce_N = fused_cross_entropy(torch.randn(4, 8), weight_VD, torch.zeros(4, dtype=torch.long))
    assert ce_N.shape == (4,) and not ce_N.requires_grad


def test_target_token_losses_takes_the_fused_path_and_matches_the_logits_path():
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 120, bias=False).requires_grad_(False)
    ids_BS = torch.randint(0, 120, (3, 10))
    mask_BS = (torch.rand(3, 10) > 0.4).long()
    hidden_BSD = torch.randn(3, 10, 16, requires_grad=True)
    with mock.patch("mtmoe.model.token_loss.fused_cross_entropy", wraps=fused_cross_entropy) as fused:
        fused_BS = target_token_losses(hidden_BSD, head, ids_BS, mask_BS)
    assert fused.call_count == 1
    (g_fused,) = torch.autograd.grad(fused_BS.sum(), hidden_BSD)
    plain_BS, _ = target_losses_and_logits(hidden_BSD, head, ids_BS, mask_BS)
    (g_plain,) = torch.autograd.grad(plain_BS.sum(), hidden_BSD)
    torch.testing.assert_close(fused_BS, plain_BS, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cast_rows", [7, 128, 8192])
def test_a_bf16_head_under_fp32_hidden_states_equals_the_fp32_loss_of_its_rounded_weights(cast_rows):
    """`model.frozen_dtype: bfloat16`: the head is cast slice by slice of the vocabulary, exactly."""
    torch.manual_seed(0)
    N, D, V = 37, 16, 300
    weight_VD = torch.randn(V, D).bfloat16()
    hidden_ND = torch.randn(N, D, requires_grad=True)
    targets_N = torch.randint(0, V, (N,))
    grad_N = torch.rand(N)
    with mock.patch("mtmoe.model.fused_ce.CAST_ROWS", cast_rows):
        ce_N = fused_cross_entropy(hidden_ND, weight_VD, targets_N, 10)
    ce_N.backward(grad_N)
    want_ce_N, want_grad_ND = _reference(hidden_ND, weight_VD.float(), targets_N, grad_N)
    assert ce_N.dtype == hidden_ND.grad.dtype == torch.float32
    torch.testing.assert_close(ce_N, want_ce_N, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_ND.grad, want_grad_ND, rtol=1e-5, atol=1e-6)
