"""Streamed export of a big model: the base's weight files, one tensor at a time, plus the trained deltas.

`mtmoe-export --stream` never holds the base in memory. The trained model is rebuilt around an empty
base (on the meta device): only the LoRA experts, the routers and the attention LoRA hold numbers, the
checkpoint's trainable tensors. From them come the deltas of the weights the training changed, by the
same merge as the in-memory export (`ffn_delta`, as `merged_deltas` uses it), each computed only when
its tensor comes (a dense delta is as big as its weight). Then each weight file of the base folder is
copied tensor by tensor: a changed weight is read, added its delta in fp32, and cast back to the
file's dtype; every other tensor is copied as it is. The export keeps the base's shards, index and
dtype (a bf16 checkpoint in 5 GB shards stays one).

Host memory is the adapters plus one tensor and its delta (a merge of a layer's experts, or a native
fused tensor, works on that layer's expert deltas at once). No accelerator or training cluster is
needed: mtmoe's checkpoints hold only the trainable tensors, whatever ZeRO stage or expert
parallelism wrote them (`mtmoe.train.checkpoint`), so the export of a ZeRO-3 run never gathers the
partitioned base.

Families: upcycled (every weighting, pruning and merge method but AdaMerging), native (each expert's
LoRA folded into that expert, in the file's layout, per-expert or fused; no pruning) and lora (PEFT's
delta). Not moefied: its blocks hold the FFN re-sliced by k-means, so its export needs the FFN itself.
Nothing is scored: scoring runs the model (use `mtmoe-export` without `--stream` on a model that fits).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mtmoe.export.dense import ffn_delta
from mtmoe.export.methods import MergeSpec
from mtmoe.model.base import safetensors_files
from mtmoe.model.experts import PROJECTIONS
from mtmoe.model.native import NativeMoELoRA
from mtmoe.model.sharded_load import ReadStats, StoredTensor, stored_tensors
from mtmoe.model.walk import decoder_layers, lora_linears, moe_blocks

# A file tensor's edit: its stored value (in fp32) -> its exported value.
Edit = Callable[[torch.Tensor], torch.Tensor]
# Each requirement: alternatives (sets of tensor names), one of which the files must hold in full.
Required = list[list[set[str]]]
_PER_EXPERT_LAYOUTS = (
    ("block_sparse_moe", ("w1", "w3", "w2")),
    ("mlp", ("gate_proj", "up_proj", "down_proj")),
)
_PROJ = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


@dataclass
class StreamStats:
    """What a streamed export read and wrote.

    Attributes:
        files: Weight files written (the base's own sharding).
        tensors: Tensors copied in all.
        edited: Tensors that got a delta (or, for a trained router, their trained value).
        bytes: Tensor bytes read (and written).
        largest_tensor_bytes: The largest tensor held at once: the export's memory beside the adapters.
    """

    files: int = 0
    tensors: int = 0
    edited: int = 0
    bytes: int = 0
    largest_tensor_bytes: int = 0

    def record(self) -> dict[str, int]:
        """The stats as JSON-ready numbers."""
        return dict(self.__dict__)


def _added(delta: Callable[[], torch.Tensor]) -> Edit:
    """The edit that adds `delta()`, computed only when its tensor is streamed (deltas are dense)."""
    return lambda w: w + delta().to(torch.float32)


def _native_edits(lm: nn.Module) -> tuple[dict[str, Edit], Required]:
    """Per file tensor name, the edits of the native MoE blocks, in every checkpoint layout.

    Returns:
        (edits, required): per block, the layouts its experts may be stored in (one must be whole).
    """
    layers = decoder_layers(lm)
    edits: dict[str, Edit] = {}
    required: Required = []
    for i, layer in enumerate(layers):
        block = layer.mlp
        if not isinstance(block, NativeMoELoRA):
            continue
        ex = block.experts
        router_ED = block.router.weight_ED
        layouts = []
        for kind, names in _PER_EXPERT_LAYOUTS:
            prefix = f"model.layers.{i}.{kind}"
            layout = {}
            for e in range(block.num_experts):
                for n in names:
                    layout[f"{prefix}.experts.{e}.{n}.weight"] = _added(
                        lambda ex=ex, p=_PROJ[n], e=e: ex.weight_delta(p, e)
                    )
            edits.update(layout)
            layouts.append(set(layout))
            if not router_ED.is_meta:  # the run's router (trained, or the base's own copied in)
                edits[f"{prefix}.gate.weight"] = lambda w, r=router_ED: r.detach().float().reshape(w.shape)
        fused = {f"model.layers.{i}.mlp.experts.gate_up_proj", f"model.layers.{i}.mlp.experts.down_proj"}
        edits[f"model.layers.{i}.mlp.experts.gate_up_proj"] = _added(
            lambda ex=ex: torch.cat([ex.weight_delta("gate"), ex.weight_delta("up")], 1)
        )
        edits[f"model.layers.{i}.mlp.experts.down_proj"] = _added(lambda ex=ex: ex.weight_delta("down"))
        required.append([*layouts, fused])
    return edits, required


def _peft_deltas(lm: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """PEFT's own delta of every LoRA-wrapped linear (`moe.family: lora`), by its module name."""
    from peft.tuners.lora import LoraLayer

    return {
        name: lambda layer=layer: sum(layer.get_delta_weight(a) for a in layer.active_adapters)
        for name, layer in lm.named_modules()
        if isinstance(layer, LoraLayer)
    }


def file_edits(
    model: nn.Module,
    family: str,
    shares: dict[int, torch.Tensor] | None,
    kept: dict[int, list[int]] | None,
    spec: MergeSpec,
) -> tuple[dict[str, Edit], Required]:
    """Every edit of the base's file tensors, by tensor name, and the names that must be found.

    Args:
        model: The trained `MoELM` (its base may be empty).
        family: The run's `moe.family`.
        shares: Per layer, each expert's merge weight (`merged_deltas`).
        kept: Per layer, the experts kept (None = all).
        spec: The merge method.

    Returns:
        (edits, required): an edit per name the files may hold (a native block's edits cover both
        layouts), and what the files must hold, else the export would miss a trained delta.
    """
    lm = model.lm
    deltas: dict[str, Callable[[], torch.Tensor]] = {
        name: lora.weight_delta for name, lora in lora_linears(lm).items()
    }
    if family == "upcycled":
        for i, block in moe_blocks(lm).items():
            for proj in PROJECTIONS:
                deltas[f"model.layers.{i}.mlp.{proj}_proj"] = lambda b=block, i=i, p=proj: ffn_delta(
                    b, i, p, shares, kept, spec
                )
    elif family == "lora":
        deltas.update(_peft_deltas(lm))
    edits = {f"{name}.weight": _added(d) for name, d in deltas.items()}
    required: Required = [[{name}] for name in edits]
    if family == "native":
        native, layouts = _native_edits(lm)
        edits.update(native)
        required += layouts
    return edits, required


def _write_file(
    src: Path,
    stored: list[StoredTensor],
    dst: Path,
    edits: dict[str, Edit],
    stats: StreamStats,
    seen: set[str],
) -> None:
    """Copies one safetensors file tensor by tensor, applying `edits`; dtypes, shapes and header stay."""
    reads = ReadStats()
    with src.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_len)
    with dst.open("wb") as out:
        out.write(struct.pack("<Q", header_len))
        out.write(header)
        for name, t in sorted(stored, key=lambda nt: nt[1].offset):
            tensor = t.read(reads)
            size = tensor.numel() * tensor.element_size()
            stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, size)
            if name in edits:
                edited = edits[name](tensor.float())
                if tuple(edited.shape) != tuple(tensor.shape):
                    raise ValueError(f"{src}: tensor {name!r} has shape {tuple(tensor.shape)}, its delta "
                                     f"{tuple(edited.shape)}")  # fmt: skip
                tensor = edited.to(tensor.dtype)
                stats.edited += 1
                seen.add(name)
            out.seek(t.offset)
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            stats.tensors += 1
            stats.bytes += size
    stats.files += 1


def stream_dense(base: Path, out: Path, edits: dict[str, Edit], required: Required) -> StreamStats:
    """Writes the base folder's weights with `edits` applied into `out`, one tensor at a time.

    The index (`model.safetensors.index.json`), `config.json` and `generation_config.json` are copied.

    Raises:
        ValueError: Naming the tensors some delta was computed for but no file of `base` holds.
    """
    out.mkdir(parents=True, exist_ok=True)
    stats, seen = StreamStats(), set()
    by_file: dict[Path, list] = {path: [] for path in safetensors_files(base)}
    for name, t in stored_tensors(base).items():
        by_file[t.path].append((name, t))
    for path, stored in by_file.items():
        _write_file(path, stored, out / path.name, edits, stats, seen)
    missing = [min(alts, key=len) for alts in required if not any(names <= seen for names in alts)]
    if missing:
        example = sorted(missing[0])[:3]
        raise ValueError(f"{base}: the weight files lack {example}, which the training changed")
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        if (base / name).exists():
            shutil.copyfile(base / name, out / name)
    return stats


def write_record(out: Path, options: dict, stats: StreamStats) -> None:
    """`mtmoe_export.json`: the options and what the stream read and wrote."""
    (out / "mtmoe_export.json").write_text(json.dumps({**options, "stream": stats.record()}, indent=1))
