"""Plans a run's memory and traffic per rank from its recipe, without loading or allocating any weights.

How each number is found:
- **Parameters.** The model is built on the meta device exactly as training builds it for rank 0: the
  base from its config, then `inject_moe_lora` with `ExpertPlacement(E, ep_size, ep_rank=0)` (made
  directly, no process group). Under bf16, DeepSpeed casts every parameter to bf16, trainable LoRA
  included, so that is what is counted. MoEfied blocks cannot be built on meta (their balanced k-means
  needs real weights); `MoEfiedShapes` stands in for them with the same tensors.
- **ZeRO.** The optimizer groups are `mtmoe.parallel.engine.param_groups` of the meta model. As in
  DeepSpeed's `stage_1_and_2.py`, a group is flattened, padded to 2·P elements and cut into P partitions,
  where P is the data-parallel world for dense groups and the expert-data-parallel group (world / ep_size)
  for expert groups. Each rank keeps an fp32 master copy of its partitions (a clone, in fp32 too), AdamW's
  two fp32 moments, its gradient partition (ZeRO-2) or every gradient (ZeRO-0/1) in the model dtype,
  and a contiguous reduce bucket of `reduce_bucket_size` elements during backward.
- **Activations** are the tensors autograd saves for backward, per micro-batch of B × S tokens. The frozen
  base (norms, attention, dense FFNs, the LM head's log-softmax) follows formulas read from the HF code.
  Each MoE block is measured: a real block of the same family and options, at a few tiny widths, runs
  a forward under `saved_tensors_hooks`, and the saved bytes are fitted exactly as
  c₀ + c₁T + c₂D + c₃F + c₄TD + c₅TF + c₆DF (`BlockFit`). The fit follows the block code as it
  changes; the expert-parallel path, which needs a process group, uses its own formula
  (`ep_expert_bytes`). `measure` checks the whole plan against a real model (tests/test_plan.py).
- **Traffic** per rank and step: the gradient reduction of the ZeRO stage, and the expert-parallel
  all-to-alls: rows [x, W1x, W3x] out and [h, ΔW2 h] back per assignment (upcycled), [x] out and y back
  (native), each way again in backward, and once more with gradient checkpointing (the recomputed forward).

Shape legend: B micro-batch, S sequence length, T = B·S tokens, D hidden size, F FFN (expert) width,
H heads, Hk key/value heads, h head dim, E experts of a block, L experts on this rank, K experts per
token, R LoRA rank, N = K·(real tokens) assignments a rank routes, M rows its experts receive (N on
average), V vocabulary, X target tokens, b bytes per element of the model dtype.
"""
