"""Loading a checkpoint tensor by tensor from its safetensors files, each rank reading what it keeps.

`load_streamed` fills a dense model one tensor at a time (the frozen Linear and Embedding weights in
their own dtype, never the whole model in two dtypes at once), and under ZeRO-3 reads only each rank's
part of each tensor.

Native MoE checkpoints with only this rank's experts:

Under expert parallelism a rank keeps 1/ep of every MoE block's experts. `load_local_experts` builds the
model with empty weights and fills it from the checkpoint's safetensors files (one file or the shards of
`model.safetensors.index.json`) tensor by tensor: every tensor that is not an expert's is read whole, an
expert's only when the rank keeps that expert. Host memory stays at about the rank's share plus one
tensor, and the bytes read are counted (`ReadStats`).

Two checkpoint layouts are read:
- per expert, as HF hubs hold Mixtral (`block_sparse_moe.experts.{e}.w1/w3/w2.weight`) and Qwen-MoE
  (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`), and as transformers saves them;
- fused, `mlp.experts.gate_up_proj` (E, 2F, D) and `mlp.experts.down_proj` (E, D, F), of which only the
  rank's rows are read (they are contiguous in the file).
Both become the model's fused parameters, holding the rank's experts only: gate_up[e] = [w1; w3] (gate
rows first, as transformers' own conversion concatenates them), down[e] = w2. The experts module is
marked with `local_experts`, so that `NativeMoELoRA` takes its rows as they are.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mtmoe.model.base import empty_model, safetensors_files
from mtmoe.model.zero3 import partitioned_from

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
PER_EXPERT = re.compile(
    r"^(?P<layer>.*)\.(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
FUSED = re.compile(r"^(?P<layer>.*)\.mlp\.experts\.(?P<name>gate_up_proj|down_proj)$")
GATE_HALF = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}


@dataclass
class ReadStats:
    """What a load read from disk.

    Attributes:
        bytes_read: Tensor bytes read (headers not counted).
        tensors_read: Tensors (or row ranges of one) read.
        tensors_skipped: Tensors never read: other ranks' experts.
    """

    bytes_read: int = 0
    tensors_read: int = 0
    tensors_skipped: int = 0


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    def read(self, stats: ReadStats, rows: slice | None = None) -> torch.Tensor:
        """Reads the tensor, or only `rows` of its first dimension, from disk (not memory-mapped).

        Raises:
            ValueError: Naming the file and tensor, if the file ends before the tensor does.
        """
        shape = list(self.shape)
        row = int(torch.Size(shape[1:]).numel()) if shape else 1
        rows = rows if rows is not None else slice(0, shape[0] if shape else 1)
        if shape:
            shape[0] = rows.stop - rows.start
        return self.read_elements(stats, rows.start * row, rows.stop * row).view(shape)

    def read_elements(self, stats: ReadStats, start: int, stop: int) -> torch.Tensor:
        """Reads elements [start, stop) of the flattened tensor (flat), from disk.

        Raises:
            ValueError: Naming the file and tensor, if the file ends before the range does.
        """
        buf = bytearray((stop - start) * self.dtype.itemsize)
        with self.path.open("rb") as f:
            f.seek(self.offset + start * self.dtype.itemsize)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{self.path}: the file ends inside tensor {self.name!r}")
        stats.bytes_read += len(buf)
        stats.tensors_read += 1
        return torch.frombuffer(buf, dtype=self.dtype) if buf else torch.empty(0, dtype=self.dtype)


def stored_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of an HF folder's safetensors files, by name, from their headers alone.

    Raises:
        ValueError: Naming the file and tensor, for a dtype this reader does not handle.
    """
    out = {}
    for path in safetensors_files(folder):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, expected F32/BF16/F16")
            begin = 8 + header_len + meta["data_offsets"][0]
            out[name] = StoredTensor(path, name, _DTYPES[meta["dtype"]], tuple(meta["shape"]), begin)
    return out


def load_local_experts(
    folder: Path,
    dtype: torch.dtype,
    local: slice,
    stats: ReadStats | None = None,
    partition: Callable[[list[nn.Parameter]], None] | None = None,
) -> PreTrainedModel:
    """A native MoE causal LM with every tensor loaded but only experts `local` of each MoE block.

    Args:
        folder: An HF folder of a Mixtral or Qwen-MoE checkpoint.
        dtype: The model's dtype.
        local: The experts this rank keeps (`ExpertPlacement.local`).
        stats: Filled with what was read.
        partition: Under ZeRO-3 (`mtmoe.model.zero3.partitioner`): every tensor but the experts' is
            partitioned as soon as it is read. The experts stay whole: expert parallelism shards them,
            and injection reads them.

    Raises:
        ValueError: Naming the file and tensor the model has no place for, a shape that differs, or the
            parameters no file provides.
    """
    stats = stats if stats is not None else ReadStats()
    model = empty_model(folder, dtype)
    params = dict(model.named_parameters())
    fused: dict[str, torch.Tensor] = {}  # the local rows of every experts module's fused tensors
    for name, stored in sorted(stored_tensors(folder).items(), key=lambda kv: (kv[1].path, kv[1].offset)):
        where = f"{stored.path}: tensor {name!r}"
        if m := PER_EXPERT.match(name):
            if local.start <= int(m["e"]) < local.stop:
                _place_expert(m, stored.read(stats).to(dtype), fused, params, local, where)
            else:
                stats.tensors_skipped += 1
            continue
        if m := FUSED.match(name):
            target = name
            fused[target] = stored.read(stats, local).to(dtype)
            _check_shape(fused[target].shape, _local_shape(params, target, local, where), where)
            continue
        key = name.replace(".block_sparse_moe.", ".mlp.")
        if key not in params:
            raise ValueError(f"{where} is not a parameter of the model")
        if partition is not None:
            _check_shape(stored.shape, tuple(params[key].shape), where)
            _put_param(model, key, _read_partition(stored, dtype, partition, stats))
            continue
        tensor = stored.read(stats)
        _check_shape(tensor.shape, tuple(params[key].shape), where)
        _set_param(model, key, tensor.to(dtype))
    for target, rows_LRC in fused.items():
        _set_param(model, target, rows_LRC)
        model.get_submodule(target.rpartition(".")[0]).local_experts = local
    model.tie_weights()
    if missing := [n for n, p in model.named_parameters() if p.is_meta]:
        raise ValueError(f"{folder}: the weight files do not provide {missing[:3]}")
    return model.eval()


def load_streamed(
    folder: Path,
    dtype: torch.dtype,
    frozen_dtype: torch.dtype,
    partition: Callable[[list[nn.Parameter]], None] | None = None,
    stats: ReadStats | None = None,
) -> PreTrainedModel:
    """A dense causal LM built with empty weights and filled from its files, one tensor at a time.

    Linear and Embedding weights get `frozen_dtype`, every other parameter (norms, biases) `dtype`. The
    files' keys must be the model's parameter names, as in folders that transformers saves for Llama,
    Mistral or Qwen2. Under ZeRO-3 (`partition`) each tensor is partitioned as it is read and a rank reads
    only its part of it (`mtmoe.model.zero3.partitioned_from`): it holds its share of the model plus one
    tensor and reads about 1/world of the files' bytes.

    Raises:
        ValueError: Naming the file and key of a tensor the model does not have or whose shape differs,
            or the parameters no file provides.
    """
    stats = stats if stats is not None else ReadStats()
    model = empty_model(folder, dtype)
    params = dict(model.named_parameters())
    narrow = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    for name, stored in sorted(stored_tensors(folder).items(), key=lambda kv: (kv[1].path, kv[1].offset)):
        where = f"{stored.path}: tensor {name!r}"
        if name not in params:
            raise ValueError(f"{where} is not a parameter of the model")
        _check_shape(stored.shape, tuple(params[name].shape), where)
        target = frozen_dtype if name in narrow else dtype
        if partition is None:
            _set_param(model, name, stored.read(stats).to(target))
        else:
            _put_param(model, name, _read_partition(stored, target, partition, stats))
    model.tie_weights()
    if missing := [n for n, p in model.named_parameters() if p.is_meta]:
        raise ValueError(f"{folder}: the weight files do not provide {missing[:3]}")
    return model.eval()


def _read_partition(
    stored: StoredTensor, dtype: torch.dtype, partition: Callable, stats: ReadStats
) -> nn.Parameter:
    """`stored` as a ZeRO-3 partitioned parameter of `dtype`, of which this rank reads only its part."""

    def read(start: int, stop: int) -> torch.Tensor:
        return stored.read_elements(stats, start, stop).to(dtype)

    grad = dtype.is_floating_point
    return partitioned_from(stored.shape, dtype, read, partition, requires_grad=grad)


def _local_shape(params: dict, target: str, local: slice, where: str) -> tuple[int, ...]:
    if target not in params:
        raise ValueError(f"{where}: the model has no experts tensor {target!r}")
    return (local.stop - local.start, *params[target].shape[1:])


def _place_expert(
    m: re.Match, w_RC: torch.Tensor, fused: dict, params: dict, local: slice, where: str
) -> None:
    """Copies one expert's projection into its rows of the local fused tensor (made on first use)."""
    down = m["proj"] in ("w2", "down_proj")
    target = f"{m['layer']}.mlp.experts.{'down_proj' if down else 'gate_up_proj'}"
    if target not in fused:
        fused[target] = torch.zeros(_local_shape(params, target, local, where), dtype=w_RC.dtype)
    rows_RC = fused[target][int(m["e"]) - local.start]
    if not down:  # gate rows first, then up
        half = rows_RC.shape[0] // 2
        rows_RC = rows_RC[GATE_HALF[m["proj"]] * half :][:half]
    _check_shape(w_RC.shape, tuple(rows_RC.shape), where)
    rows_RC.copy_(w_RC)


def _check_shape(shape: tuple[int, ...], want: tuple[int, ...], where: str) -> None:
    if tuple(shape) != tuple(want):
        raise ValueError(f"{where} has shape {tuple(shape)}, the model {tuple(want)}")


def _set_param(model: nn.Module, key: str, tensor: torch.Tensor) -> nn.Parameter:
    return _put_param(model, key, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def _put_param(model: nn.Module, key: str, param: nn.Parameter) -> nn.Parameter:
    module_name, _, attr = key.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = param
    return param
