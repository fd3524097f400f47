"""Per-task generation metrics: each metric by hand, pass@1's sandbox, the declaration at tokenization,
greedy KV-cache generation against a no-cache reference, and expert-parallel ranks against one process."""

import json

import pytest
import sacrebleu
import torch
from conftest import ROOT

from mtmoe.data.build import tokenize_tasks
from mtmoe.data.references import MetricSpec, Reference
from mtmoe.data.shards import load_manifest, open_references, open_shard
from mtmoe.data.split import record_key
from mtmoe.eval.generation import greedy_generate, hf_step, prompt_of
from mtmoe.eval.metrics import METRICS, check_reference, get_metric, normalize
from mtmoe.eval.metrics.pass_at_1 import extract_code, network_isolation, run_program
from mtmoe.parallel.spawn import run_ranks

SPEC = MetricSpec(name="x", max_new_tokens=8)
VOCAB = 49152


def refs(*answers):
    return [Reference(answer=a) for a in answers]


def test_exact_match_and_accuracy_by_hand():
    em = get_metric("exact_match")
    assert normalize("  Hello\tWORLD ") == "hello world"
    assert em.score(["hello  world", "Bye", "x"], refs("Hello World", "bye.", "x"), SPEC) == {
        "score": pytest.approx(200 / 3)
    }
    acc, spec = get_metric("accuracy"), MetricSpec(name="accuracy", max_new_tokens=2, labels=("pos", "neg"))
    got = acc.score(["POS", "neg", "maybe", "neg"], refs("pos", "pos", "neg", "neg"), spec)
    assert got == {"score": 50.0, "invalid": 25.0}  # "maybe" is no label: wrong, and counted invalid
    # an answer that names exactly one label as a word gives it; naming two, or part of a word, none
    got = acc.score(["It is pos.", "pos or neg", "negative", "Neg!"], refs("pos", "pos", "neg", "neg"), spec)
    assert got == {"score": 50.0, "invalid": 50.0}


def test_chrf_and_bleu_are_sacrebleus_corpus_scores():
    hyps, answers = ["Guten Morgen, mein Freund", "Datei"], ["Guten Morgen, mein Freund", "Dateien"]
    chrf = get_metric("chrf").score(hyps, refs(*answers), SPEC)["score"]
    bleu = get_metric("bleu").score(hyps, refs(*answers), SPEC)["score"]
    assert chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [answers]).score)
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [answers]).score)
    assert get_metric("chrf").score(["abc"], refs("abc"), SPEC)["score"] == pytest.approx(100.0)
    assert get_metric("chrf").score(["xyz"], refs("abc"), SPEC)["score"] == 0.0
    assert 0 < chrf < 100 and 0 < bleu < 100


CHECK = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n"
PREFIX = "def double(x):\n"


def code_ref():
    return Reference(answer="    return 2 * x\n", test=CHECK, entry_point="double", code_prefix=PREFIX)


@pytest.mark.parametrize(
    "answer,outcome",
    [
        ("    return 2 * x\n", "passed"),
        ("Here it is:\n```python\n    return x + x\n```\nDone.", "passed"),  # the fenced block is the code
        ("```\n    return x + x\n", "passed"),  # an opening fence that is never closed
        # a chat model's whole function, its usage and prose after a closing fence: the function is tested
        ("def double(x):\n    return 2 * x\n\nprint(double(3))\n```\nThis doubles x.", "passed"),
        ("def double(y):\n    return y\n```\nThis returns y.", "failed"),
        ("    return x * x\n", "failed"),  # wrong
        ("    raise RuntimeError('boom')\n", "failed"),  # crashes
        ("    import os\n    os.abort()\n", "failed"),  # dies by a signal
        ("    while True:\n        pass\n", "timeout"),  # hangs: killed, counted as a failure
        ("    print('x' * 10**7)\n    return 2 * x\n", "passed"),  # megabytes of output go nowhere
        ("    bytearray(4 * 1024**3)\n    return 2 * x\n", "failed"),  # over the memory limit
    ],
)
def test_pass_at_1_runs_each_answer_sandboxed(answer, outcome):
    from mtmoe.eval.metrics.pass_at_1 import program

    assert run_program(program(answer, code_ref()), timeout_s=3) == outcome


def test_pass_at_1_score_and_no_network():
    ref = code_ref()
    good, bad = "    return 2 * x\n", "    return x\n"
    assert get_metric("pass@1").score([good, bad, good, bad], [ref] * 4, SPEC) == {
        "score": 50.0,
        "timeout": 0.0,
    }
    reach = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
    listen = "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))\n"
    assert run_program(reach) == "failed"
    if network_isolation() == "guard":
        assert run_program(listen) == "failed"  # the guard refuses every socket
    assert extract_code("no fence") == "no fence"


def test_metrics_refuse_records_they_cannot_score():
    with pytest.raises(ValueError, match="'test' and 'entry_point'"):
        check_reference(MetricSpec(name="pass@1"), Reference(answer="x"))
    with pytest.raises(ValueError, match="label set"):
        check_reference(MetricSpec(name="accuracy"), Reference(answer="pos"))
    with pytest.raises(ValueError, match="none of the labels"):
        check_reference(MetricSpec(name="accuracy", labels=("pos", "neg")), Reference(answer="meh"))
    with pytest.raises(ValueError, match="unknown metric 'rouge'"):
        get_metric("rouge")
    assert set(METRICS) == {"pass@1", "chrf", "bleu", "exact_match", "accuracy"}


@pytest.fixture(scope="module")
def tok():
    from mtmoe.model.base import ensure_smollm2, load_tokenizer

    return load_tokenizer(ensure_smollm2())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def code_record(i, **extra):
    chat = [{"role": "user", "content": f"def f{i}(x):"}, {"role": "assistant", "content": f"    return {i}"}]
    return {"chat_rounds": chat, **extra}


def tokenize(tmp_path, tasks, metrics, tok):
    return tokenize_tasks(
        tasks,
        tok,
        "smollm2-135m-instruct",
        max_len=200,
        overflow="truncate",
        eval_fraction=0.5,
        max_eval=None,
        out=tmp_path / "tok",
        log=lambda s: None,
        metrics=metrics,
        check=check_reference,
    )


def test_tokenization_keeps_the_metric_and_one_reference_per_held_out_sample(tmp_path, tok):
    tests = {"test": CHECK, "entry_point": "f", "code_prefix": ""}
    code = write_jsonl(tmp_path / "code.jsonl", [code_record(i, **tests) for i in range(12)])
    labels = [{"prompt": f"review {i}", "answer": ["pos", "neg"][i % 2]} for i in range(12)]
    cls = write_jsonl(tmp_path / "cls.jsonl", labels)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"p{i}", "answer": "a"} for i in range(6)])
    manifest = tokenize(
        tmp_path,
        {"code": code, "cls": cls, "plain": plain},
        {"code": MetricSpec(name="pass@1"), "cls": MetricSpec(name="accuracy", labels=("pos", "neg"))},
        tok,
    )
    loaded = load_manifest(manifest.root)
    spec = loaded.task("code").metric_spec
    # the automatic cap: the longest held-out answer, in tokens, plus 8
    longest = max(len(tok(r.answer)["input_ids"]) for r in open_references(loaded, "code"))
    assert spec.name == "pass@1" and spec.max_new_tokens == longest + 8
    assert loaded.task("cls").metric_spec.labels == ("pos", "neg")
    assert loaded.task("plain").metric is None
    for task in ("code", "cls"):
        shard, task_refs = open_shard(loaded, task, "eval"), open_references(loaded, task)
        assert len(task_refs) == len(shard) > 0
        for i, ref in enumerate(task_refs):  # aligned: the reference is the sample's first answer
            prompt, answer = prompt_of(*shard[i])
            assert tok.decode(answer, skip_special_tokens=True) == ref.answer
    assert all(r.test == CHECK for r in open_references(loaded, "code"))
    with pytest.raises(ValueError, match="declares no metric"):
        open_references(loaded, "plain")


def test_tokenization_refuses_an_unscorable_record_with_its_file_and_line(tmp_path, tok):
    records = [code_record(i, test=CHECK, entry_point="f") for i in range(5)]
    records.insert(3, code_record(99))  # line 4 has no tests
    path = write_jsonl(tmp_path / "code.jsonl", records)
    with pytest.raises(
        ValueError, match=r"code\.jsonl:4: pass@1 needs the record's 'test' and 'entry_point'"
    ):
        tokenize(tmp_path, {"code": path}, {"code": MetricSpec(name="pass@1")}, tok)
    bad = write_jsonl(
        tmp_path / "cls.jsonl", [{"prompt": "a", "answer": "pos"}, {"prompt": "b", "answer": "??"}]
    )
    with pytest.raises(ValueError, match=r"cls\.jsonl:2: the answer '\?\?' is none of the labels"):
        tokenize(tmp_path, {"cls": bad}, {"cls": MetricSpec(name="accuracy", labels=("pos", "neg"))}, tok)


def test_adding_tests_to_a_record_does_not_move_it_between_splits():
    plain = code_record(1)
    assert record_key(plain) == record_key({**plain, "test": CHECK, "entry_point": "f", "code_prefix": "x"})
    assert record_key(plain) != record_key({**plain, "id": 7})


def test_tokenize_cli_declares_metrics_and_refuses_bad_flags(tmp_path):
    import subprocess
    import sys

    def cli(*args):
        cmd = [sys.executable, "data_prep/tokenize_tasks.py", "--task", "t=x.jsonl", "--tokenizer", "y"]
        return subprocess.run(
            [*cmd, "--out", str(tmp_path / "o"), *args], cwd=ROOT, capture_output=True, text=True
        )

    assert "unknown metric 'rouge'" in cli("--metric", "t=rouge").stderr
    assert "--labels: task(s) ['t'] declare no --metric" in cli("--labels", "t=a,b").stderr
    assert "--metric: unknown task(s) ['u']" in cli("--metric", "u=chrf").stderr


def _tiny_model(placement=None):
    from mtmoe.config import load_config
    from mtmoe.model.moe_lm import build_model

    cfg = load_config(ROOT / "launch" / "recipes" / "tiny.yaml")
    full = build_model(cfg, VOCAB, 2).eval()
    model = full if placement is None else build_model(cfg, VOCAB, 2, placement).eval()
    with torch.no_grad():  # every trainable tensor random (drawn for all experts, then sliced)
        for name, p in full.named_parameters():
            if p.requires_grad:
                gen = torch.Generator().manual_seed(sum(map(ord, name)))
                t = torch.randn(p.shape, generator=gen) * 0.3
                target = dict(model.named_parameters())[name]
                target.copy_(t if target.shape == t.shape else t[placement.local])
    return model


def _reference_greedy(model, prompt, task, steps, stop):
    """One row, no cache: the whole sequence recomputed at every step."""
    ids, out = list(prompt), []
    for _ in range(steps):
        x = torch.tensor([ids])
        logits, _ = model.next_token_logits(x, torch.ones_like(x), torch.arange(len(ids))[None], None,
                                            torch.tensor([task]))  # fmt: skip
        token = int(logits[0].argmax())
        if token in stop:
            break
        out.append(token)
        ids.append(token)
    return out


def test_batched_kv_cache_generation_equals_the_no_cache_reference():
    model = _tiny_model()
    prompts = [[5, 6, 7, 8, 9, 11], [12, 13], [14, 15, 16]]  # left-padded in one batch
    for task in (0, 1):
        got = greedy_generate(model.next_token_logits, prompts, task, 7, {3}, pad_id=0)
        assert got == [_reference_greedy(model, p, task, 7, {3}) for p in prompts]
        assert len({tuple(g) for g in got}) > 1  # the rows really differ
    from mtmoe.model.base import tiny_llama

    plain = tiny_llama(VOCAB, seed=3).eval()  # a plain HF causal LM (a base or a dense export): `hf_step`
    got = greedy_generate(hf_step(plain), prompts, 0, 6, {3}, pad_id=0)
    for prompt, row in zip(prompts, got, strict=True):
        ids = list(prompt)
        for token in row:  # each kept token is the argmax of a full, uncached forward
            with torch.no_grad():
                assert int(plain(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids.append(token)


def _ep_worker(rank, world, data):
    from mtmoe.data.shards import load_manifest
    from mtmoe.eval.task_metrics import score_tasks
    from mtmoe.parallel.dist import init_distributed
    from mtmoe.parallel.expert_parallel import create_placement

    init_distributed("gloo")
    from mtmoe.model.base import ensure_smollm2, load_tokenizer

    manifest = load_manifest(data)
    tok = load_tokenizer(ensure_smollm2())
    names = [t.name for t in manifest.tasks]
    one = score_tasks(_tiny_model().next_token_logits, manifest, names, tok, 0, batch_size=2)
    ep = _tiny_model(create_placement(2, 4))
    two = score_tasks(ep.next_token_logits, manifest, names, tok, 0, batch_size=2, rank=rank, world=world)
    return one, two


def test_generation_metrics_on_two_expert_parallel_ranks_equal_one_process(tmp_path, tok):
    tests = {"test": CHECK, "entry_point": "f"}
    code = write_jsonl(tmp_path / "code.jsonl", [code_record(i, **tests) for i in range(10)])
    text = write_jsonl(
        tmp_path / "text.jsonl", [{"prompt": f"say {i}", "answer": f"ok {i}"} for i in range(10)]
    )
    metrics = {
        "code": MetricSpec(name="pass@1", max_new_tokens=6),
        "text": MetricSpec(name="chrf", max_new_tokens=5),
    }
    manifest = tokenize(tmp_path, {"code": code, "text": text}, metrics, tok)
    results = run_ranks(_ep_worker, 2, manifest.root)
    one = results[0][0]
    for rank, (single, ep) in enumerate(results):
        assert ep == one and single == one, f"rank {rank}"
    held_out = {t.name: t.splits["eval"]["samples"] for t in manifest.tasks}
    assert {name: r["samples"] for name, r in one.items()} == held_out and min(held_out.values()) >= 2
    assert len({a for r in one.values() for a in r["answers"]}) > 2  # varied answers, not one collapse
