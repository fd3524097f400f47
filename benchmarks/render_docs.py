"""Regenerates the generated parts of README.md and docs/*.md: benchmark tables and the config reference.

A page marks every generated region with a pair of HTML comments:

    <!-- bench:NAME -->
    ... generated, do not edit by hand ...
    <!-- /bench:NAME -->

`SOURCES` names, per NAME, the module that renders it: its `MODE` (or `MODES[mode]`) gives the renderer
and the JSON a full run writes; a module without modes (a study) gives `render_markdown` and `RESULT`.
`config_reference`, `weighter_options` and `router_options` are made from the dataclasses of `mtmoe`
(their defaults and docstrings). Text outside the markers is left as it is.

    .venv/bin/python -m benchmarks.render_docs           # rewrites README.md and docs/*.md in place
    .venv/bin/python -m benchmarks.render_docs --check   # exits 1 with a diff if a page is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from benchmarks.tables import table

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
START = re.compile(r"<!-- bench:([A-Za-z0-9_]+) -->")
END = re.compile(r"<!-- /bench:([A-Za-z0-9_]+) -->")

Renderer = Callable[[dict[str, Any]], str]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a marker's table comes from.

    Attributes:
        module: The importable module that renders it.
        mode: The key of its mode in the module's `MODES`; None for its `MODE`, or for a module without
            modes, its `renderer` and `RESULT`.
        renderer: For a module without modes: the function that renders its `RESULT` (one JSON can
            feed several tables, e.g. a study's full tables and its README headline).
        result: Another JSON of the same mode (a variant's run), relative to the repository root.
    """

    module: str
    mode: str | None = None
    renderer: str = "render_markdown"
    result: str | None = None


SOURCES = {
    "family": Source("benchmarks.family"),
    "step": Source("benchmarks.step.compare"),
    "step_mfu": Source("benchmarks.step.mfu"),
    "step_packing": Source("benchmarks.step.packing"),
    "loss": Source("benchmarks.loss"),
    "ep": Source("benchmarks.ep"),
    "memory": Source("benchmarks.memory"),
    "inference": Source("benchmarks.inference"),
    "tokenization": Source("benchmarks.tokenization"),
    "zero3_plans": Source("benchmarks.zero3", "plans"),
    "zero3_step": Source("benchmarks.zero3", "step"),
    "zero3_step_prefetch": Source(
        "benchmarks.zero3", "step", result="benchmarks/results/zero3_step_prefetch.json"
    ),
    "zero3_step_mb16": Source("benchmarks.zero3", "step", result="benchmarks/results/zero3_step_mb16.json"),
    "zero3_loading": Source("benchmarks.zero3", "loading"),
    "zero3_export": Source("benchmarks.zero3", "export"),
    "quality_study": Source("experiments.quality_study"),
    "quality_summary": Source("experiments.quality_study", renderer="render_summary"),
    "balance_study": Source("experiments.balance_study"),
    "export_comparison": Source("experiments.export_comparison"),
}


class RenderError(RuntimeError):
    """A marker whose table cannot be rendered (no source, no renderer, no JSON, no end marker)."""


def render(text: str, sources: Mapping[str, Source] = SOURCES) -> str:
    """Replaces the text between every marker pair with what its source renders from its JSON.

    Raises:
        RenderError: If a marker has no end marker, or its source, renderer or JSON is missing.
    """
    out, pos = [], 0
    for name, body_start, body_end in marker_spans(text):
        out.append(text[pos:body_start])
        out.append("\n\n" + render_one(name, sources).strip("\n") + "\n\n")
        pos = body_end
    out.append(text[pos:])
    return "".join(out)


def marker_spans(text: str) -> Iterator[tuple[str, int, int]]:
    """Per marker pair of `text`, in order: its name and the span between the markers.

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


def render_one(name: str, sources: Mapping[str, Source]) -> str:
    """The Markdown of one marker: its source's renderer applied to its JSON.

    Raises:
        RenderError: If the marker has no source, the module has no renderer, the JSON is missing, or the
            renderer fails on the JSON (a key or value it does not find).
    """
    marker = f"<!-- bench:{name} -->"
    if name in BUILT_IN:
        return BUILT_IN[name]()
    if name not in sources:
        raise RenderError(f"{marker}: no source; add it to SOURCES in benchmarks/render_docs.py")
    renderer, path = load_source(marker, sources[name])
    if not path.is_file():
        raise RenderError(f"{marker}: no results file {path} (run {sources[name].module} first)")
    try:
        return renderer(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a JSON of another schema than the code's
        raise RenderError(
            f"{marker}: rendering failed on {path} ({type(e).__name__}: {e}); "
            f"is the JSON from the current {sources[name].module}?"
        ) from e


def load_source(marker: str, source: Source) -> tuple[Renderer, Path]:
    """Imports the source's module; returns its renderer and the path of its JSON.

    Raises:
        RenderError: If the module has neither the mode nor a callable `render_markdown` and a `RESULT`.
    """
    module = importlib.import_module(source.module)
    mode = getattr(module, "MODES", {}).get(source.mode) if source.mode else getattr(module, "MODE", None)
    if mode is not None:
        return mode.render, ROOT / source.result if source.result else mode.cli.out
    renderer, result = getattr(module, source.renderer, None), getattr(module, "RESULT", None)
    if source.mode is not None or not callable(renderer) or result is None:
        what = f"no mode {source.mode}" if source.mode else f"no MODE, nor {source.renderer} and RESULT"
        raise RenderError(f"{marker}: {source.module} has {what}")
    return renderer, Path(result)


def diff(old: str, new: str, path: Path) -> str:
    """A unified diff from the README as it is to the README as the JSON renders it."""
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"{path} (as is)",
        tofile=f"{path} (rendered from its sources)",
    )
    return "".join(lines)


def config_reference() -> str:
    """The recipe keys as a Markdown table, one row per field of `mtmoe.config`'s sections.

    Each row holds the field's default and the text of its entry in its dataclass's `Attributes:`
    docstring, so the code is the one source of the reference.
    """
    from mtmoe.config import Config

    rows = []
    for section in dataclasses.fields(Config):
        for name, default, text in documented_fields(type(section.default_factory())):
            rows.append([f"`{section.name}.{name}`", default, text.replace("|", "\\|")])
    return table(["key", "default", "meaning"], rows, "lll")


def options_reference(registry: dict[str, type], kind: str, key: str) -> str:
    """Each registered class's options (its `options` dataclass), one row per field."""
    rows = []
    for name, cls in sorted(registry.items()):
        fields = documented_fields(cls.options)
        rows += [[f"`{name}`", "—", "", "no options"]] if not fields else []
        rows += [
            [f"`{name}`", f"`{key}.{n}`", default, text.replace("|", "\\|")] for n, default, text in fields
        ]
    return table([kind, "key", "default", "meaning"], rows, "llll")


def weighter_options_reference() -> str:
    """Each registered weighter's options (`balance.options`)."""
    from mtmoe.balance.weighters import WEIGHTERS

    return options_reference(WEIGHTERS, "weighter", "balance.options")


def router_options_reference() -> str:
    """Each registered router's options (`moe.router_options`)."""
    from mtmoe.model.routers import ROUTERS

    return options_reference(ROUTERS, "router", "moe.router_options")


def documented_fields(cls: type) -> list[tuple[str, str, str]]:
    """Per field of the dataclass `cls`: its name, its default as a cell, its `Attributes:` entry.

    Raises:
        RenderError: If a field has no entry in the docstring's `Attributes:` section.
    """
    described = attribute_docs(inspect.getdoc(cls) or "")
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name not in described:
            raise RenderError(f"{cls.__name__}.{f.name} has no Attributes entry")
        out.append((f.name, default_cell(default), described[f.name]))
    return out


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
            new = render(old)
        except RenderError as e:
            print(f"error: {page}: {e}", file=sys.stderr)
            return 2
        if args.check and new != old:
            print(diff(old, new, page), end="")
            print(f"{page} is stale: run python -m benchmarks.render_docs", file=sys.stderr)
            stale = 1
        elif new != old:
            page.write_text(new)
            print(f"rewrote the generated parts of {page}")
    if args.check and not stale:
        print("every generated part matches its source")
    return stale


if __name__ == "__main__":
    sys.exit(main())
