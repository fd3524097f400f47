"""Regenerates README.md's benchmark tables from the JSON in benchmarks/results/.

The README marks every generated region with a pair of HTML comments:

    <!-- bench:NAME -->
    ... generated, do not edit by hand ...
    <!-- /bench:NAME -->

For each pair this script loads `benchmarks/NAME.py`, reads `benchmarks/results/NAME.json` and puts the
module's `render_markdown(result)` between the markers. Text outside the markers is left as it is.

Run from anywhere:
    .venv/bin/python benchmarks/render_readme.py           # rewrites README.md in place
    .venv/bin/python benchmarks/render_readme.py --check   # exits 1 with a diff if README.md is stale
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 and print a diff if stale")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to render")
    args = parser.parse_args(argv)
    old = args.readme.read_text()
    try:
        new = render(old, ROOT)
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new == old:
            print(f"{args.readme}: benchmark tables match benchmarks/results/")
            return 0
        print(diff(old, new, args.readme), end="")
        print(f"{args.readme} is stale: run python benchmarks/render_readme.py", file=sys.stderr)
        return 1
    if new != old:
        args.readme.write_text(new)
        print(f"rewrote the benchmark tables of {args.readme}")
    else:
        print(f"{args.readme}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
