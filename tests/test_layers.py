"""The layering of mtmoe's packages (pyproject's import-linter contract) and the absence of import cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def illegal(graph: grimp.ImportGraph) -> set[tuple[str, str]]:
    layers = [grimp.Layer(*(f"mtmoe.{n.strip()}" for n in layer.split("|"))) for layer in contract_layers()]
    found = graph.find_illegal_dependencies_for_layers(layers=layers)
    return {(d.importer, d.imported) for d in found}


def module_cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                group = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    group.add(top)
                    if top == node:
                        break
                if len(group) > 1:
                    groups.append(group)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return groups


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("mtmoe", cache_dir=None)


def test_import_linter_contract_is_kept():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_no_layer_imports_upward(graph):
    assert illegal(graph) == set()


def test_an_upward_import_is_caught(graph):
    graph = graph.copy() if hasattr(graph, "copy") else grimp.build_graph("mtmoe", cache_dir=None)
    graph.add_import(importer="mtmoe.model.block", imported="mtmoe.train.loop")
    assert ("mtmoe.model", "mtmoe.train") in illegal(graph)


def test_no_module_import_cycle(graph):
    assert module_cycles(graph) == []


def test_a_module_cycle_is_caught(graph):
    graph = graph.copy() if hasattr(graph, "copy") else grimp.build_graph("mtmoe", cache_dir=None)
    graph.add_import(importer="mtmoe.model.walk", imported="mtmoe.model.inject")
    cycles = module_cycles(graph)
    assert any({"mtmoe.model.walk", "mtmoe.model.inject"} <= c for c in cycles)


def test_a_training_process_does_not_import_the_tokenization_stack():
    """Reading shards needs numpy alone; `datasets` and `pyarrow` load only to tokenize."""
    code = "import sys, mtmoe.train.loop; print(sorted({'datasets', 'pyarrow'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[-2] == "[]", proc.stdout
    code = "import sys, mtmoe.data; mtmoe.data.tokenize_tasks; print('datasets' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[-2] == "True", proc.stdout  # the lazy name still resolves
