import importlib.util
import json
import sysconfig
import textwrap
from pathlib import Path

import pytest

from mtmoe.data.formats import read_task
from mtmoe.data.shards import load_manifest, open_shard
from mtmoe.model.base import ensure_smollm2

DATA_PREP = Path(__file__).resolve().parents[1] / "data_prep"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", DATA_PREP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build():
    return load_script("build_demo_tasks")


@pytest.fixture(scope="module")
def demo(build, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "jsonl"
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "email"
    argv = ["--out", str(out), "--langs", "de,fr", "--max-docstring", "50", "--stdlib", str(stdlib)]
    counts = build.main(argv)
    return out, counts


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_writes_the_tasks_with_their_schemas(demo):
    out, counts = demo
    names = ["codegen.jsonl", "docstring.jsonl", "langid.jsonl", "translate.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert counts["codegen"] == 164 and counts["docstring"] == 50 and counts["translate"] > 500

    codegen = read_jsonl(out / "codegen.jsonl")
    assert [t["role"] for t in codegen[0]["chat_rounds"]] == ["system", "human", "bot"]
    assert codegen[0]["id"] == "HumanEval/0"
    assert "def has_close_elements" in codegen[0]["chat_rounds"][1]["content"]
    # pass@1 fields: the canonical solution passes HumanEval's own tests
    from mtmoe.data.formats import read_task as read_examples
    from mtmoe.data.references import reference_of
    from mtmoe.eval.metrics.pass_at_1 import program, run_program

    first = reference_of(next(iter(read_examples(out / "codegen.jsonl"))))
    assert first.entry_point == "has_close_elements" and run_program(program(first.answer, first)) == "passed"

    langid = read_jsonl(out / "langid.jsonl")
    assert {r["answer"] for r in langid} == {"German", "French", "Spanish", "Italian", "Dutch", "Portuguese"}
    assert all(
        r["prompt"].startswith("Which language") and len(r["prompt"].split("\n", 1)[1]) >= 12 for r in langid
    )
    assert max(sum(r["answer"] == a for r in langid) for a in ("German", "French")) <= 200

    docstring = read_jsonl(out / "docstring.jsonl")
    assert all(set(r) == {"id", "data_name", "instruction", "input", "output"} for r in docstring)
    assert all(r["input"].startswith(("def ", "async def ")) and r["output"] for r in docstring)

    translate = read_jsonl(out / "translate.jsonl")
    assert all(set(r) == {"id", "prompt", "answer"} for r in translate)
    languages = {r["prompt"].split(":\n", 1)[0] for r in translate}
    assert languages == {"Translate into German", "Translate into French"}
    pairs = [(r["prompt"].split(":\n", 1)[1], r["answer"]) for r in translate]
    assert all(src != tgt and src.strip() and tgt.strip() and "\x04" not in src for src, tgt in pairs)
    assert len({(r["prompt"], r["answer"]) for r in translate}) == len(translate)

    for name in counts:  # every file reads back through the project's own parser
        assert len(list(read_task(out / f"{name}.jsonl"))) == counts[name]


def test_build_is_deterministic(build, demo, tmp_path):
    out, _ = demo
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "email"
    build.main(["--out", str(tmp_path), "--langs", "de,fr", "--max-docstring", "50", "--stdlib", str(stdlib)])
    for name in ("codegen", "docstring", "translate", "langid"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes()


def test_docstring_extraction_and_hash_cap(build, tmp_path):
    source = (
        textwrap.dedent(
            '''
        def plain(x):
            """Add one to a number.

            Longer explanation that is not the target.
            """
            return x + 1


        class C:
            def method(self):
                """Return the answer to everything, as an int."""
                # a comment stays
                return 42

            def only_doc(self):
                """Nothing but a docstring here."""

            def short_doc(self):
                """Deprecated."""
                return None


        def no_doc():
            return 1


        def long_one():
            """Is far too long to keep."""
        '''
        )
        + "    x = 1\n" * 45
    )
    (tmp_path / "mod.py").write_text(source)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text(source)
    records = build.docstring_records(tmp_path, 10)
    assert [(r["id"], r["input"], r["output"]) for r in records] == [
        ("mod.py:2:plain", "def plain(x):\n    return x + 1\n", "Add one to a number."),
        ("mod.py:11:method", "def method(self):\n    # a comment stays\n    return 42\n",
         "Return the answer to everything, as an int."),
    ]  # fmt: skip
    one = build.docstring_records(tmp_path, 1)
    assert len(one) == 1 and one[0] in records


def test_bad_language_is_refused(build, tmp_path):
    with pytest.raises(SystemExit, match="no catalog for 'xx'"):
        build.translate_records(["xx"])


def test_tokenize_script_on_demo_files(demo, tmp_path):
    out, counts = demo
    tokens = tmp_path / "tokens"
    argv = ["--tokenizer", str(ensure_smollm2()), "--max-len", "256", "--eval-fraction", "0.1"]
    argv += ["--max-eval", "5", "--out", str(tokens)]
    for name in ("translate", "codegen"):
        argv += ["--task", f"{name}={out / name}.jsonl"]
    load_script("tokenize_tasks").main(argv)
    manifest = load_manifest(tokens)
    assert [(t.name, t.id) for t in manifest.tasks] == [("translate", 0), ("codegen", 1)]
    assert manifest.max_len == 256 and manifest.overflow == "truncate"
    for info in manifest.tasks:
        eval_split, train = info.splits["eval"], info.splits["train"]
        assert eval_split["records"] == 5 and eval_split["records"] + train["records"] == counts[info.name]
        assert len(open_shard(manifest, info.name, "train")) == train["samples"] > 0
    codegen = manifest.task("codegen").splits["train"]
    assert codegen["truncated"] + codegen["dropped_no_target"] > 0  # some solutions exceed 256 tokens
