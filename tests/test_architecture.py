"""The import layering ARCHITECTURE.md promises, read from the source (no imports run)."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = {"clipdex": "clipdex", "retrieval": "clipdex.retrieval", "indexer": "clipdex.indexer",
             "app": "clipdex.app", "server": "clipdex.server", "data_manifests": "clipdex.data_manifests"}
RETRIEVAL_PARTS = ("models", "store", "answer", "training", "evaluation")
LANCEDB_MODULE = "clipdex.retrieval.store.record"


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, ns in NAMESPACE.items():
        for f in (REPO / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([ns, *parts])] = f
    return mods


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def _part(module: str) -> str:
    """The architectural unit a module belongs to: a retrieval subpackage, a top package, or a root module."""
    p = module.split(".")
    if len(p) >= 3 and p[1] == "retrieval" and p[2] in RETRIEVAL_PARTS:
        return ".".join(p[:3])
    if len(p) >= 2 and p[1] in ("commands", "indexer", "app", "server", "data_manifests", "retrieval"):
        return ".".join(p[:2])
    return module


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = collections.defaultdict(set)
    imports = {m: _imports(f) for m, f in mods.items()}
    for m, names in imports.items():
        for n in names:
            if n.startswith("clipdex") and n in mods and _part(n) != _part(m):
                edges[_part(m)].add(_part(n))
    return edges, imports


def test_no_cycles_between_parts():
    edges, _ = _graph()
    done, cycles = {}, []

    def visit(u, stack):
        done[u] = "open"
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if done.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in done:
                visit(v, stack)
        stack.pop()
        done[u] = "closed"

    for u in sorted(edges):
        if u not in done:
            visit(u, [])
    assert not cycles, cycles


def test_only_the_store_record_calls_lancedb():
    _, imports = _graph()
    callers = sorted(m for m, names in imports.items() if any(n.split(".")[0] == "lancedb" for n in names))
    assert callers == [LANCEDB_MODULE]


def test_library_never_imports_commands_and_data_manifests_never_imports_retrieval():
    _, imports = _graph()
    wrong = [(m, n) for m, names in imports.items() for n in names
             if (n.startswith("clipdex.commands") and not m.startswith(("clipdex.commands", "clipdex.cli")))
             or (m.startswith("clipdex.data_manifests") and n.startswith("clipdex.retrieval"))]
    assert not wrong, wrong


def test_only_the_server_and_its_command_import_the_web_framework():
    _, imports = _graph()
    callers = sorted(m for m, names in imports.items()
                     if any(n.split(".")[0] in ("fastapi", "uvicorn") for n in names))
    assert all(m.startswith("clipdex.server") or m == "clipdex.commands.serve" for m in callers), callers
    streamlit = sorted(m for m, names in imports.items() if any(n.split(".")[0] == "streamlit" for n in names))
    assert not [m for m in streamlit if m.startswith("clipdex.server") or m in (
        "clipdex.app.collections", "clipdex.app.inputs", "clipdex.app.jobs")], streamlit


def test_only_the_onnx_modules_import_onnxruntime():
    _, imports = _graph()
    callers = sorted(m for m, names in imports.items() if any(n.split(".")[0] == "onnxruntime" for n in names))
    assert callers == ["clipdex.retrieval.models.onnx_export", "clipdex.retrieval.models.onnx_runtime"], callers


def test_only_the_ray_engine_imports_ray_and_only_the_store_record_imports_lance():
    _, imports = _graph()
    ray = sorted(m for m, names in imports.items() if any(n.split(".")[0] == "ray" for n in names))
    assert ray == ["clipdex.indexer.ray_engine"], ray
    lance = sorted(m for m, names in imports.items() if any(n.split(".")[0] == "lance" for n in names))
    assert lance == [LANCEDB_MODULE], lance


def test_library_modules_do_not_parse_arguments():
    _, imports = _graph()
    parsing = sorted(m for m, names in imports.items() if "argparse" in names
                     and not m.startswith(("clipdex.commands", "clipdex.cli")))
    assert not parsing, parsing
