"""README.md's benchmark tables are generated from benchmarks/results/*.json (`benchmarks/render_readme.py`):
the README as committed is what the JSON renders, and a marker that cannot be rendered fails by name."""

import json

import pytest
from conftest import ROOT

# The generated regions this work put in README.md; others may be added, none may silently disappear.
EXPECTED = {
    "block_bench", "family_bench", "ep_bench", "balance_study", "export_comparison", "model_step_bench",
    "mfu_bench", "profile_step", "loss_bench", "packing_bench", "memory_bench", "inference_bench",
    "quality_study",
}  # fmt: skip


@pytest.fixture
def rr(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import `harness` as top-level
    import render_readme

    return render_readme


def fake_root(tmp_path, modules=(), results=()):
    """A repository root with `benchmarks/NAME.py` for each (name, source) and a JSON per (name, record)."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name, source in modules:
        (tmp_path / "benchmarks" / f"{name}.py").write_text(source)
    for name, record in results:
        (tmp_path / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(record))
    return tmp_path


def test_readme_tables_match_their_json(rr):
    readme = (ROOT / "README.md").read_text()
    names = {name for name, _, _ in rr.marker_spans(readme)}
    assert EXPECTED <= names, f"README.md lost the markers of {sorted(EXPECTED - names)}"
    rendered = rr.render(readme, ROOT)
    assert rendered == readme, (
        "README.md's benchmark tables differ from benchmarks/results/*.json; run "
        "`python benchmarks/render_readme.py`:\n" + rr.diff(readme, rendered, ROOT / "README.md")
    )


def test_check_fails_on_a_stale_table_and_passes_on_a_fresh_one(rr, tmp_path, capsys):
    marked = rr.render("<!-- bench:balance_study -->\n<!-- /bench:balance_study -->\n", ROOT)
    fresh, stale = tmp_path / "fresh.md", tmp_path / "stale.md"
    fresh.write_text(marked)
    stale.write_text(marked.replace("| 1.221 |", "| 1.222 |"))
    assert "| 1.221 |" in marked  # plain's codegen loss, so the stale copy really differs

    assert rr.main(["--check", "--readme", str(fresh)]) == 0
    capsys.readouterr()
    assert rr.main(["--check", "--readme", str(stale)]) == 1
    out = capsys.readouterr().out
    assert "-| proportional + token mean (plain) | 1.222 |" in out
    assert "+| proportional + token mean (plain) | 1.221 |" in out
    assert stale.read_text() != marked  # --check never writes


def test_only_the_text_between_markers_is_rewritten(rr, tmp_path):
    source = "def render_markdown(result):\n    return f\"| x |\\n|---|\\n| {result['x']} |\"\n"
    root = fake_root(tmp_path, modules=[("fake_table", source)], results=[("fake_table", {"x": 3})])
    readme = "intro 1.0\n\n<!-- bench:fake_table -->\n| x |\n| 2 |\n<!-- /bench:fake_table -->\n\noutro 2.0\n"

    rendered = rr.render(readme, root)
    start, end = "<!-- bench:fake_table -->", "<!-- /bench:fake_table -->"
    assert rendered == f"intro 1.0\n\n{start}\n\n| x |\n|---|\n| 3 |\n\n{end}\n\noutro 2.0\n"
    assert rr.render(rendered, root) == rendered


def test_a_marker_without_its_json_fails_by_name(rr, tmp_path):
    root = fake_root(tmp_path)  # no results at all
    readme = "<!-- bench:block_bench -->\nold table\n<!-- /bench:block_bench -->\n"
    with pytest.raises(
        rr.RenderError, match=r"<!-- bench:block_bench -->: no results file .*block_bench\.json"
    ):
        rr.render(readme, root)


def test_a_module_without_render_markdown_fails_by_name(rr, tmp_path):
    root = fake_root(tmp_path, modules=[("no_renderer", "X = 1\n")], results=[("no_renderer", {})])
    readme = "<!-- bench:no_renderer -->\n<!-- /bench:no_renderer -->\n"
    with pytest.raises(
        rr.RenderError, match=r"<!-- bench:no_renderer -->: .*no_renderer\.py has no render_markdown"
    ):
        rr.render(readme, root)


def test_a_json_of_another_schema_fails_by_name(rr, tmp_path):
    source = "def render_markdown(result):\n    return result['median_ms']\n"
    root = fake_root(tmp_path, modules=[("old_schema", source)], results=[("old_schema", {"median_s": 1})])
    readme = "<!-- bench:old_schema -->\n<!-- /bench:old_schema -->\n"
    with pytest.raises(rr.RenderError, match=r"<!-- bench:old_schema -->: render_markdown failed .*KeyError"):
        rr.render(readme, root)


@pytest.mark.parametrize(
    "readme",
    [
        "<!-- bench:a -->\ntext\n",  # never closed
        "<!-- bench:a -->\n<!-- bench:b -->\n<!-- /bench:b -->\n<!-- /bench:a -->\n",  # nested
        "text\n<!-- /bench:a -->\n",  # closed, never opened
    ],
)
def test_unpaired_markers_fail(rr, tmp_path, readme):
    with pytest.raises(rr.RenderError, match="bench:a"):
        rr.render(readme, fake_root(tmp_path))
