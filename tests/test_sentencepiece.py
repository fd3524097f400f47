"""A SentencePiece tokenizer (the `sentencepiece` pin): trained here on the demo's real text, it tokenizes
the tasks with the assistant-only loss mask and a tiny model trains on them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cmd

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TASKS = ("codegen", "translate")


@pytest.fixture(scope="module")
def sp_folder(demo_jsonl, tmp_path_factory):
    """A base folder whose tokenizer is a SentencePiece model (`tokenizer.model`) and a tiny Llama config."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("sentencepiece")
    corpus = []
    for task in TASKS:
        for line in (demo_jsonl / f"{task}.jsonl").read_text().splitlines():
            record = json.loads(line)
            corpus += [str(v).replace("\n", " ") for k, v in record.items() if k in ("prompt", "answer")]
    (root / "corpus.txt").write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=500, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    folder = root / "base"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((root / "sp.model").read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "eos_token": "<|im_end|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(folder)
    LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)  # fmt: skip
    return folder


def test_sentencepiece_tokenizer_round_trips_and_masks_only_the_answer(sp_folder, demo_jsonl, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sp_folder)
    assert "sentencepiece" in sys.modules  # the model file was read through sentencepiece
    text = 'def f(x):\n    return x + 1  # Grüße, "naïve"'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    out = tmp_path / "tokenized"
    tasks = [f"--task={t}={demo_jsonl / t}.jsonl" for t in TASKS]
    run_cmd([sys.executable, "data_prep/tokenize_tasks.py", *tasks, "--tokenizer", str(sp_folder),
             "--max-len", "256", "--eval-fraction", "0.2", "--out", out])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == list(TASKS)
    records = [json.loads(line) for line in (demo_jsonl / "translate.jsonl").read_text().splitlines()]
    squeeze = lambda text: "".join(text.split())  # noqa: E731  (SentencePiece's dummy-prefix spaces aside)
    answers = {squeeze(r["answer"]) for r in records}
    for split in ("train", "eval"):
        d = out / "translate" / split
        ids, mask, offsets = (np.load(d / f"{a}.npy") for a in ("ids", "mask", "offsets"))
        for s, e in zip(offsets[:-1], offsets[1:], strict=True):
            masked = squeeze(tok.decode(ids[s:e][mask[s:e] == 1]))
            if masked.endswith("<|im_end|>"):  # the loss covers the answer and its end of turn
                assert masked.removesuffix("<|im_end|>") in answers  # and nothing of the prompt
            else:  # a sample cut at --max-len keeps the start of its answer
                assert any(a.startswith(masked) for a in answers)


def test_a_tiny_model_trains_on_sentencepiece_tokens(sp_folder, demo_jsonl, tmp_path):
    out = tmp_path / "tokenized"
    tasks = [f"--task={t}={demo_jsonl / t}.jsonl" for t in TASKS]
    run_cmd([sys.executable, "data_prep/tokenize_tasks.py", *tasks, "--tokenizer", str(sp_folder),
             "--max-len", "256", "--eval-fraction", "0.2", "--out", out])  # fmt: skip
    run = tmp_path / "run"
    overrides = [
        f"data.tokenized={out}",
        f"train.output_dir={run}",
        "train.steps=2",
        "train.eval_metrics=false",
    ]
    run_cmd(
        [sys.executable, "launch/train.py", "--config", str(ROOT / "launch/recipes/tiny.yaml"), *overrides]
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((run / "eval.json").read_text())["tasks"].keys() == set(TASKS)
