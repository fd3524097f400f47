"""Attribution of a profiled training step's time to the parts of the model and to kinds of op.

While profiling, forward hooks and wrappers put a named range (`PREFIX` + part) around each part of the
model. A forward op belongs to its innermost range; a backward op to the part whose forward op made its
autograd node (matched by the profiler's sequence number). Every event's self time goes to (part, phase,
kind); the kind `framework` is everything that is not an aten op (Python, autograd, the profiler), so the
parts add up to the profiled step's wall time.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from mtmoe.model.block import MoELoRAFFN
from mtmoe.model.moe_base import MoEBlock
from mtmoe.model.moe_lm import MoELM
from mtmoe.model.routers import TopKRouter

PREFIX = "mtmoe_part::"
# The parts, in table order, with their README labels.
PARTS = {
    "frozen_linear": "frozen linear layers (attention q/k/v/o, FFN W1/W3/W2)",
    "expert_kernel": "MoE-LoRA expert kernel `_ExpertSwiGLU` (block.py)",
    "lora_ab": "LoRA A/B paths around it (`_local_experts`, block.py)",
    "router": "router (`TopKRouter`, `MoEBlock.route`)",
    "dispatch": "dispatch (`MoEBlock.dispatch_route`, dispatch.py)",
    "ffn_glue": "rest of the FFN block (`MoELoRAFFN.forward`; the floor's SiLU·up)",
    "attention": "attention (rotary, SDPA, reshapes; not q/k/v/o)",
    "norm": "RMSNorms",
    "layer_glue": "decoder layer residual adds",
    "embedding": "embedding",
    "lm_head_loss": "LM head + loss at the targets",
    "grad_accumulate": "gradient accumulation into the trainable tensors",
    "step_glue": "model and step glue (masks, aux loss, loss sum)",
    "autograd_other": "backward ops with no forward part",
}
KINDS = {
    "matmul": "matmuls (mm, addmm, SDPA)",
    "copy_index": "copies, casts and index ops",
    "elementwise": "elementwise and reductions",
    "alloc": "allocation and fills",
    "view": "views and metadata",
    "framework": "Python, autograd and profiler (time between ops)",
}
MATMUL_OPS = {
    "mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm",
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
}  # fmt: skip
COPY_INDEX_OPS = {
    "copy_", "to", "_to_copy", "contiguous", "clone", "index_select", "index_add", "index_add_", "index",
    "index_put", "index_put_", "_index_put_impl_", "gather", "scatter", "scatter_", "scatter_add",
    "scatter_add_", "cat", "stack", "repeat", "repeat_interleave", "embedding", "slice_backward",
    "select_backward", "nonzero", "masked_fill", "masked_fill_", "masked_select", "take", "sort", "argsort",
    "topk", "bincount", "cumsum",
}  # fmt: skip
ALLOC_OPS = {
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "new_zeros", "new_empty",
    "new_empty_strided", "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "fill_", "zero_",
    "arange", "scalar_tensor", "resize_",
}  # fmt: skip
VIEW_OPS = {
    "view", "reshape", "_reshape_alias", "slice", "select", "t", "transpose", "unsqueeze", "squeeze",
    "expand", "expand_as", "as_strided", "_unsafe_view", "permute", "detach", "detach_", "alias", "split",
    "split_with_sizes", "chunk", "unbind", "narrow", "flatten", "view_as", "resolve_conj", "resolve_neg",
    "result_type", "lift_fresh", "item", "_local_scalar_dense", "is_nonzero", "numpy_T", "unflatten",
}  # fmt: skip
BACKWARD_EVAL = "autograd::engine::evaluate_function: "
# Methods and functions run inside a range of their part: (class, method, part), (module, function, part).
METHODS = (
    (MoELoRAFFN, "_local_experts", "lora_ab"),
    (MoEBlock, "route", "router"),
    (MoEBlock, "dispatch_route", "dispatch"),
)
FUNCTIONS = (
    ("mtmoe.model.dispatch", "dispatch", "dispatch"),
    ("mtmoe.model.token_loss", "target_token_losses", "lm_head_loss"),
    ("mtmoe.model.token_loss", "target_losses_and_logits", "lm_head_loss"),
    ("mtmoe.model.token_loss", "token_losses", "lm_head_loss"),
    ("mtmoe.model.fused_ce", "fused_cross_entropy", "lm_head_loss"),
)
NAMED_RANGES = {"_ExpertSwiGLU": "expert_kernel", "_FusedLinearCrossEntropy": "lm_head_loss"}


def op_kind(name: str) -> str:
    """The kind of a profiler event: an aten op's family, or `framework` for anything else."""
    if not name.startswith("aten::"):
        return "framework"
    op = name[len("aten::") :]
    for kind, ops in (("matmul", MATMUL_OPS), ("copy_index", COPY_INDEX_OPS), ("alloc", ALLOC_OPS)):
        if op in ops:
            return kind
    return "view" if op in VIEW_OPS else "elementwise"


def module_part(name: str, module: nn.Module) -> str | None:
    """The part a module's forward belongs to (None: no range of its own)."""
    cls = type(module).__name__
    if isinstance(module, MoELM):
        return "step_glue"
    if isinstance(module, MoELoRAFFN) or cls.endswith("MLP"):
        return "ffn_glue"
    if isinstance(module, TopKRouter):
        return "router"
    if isinstance(module, nn.Linear):
        return "lm_head_loss" if name.endswith("lm_head") else "frozen_linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if cls.endswith("RMSNorm"):
        return "norm"
    if cls.endswith("Attention") or cls.endswith("RotaryEmbedding"):
        return "attention"
    if cls.endswith("DecoderLayer"):
        return "layer_glue"
    if cls.endswith("Model"):
        return "step_glue"
    return None


def _ranged(part: str, fn: Callable) -> Callable:
    """`fn` inside a profiler range named after `part`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + part):
            return fn(*args, **kwargs)

    return wrapper


def _hook_module(module: nn.Module, part: str) -> list[Any]:
    """Forward pre/post hooks that open and close a range named after `part` around the module's forward."""
    open_ranges: list[record_function] = []

    def enter(*_: Any) -> None:
        open_ranges.append(record_function(PREFIX + part).__enter__())

    def leave(*_: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


@contextlib.contextmanager
def labelled(moe: MoELM) -> Iterator[None]:
    """Names the model's parts with profiler ranges while inside (see the module docstring)."""
    handles = []
    for name, module in moe.named_modules():  # the blocks' frozen FFNs too, which the floor swaps in
        part = module_part(name, module)
        if part is not None:
            handles += _hook_module(module, part)
    patched_methods = []
    for cls, method, part in METHODS:
        original = cls.__dict__.get(method)
        if original is not None:
            patched_methods.append((cls, method, original))
            setattr(cls, method, _ranged(part, original))
    patched_functions = _patch_functions()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for cls, method, original in patched_methods:
            setattr(cls, method, original)
        for namespace, key, original in patched_functions:
            namespace[key] = original


def _patch_functions() -> list[tuple[dict, str, Any]]:
    """Wraps the loss and dispatch functions in ranges wherever a loaded mtmoe/benchmark module names them."""
    targets: dict[int, tuple[Callable, str]] = {}
    for module_name, fn_name, part in FUNCTIONS:
        fn = getattr(sys.modules.get(module_name), fn_name, None)
        if fn is not None:
            targets[id(fn)] = (fn, part)
    patched = []
    names = [n for n in sys.modules if n.startswith("mtmoe") or n == "benchmarks.step.common"]
    for module_name in names:
        namespace = vars(sys.modules[module_name])
        for key, value in list(namespace.items()):
            if id(value) in targets:
                patched.append((namespace, key, value))
                namespace[key] = _ranged(targets[id(value)][1], value)
    return patched


def _ancestors(event: Any) -> Iterator[Any]:
    """The event itself, then its parents outward."""
    while event is not None:
        yield event
        event = event.cpu_parent


def _range_part(name: str) -> str | None:
    """The part a range event names (one of ours, or a custom autograd Function's), else None."""
    if name.startswith(PREFIX):
        return name[len(PREFIX) :]
    return NAMED_RANGES.get(name)


def forward_parts(events: list[Any]) -> dict[int, str]:
    """Sequence number -> the part of the forward op that created the autograd node with that number.

    An op records the autograd sequence number current when it starts; the node numbered s is made by the
    last forward op that started with s.
    """
    out: dict[int, tuple[float, str]] = {}
    for e in events:
        if e.sequence_nr < 0 or backward_root(e) is not None:
            continue
        part = next((p for a in _ancestors(e) if (p := _range_part(a.name))), "step_glue")
        start = e.time_range.start
        if e.sequence_nr not in out or start >= out[e.sequence_nr][0]:
            out[e.sequence_nr] = (start, part)
    return {s: part for s, (_, part) in out.items()}


def backward_root(event: Any) -> Any | None:
    """The `evaluate_function` event an event runs under (None in the forward)."""
    return next((a for a in _ancestors(event) if a.name.startswith(BACKWARD_EVAL)), None)


def event_part(event: Any, fwd_parts: Mapping[int, str]) -> tuple[str, str]:
    """(part, phase) of one event."""
    root = backward_root(event)
    if root is None:
        return next((p for a in _ancestors(event) if (p := _range_part(a.name))), "step_glue"), "fwd"
    node = root.name[len(BACKWARD_EVAL) :]
    if "AccumulateGrad" in node:
        return "grad_accumulate", "bwd"
    if root.sequence_nr in fwd_parts:
        return fwd_parts[root.sequence_nr], "bwd"
    return NAMED_RANGES.get(node.removesuffix("Backward"), "autograd_other"), "bwd"


def attribute(events: list[Any]) -> dict[str, Any]:
    """One profiled step's self time (ms) by part, phase and kind, its op counts and its top ops.

    The top ops are the op calls made from Python or autograd (not from inside another op), grouped by
    name, input shapes and part, with their inclusive time.
    """
    in_step = [e for e in events if any(a.name == "profiled_step" for a in _ancestors(e))]
    fwd_parts = forward_parts(in_step)
    ms: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    calls: Counter[str] = Counter()
    by_op: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in in_step:
        part, phase = event_part(e, fwd_parts)
        kind = op_kind(e.name)
        ms[part][phase][kind] += e.self_cpu_time_total / 1e3
        if kind != "framework" and (e.cpu_parent is None or op_kind(e.cpu_parent.name) == "framework"):
            calls[part] += 1  # ops called from Python or autograd, not from inside another op
            cell = by_op[(e.name, str(e.input_shapes), part)]
            cell[0] += e.cpu_time_total / 1e3
            cell[1] += 1
    top = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:30]
    (wall,) = [e.cpu_time_total / 1e3 for e in in_step if e.name == "profiled_step"]
    return {
        "profiled_wall_ms": wall,
        "ms": {p: {ph: dict(k) for ph, k in v.items()} for p, v in ms.items()},
        "op_calls_per_step": dict(calls),
        "top_ops": [
            {"op": name, "shapes": shapes, "part": part, "inclusive_ms": t, "calls": n}
            for (name, shapes, part), (t, n) in top
        ],
    }


def profile_step(moe: MoELM, step: Callable[[], object]) -> dict[str, Any]:
    """Profiles one call of `step` with the parts labelled; returns `attribute`'s record."""
    with labelled(moe), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("profiled_step"):
            step()
    return attribute(list(prof.events()))
