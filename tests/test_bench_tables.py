"""The generated parts of README.md and docs/*.md (`python -m benchmarks.render_docs`): every page as
committed is what its sources render (the results JSON, the config dataclasses), a marker that cannot be
rendered fails by name, and the README stays a short door into docs/."""

import json

import pytest
from conftest import ROOT

# The generated regions of the pages; others may be added, none may silently disappear.
EXPECTED = {
    "config_reference", "weighter_options", "router_options", "quality_summary",
    "family", "ep", "balance_study", "export_comparison", "step", "step_mfu",
    "loss", "step_packing", "memory", "inference", "quality_study", "tokenization",
    "zero3_plans", "zero3_step", "zero3_step_prefetch", "zero3_step_mb16", "zero3_loading", "zero3_export",
}  # fmt: skip


@pytest.fixture
def rr():
    from benchmarks import render_docs

    return render_docs


@pytest.fixture
def fake_sources(rr, tmp_path, monkeypatch):
    """Importable modules NAME (given their code), each with `RESULT` at tmp/NAME.json; and their Sources."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(modules=(), results=()):
        for name, source in modules:
            (tmp_path / f"{name}.py").write_text(f"RESULT = {str(tmp_path / f'{name}.json')!r}\n{source}")
        for name, record in results:
            (tmp_path / f"{name}.json").write_text(json.dumps(record))
        return {name: rr.Source(name) for name, _ in modules}

    return make


def test_pages_match_their_sources(rr):
    names = set()
    for page in rr.pages():
        text = page.read_text()
        names |= {name for name, _, _ in rr.marker_spans(text)}
        rendered = rr.render(text)
        assert rendered == text, (
            f"{page}'s generated parts differ from their sources; run "
            "`python -m benchmarks.render_docs`:\n" + rr.diff(text, rendered, page)
        )
    assert EXPECTED <= names, f"the pages lost the markers of {sorted(EXPECTED - names)}"


def test_config_reference_has_every_key_and_follows_the_code(rr, monkeypatch):
    import dataclasses

    from mtmoe import config

    reference = rr.config_reference()
    for section in dataclasses.fields(config.Config):
        for f in dataclasses.fields(type(section.default_factory())):
            assert f"| `{section.name}.{f.name}` |" in reference
    assert "| `train.steps` | 100 |" in reference
    monkeypatch.setattr(
        config.TrainConfig, "__doc__", config.TrainConfig.__doc__.replace("steps: ", "stepz: ")
    )
    with pytest.raises(rr.RenderError, match="TrainConfig.steps has no Attributes entry"):
        rr.config_reference()


def test_readme_is_a_short_door_into_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link {page.name}"


def test_check_fails_on_a_stale_table_and_passes_on_a_fresh_one(rr, tmp_path, capsys):
    marked = rr.render("<!-- bench:balance_study -->\n<!-- /bench:balance_study -->\n")
    fresh, stale = tmp_path / "fresh.md", tmp_path / "stale.md"
    fresh.write_text(marked)
    stale.write_text(marked.replace("| 1.221 |", "| 1.222 |"))
    assert "| 1.221 |" in marked  # plain's codegen loss, so the stale copy really differs

    assert rr.main(["--check", "--file", str(fresh)]) == 0
    capsys.readouterr()
    assert rr.main(["--check", "--file", str(stale)]) == 1
    out = capsys.readouterr().out
    assert "-| proportional + token mean (plain) | 1.222 |" in out
    assert "+| proportional + token mean (plain) | 1.221 |" in out
    assert stale.read_text() != marked  # --check never writes


def test_only_the_text_between_markers_is_rewritten(rr, fake_sources):
    source = "def render_markdown(result):\n    return f\"| x |\\n|---|\\n| {result['x']} |\"\n"
    sources = fake_sources(modules=[("fake_table", source)], results=[("fake_table", {"x": 3})])
    readme = "intro 1.0\n\n<!-- bench:fake_table -->\n| x |\n| 2 |\n<!-- /bench:fake_table -->\n\noutro 2.0\n"

    rendered = rr.render(readme, sources)
    start, end = "<!-- bench:fake_table -->", "<!-- /bench:fake_table -->"
    assert rendered == f"intro 1.0\n\n{start}\n\n| x |\n|---|\n| 3 |\n\n{end}\n\noutro 2.0\n"
    assert rr.render(rendered, sources) == rendered


def test_a_marker_without_a_source_or_its_json_fails_by_name(rr, fake_sources):
    sources = fake_sources(modules=[("no_json", "def render_markdown(result):\n    return ''\n")])
    with pytest.raises(rr.RenderError, match=r"<!-- bench:no_json -->: no results file .*no_json\.json"):
        rr.render("<!-- bench:no_json -->\nold table\n<!-- /bench:no_json -->\n", sources)
    with pytest.raises(rr.RenderError, match=r"<!-- bench:unknown -->: no source"):
        rr.render("<!-- bench:unknown -->\n<!-- /bench:unknown -->\n", sources)


def test_a_module_without_render_markdown_fails_by_name(rr, fake_sources):
    sources = fake_sources(modules=[("no_renderer", "X = 1\n")], results=[("no_renderer", {})])
    readme = "<!-- bench:no_renderer -->\n<!-- /bench:no_renderer -->\n"
    with pytest.raises(rr.RenderError, match=r"<!-- bench:no_renderer -->: no_renderer has no MODE"):
        rr.render(readme, sources)


def test_a_json_of_another_schema_fails_by_name(rr, fake_sources):
    source = "def render_markdown(result):\n    return result['median_ms']\n"
    sources = fake_sources(modules=[("old_schema", source)], results=[("old_schema", {"median_s": 1})])
    readme = "<!-- bench:old_schema -->\n<!-- /bench:old_schema -->\n"
    with pytest.raises(rr.RenderError, match=r"<!-- bench:old_schema -->: rendering failed .*KeyError"):
        rr.render(readme, sources)


@pytest.mark.parametrize(
    "readme",
    [
        "<!-- bench:a -->\ntext\n",  # never closed
        "<!-- bench:a -->\n<!-- bench:b -->\n<!-- /bench:b -->\n<!-- /bench:a -->\n",  # nested
        "text\n<!-- /bench:a -->\n",  # closed, never opened
    ],
)
def test_unpaired_markers_fail(rr, readme):
    with pytest.raises(rr.RenderError, match="bench:a"):
        rr.render(readme, {})
