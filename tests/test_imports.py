"""The project's modules import each other as a tree: no module imports, at the top or inside a function,
a module that imports it back (directly or through others)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules():
    """module name -> path, for the .py files of the project (not the tests, not hidden or ignored folders)."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("methods/*.py")]
    return {str(f.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__"): f for f in files}


def imports(path, modules):
    """The project modules `path` imports anywhere in it (`from methods.der import X` is methods.der; `from
    methods import X` is the registry, methods/__init__.py, unless X is a submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def cycle(graph):
    """One import circle as a list of modules [a, b, ..., a], or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found


def test_imports_form_a_tree():
    modules = project_modules()
    graph = {m: imports(p, modules) - {m} for m, p in modules.items()}
    assert {"train", "align", "loop", "methods", "methods.refresh", "data", "download"} <= graph.keys()
    assert "methods" in graph["train"] and "loop" in graph["align"]  # the reader sees real edges
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
