"""Regenerates the generated parts of README.md and docs/*.md: benchmark tables and the config reference.

A page marks every generated region with a pair of HTML comments:

    <!-- bench:NAME -->
    ... generated, do not edit by hand ...
    <!-- /bench:NAME -->

For each pair this script loads `benchmarks/NAME.py`, reads `benchmarks/results/NAME.json` and puts the
module's `render_markdown(result)` between the markers; `config_reference` is the recipe keys' table,
made from the dataclasses of `mtmoe.config` (their defaults and docstrings). Text outside the markers is
left as it is.

Run from anywhere:
    .venv/bin/python benchmarks/render_docs.py           # rewrites README.md and docs/*.md in place
    .venv/bin/python benchmarks/render_docs.py --check   # exits 1 with a diff if a page is stale
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
START = re.compile(r"<!-- bench:([A-Za-z0-9_]+) -->")
END = re.compile(r"<!-- /bench:([A-Za-z0-9_]+) -->")

Renderer = Callable[[dict[str, Any]], str]


class RenderError(RuntimeError):
    """A marker whose table cannot be rendered (no module, no render_markdown, no JSON, no end marker)."""


def render(readme_text: str, root: Path = ROOT) -> str:
    """Replaces the text between every marker pair with what its benchmark renders from its JSON.

    Args:
        readme_text: The README's text.
        root: The repository root: modules are read from `root/benchmarks/NAME.py` and results from
            `root/benchmarks/results/NAME.json`.

    Returns:
        The README's text with every generated region rewritten.

    Raises:
        RenderError: If a marker has no end marker, or its module, `render_markdown` or JSON is missing.
    """
    out, pos = [], 0
    for name, body_start, body_end in marker_spans(readme_text):
        out.append(readme_text[pos:body_start])
        out.append("\n\n" + render_one(name, root).strip("\n") + "\n\n")
        pos = body_end
    out.append(readme_text[pos:])
    return "".join(out)


def marker_spans(text: str) -> Iterator[tuple[str, int, int]]:
    """The marker pairs of `text`, in order.

    Args:
        text: The README's text.

    Yields:
        Per pair: its name, and the span between the markers (from the end of the start marker to the
        start of the end marker).

    Raises:
        RenderError: If a start marker has no end marker after it or holds another start marker, or if
            an end marker has no start marker.
    """
    pos = 0
    while True:
        start = START.search(text, pos)
        stray_end = END.search(text, pos, start.start() if start else len(text))
        if stray_end:
            raise RenderError(f"{stray_end.group(0)} has no <!-- bench:{stray_end.group(1)} --> before it")
        if start is None:
            return
        name = start.group(1)
        end = re.compile(rf"<!-- /bench:{name} -->").search(text, start.end())
        if end is None:
            raise RenderError(f"{start.group(0)} has no matching <!-- /bench:{name} --> after it")
        nested = START.search(text, start.end(), end.start())
        if nested:
            raise RenderError(f"{start.group(0)} holds another marker, {nested.group(0)}, before its end")
        yield name, start.end(), end.start()
        pos = end.end()


def render_one(name: str, root: Path) -> str:
    """The Markdown of one marker: its module's `render_markdown` applied to its JSON.

    Args:
        name: The marker's name (the benchmark script's stem).
        root: The repository root.

    Returns:
        The rendered Markdown.

    Raises:
        RenderError: If the JSON, the module or its `render_markdown` is missing, or if `render_markdown`
            fails on the JSON (a key or value it does not find).
    """
    marker = f"<!-- bench:{name} -->"
    if name in BUILT_IN:
        return BUILT_IN[name]()
    json_path = root / "benchmarks" / "results" / f"{name}.json"
    if not json_path.is_file():
        raise RenderError(f"{marker}: no results file {json_path} (run benchmarks/{name}.py first)")
    renderer = load_renderer(name, root)
    try:
        return renderer(json.loads(json_path.read_text()))
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a JSON of another schema than the script's
        raise RenderError(
            f"{marker}: render_markdown failed on {json_path} ({type(e).__name__}: {e}); "
            f"is the JSON from the current benchmarks/{name}.py?"
        ) from e


def load_renderer(name: str, root: Path) -> Renderer:
    """Imports `root/benchmarks/NAME.py` by path and returns its `render_markdown`.

    The module is registered as `NAME` in `sys.modules` (reused when already loaded from the same file),
    with `root/benchmarks` on `sys.path` while it loads, so its own `import harness` works.

    Args:
        name: The benchmark script's stem.
        root: The repository root.

    Returns:
        The module's `render_markdown`.

    Raises:
        RenderError: If the module does not exist or has no callable `render_markdown`.
    """
    marker = f"<!-- bench:{name} -->"
    path = root / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise RenderError(f"{marker}: no benchmark script {path}")
    renderer = getattr(import_path(name, path), "render_markdown", None)
    if not callable(renderer):
        raise RenderError(f"{marker}: {path} has no render_markdown(result: dict) -> str")
    return renderer


def import_path(name: str, path: Path) -> ModuleType:
    """Imports the file `path` as module `name`, or returns it if `sys.modules` has it from that file."""
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@contextlib.contextmanager
def on_sys_path(folder: Path) -> Iterator[None]:
    """Puts `folder` first on `sys.path` for the duration (left alone if it is already there)."""
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            sys.path.remove(entry)


def diff(old: str, new: str, path: Path) -> str:
    """A unified diff from the README as it is to the README as the JSON renders it."""
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"{path} (as is)",
        tofile=f"{path} (rendered from benchmarks/results/)",
    )
    return "".join(lines)


def config_reference() -> str:
    """The recipe keys as a Markdown table, one row per field of `mtmoe.config`'s sections.

    Each row holds the field's default and the text of its entry in its dataclass's `Attributes:`
    docstring, so the code is the one source of the reference.
    """
    from md_tables import table

    from mtmoe.config import Config

    rows = []
    for section in dataclasses.fields(Config):
        cls = type(section.default_factory())
        described = attribute_docs(inspect.getdoc(cls) or "")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = described.get(f.name)
            if text is None:
                raise RenderError(f"config_reference: {cls.__name__}.{f.name} has no Attributes entry")
            rows.append([f"`{section.name}.{f.name}`", default_cell(default), text.replace("|", "\\|")])
    return table(["key", "default", "meaning"], rows, "lll")


def attribute_docs(doc: str) -> dict[str, str]:
    """{name: text} of a Google-style docstring's `Attributes:` section (continuation lines joined)."""
    entries: dict[str, str] = {}
    name = None
    for line in doc.split("Attributes:", 1)[1].splitlines() if "Attributes:" in doc else []:
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            name = entry.group(1)
            entries[name] = entry.group(2).strip()
        elif name and line.startswith("        "):
            entries[name] += " " + line.strip()
    return entries


def default_cell(value: Any) -> str:
    """A default as the reference shows it: `code` for strings and containers, empty shown as such."""
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def options_reference(registry: dict[str, type], kind: str, key: str) -> str:
    """The registered classes' options (their `options` dataclasses): kind | key.field | default | meaning."""
    from md_tables import table

    rows = []
    for name, cls in sorted(registry.items()):
        described = attribute_docs(inspect.getdoc(cls.options) or "")
        fields = dataclasses.fields(cls.options)
        if not fields:
            rows.append([f"`{name}`", "—", "", "no options"])
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = described.get(f.name)
            if text is None:
                raise RenderError(f"{kind} options: {cls.options.__name__}.{f.name} has no Attributes entry")
            rows.append([f"`{name}`", f"`{key}.{f.name}`", default_cell(default), text.replace("|", "\\|")])
    return table([kind, "key", "default", "meaning"], rows, "llll")


def weighter_options_reference() -> str:
    """Each registered weighter's options (`balance.options`)."""
    from mtmoe.balance.weighters import WEIGHTERS

    return options_reference(WEIGHTERS, "weighter", "balance.options")


def router_options_reference() -> str:
    """Each registered router's options (`moe.router_options`)."""
    from mtmoe.model.routers import ROUTERS

    return options_reference(ROUTERS, "router", "moe.router_options")


BUILT_IN: dict[str, Callable[[], str]] = {
    "config_reference": config_reference,
    "weighter_options": weighter_options_reference,
    "router_options": router_options_reference,
}


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page of docs/."""
    return [p for pattern in PAGES for p in sorted(root.glob(pattern))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 and print a diff if stale")
    parser.add_argument("--file", type=Path, action="append", help="render only this page (repeatable)")
    args = parser.parse_args(argv)
    stale = 0
    for page in args.file or pages():
        old = page.read_text()
        try:
            new = render(old, ROOT)
        except RenderError as e:
            print(f"error: {page}: {e}", file=sys.stderr)
            return 2
        if args.check and new != old:
            print(diff(old, new, page), end="")
            print(f"{page} is stale: run python benchmarks/render_docs.py", file=sys.stderr)
            stale = 1
        elif new != old:
            page.write_text(new)
            print(f"rewrote the generated parts of {page}")
    if args.check and not stale:
        print("every generated part matches its source")
    return stale


if __name__ == "__main__":
    sys.exit(main())
