"""AdaMerging (Yang et al., 2024): learn the merge coefficients by minimising prediction entropy.

The merged FFN weight of layer l is W0 + Σ_e λ_{l,e} ΔW_{l,e} (for each of gate, up and down), with the
coefficients λ either per layer and expert (`layer`) or per expert shared by all layers (`task`, the
paper's task-wise variant, an expert playing the role of a task vector). λ starts at the experts' shares
and takes Adam steps on the mean entropy of the merged model's next-token distributions over held-out
inputs; their labels are never used. Attention LoRA is folded exactly and is not tuned.

Shape legend: E kept experts, O output features, I input features, B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from mtmoe.data.collate import collate
from mtmoe.export.dense import fold_to_dense
from mtmoe.model.experts import PROJECTIONS
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.walk import moe_blocks


def mean_entropy(logits_BSV: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions at the real (unpadded) positions."""
    log_p_BSV = torch.log_softmax(logits_BSV.float(), dim=-1)
    entropy_BS = -(log_p_BSV.exp() * log_p_BSV).sum(-1)
    mask_BS = attention_mask_BS.to(entropy_BS.dtype)
    return (entropy_BS * mask_BS).sum() / mask_BS.sum().clamp_min(1)


def adamerge(
    model: MoELM,
    shards: list,
    pad_id: int,
    shares: dict[int, torch.Tensor],
    kept: dict[int, list[int]] | None = None,
    granularity: str = "layer",
    steps: int = 50,
    lr: float = 0.01,
    max_samples: int = 16,
    batch_size: int = 8,
) -> tuple[torch.nn.Module, dict]:
    """Learns λ and folds `model` (in place) into the dense model W0 + Σ_e λ_{l,e} ΔW_{l,e}.

    Args:
        model: The trained MoE model.
        shards: Held-out shards; the first `max_samples` inputs of each are the unlabelled data.
        pad_id: Padding token.
        shares: Per layer, the starting coefficients (the experts' shares).
        kept: Per layer, the experts merged (None = all).
        granularity: `layer` (λ per layer and expert) or `task` (λ per expert, shared by layers).
        steps: Adam steps (one batch each, cycling).
        lr: Adam's learning rate.
        max_samples: Inputs per task.
        batch_size: Rows per batch.

    Returns:
        (the dense HF model, {"lambda": per-layer λ, "entropy_before"/"entropy_after": mean entropy over
        all the inputs at the starting and the learned λ}).

    Raises:
        ValueError: For an unknown granularity.
    """
    if granularity not in ("layer", "task"):
        raise ValueError(f"--ada-granularity {granularity!r}: expected layer|task")
    blocks = moe_blocks(model.lm)
    keep = {i: (kept[i] if kept else list(range(b.router.num_experts))) for i, b in blocks.items()}
    deltas = {
        (i, p): b.experts.weight_delta(p).detach()[keep[i]] for i, b in blocks.items() for p in PROJECTIONS
    }
    base = {
        (i, p): getattr(b.base, f"{p}_proj").weight.detach().clone()
        for i, b in blocks.items()
        for p in PROJECTIONS
    }
    start = {i: shares[i].float()[keep[i]] for i in blocks}
    if granularity == "task":
        lam = {"all": torch.stack(list(start.values())).mean(0).requires_grad_()}
    else:
        lam = {str(i): s.clone().requires_grad_() for i, s in start.items()}
    lm = fold_to_dense(model, None)  # attention LoRA folded exactly; the FFN weights are overridden below
    lm.eval().requires_grad_(False)
    rows = [(s, k) for s in shards for k in range(min(max_samples, len(s)))]
    batches = [
        collate(
            [s[k] for s, k in rows[j : j + batch_size]],
            [s.task_id for s, _ in rows[j : j + batch_size]],
            pad_id,
        )
        for j in range(0, len(rows), batch_size)
    ]

    def lam_of(i):
        return lam["all"] if granularity == "task" else lam[str(i)]

    def ffn_weights():
        return {
            f"model.layers.{i}.mlp.{p}_proj.weight": base[i, p]
            + torch.einsum("e,eoi->oi", lam_of(i), deltas[i, p])
            for (i, p) in deltas
        }

    def entropy(batch):
        out = functional_call(
            lm, ffn_weights(), (batch.input_ids_BS,), {"attention_mask": batch.attention_mask_BS}
        )
        return mean_entropy(out.logits, batch.attention_mask_BS)

    def mean_over_all():
        with torch.no_grad():
            return sum(float(entropy(b)) for b in batches) / len(batches)

    before = mean_over_all()
    opt = torch.optim.Adam(list(lam.values()), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        entropy(batches[step % len(batches)]).backward()
        opt.step()
    after = mean_over_all()
    with torch.no_grad():
        for (i, p), d_EOI in deltas.items():
            merged_OI = base[i, p].double() + torch.einsum("e,eoi->oi", lam_of(i).double(), d_EOI.double())
            getattr(lm.model.layers[i].mlp, f"{p}_proj").weight.copy_(merged_OI.to(base[i, p].dtype))
    lm.requires_grad_(True)
    record = {
        "granularity": granularity,
        "steps": steps,
        "lr": lr,
        "inputs": len(rows),
        "lambda": {str(i): lam_of(i).detach().tolist() for i in blocks},
        "entropy_before": before,
        "entropy_after": after,
    }
    return lm, record
