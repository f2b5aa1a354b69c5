"""House rules read from the code itself (with ``ast``, nothing imported): no function over 80
lines outside bench/, and imports that run one way (model/ and db/ import nothing of worker/ or
dicom_io/, dicom_io/ nothing of worker/, and no two modules import each other, however
indirectly, function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "dicom_io", "model", "db")
MAX_FUNCTION_LINES = 80
FORBIDDEN = {"model": ("worker", "dicom_io"), "db": ("worker", "dicom_io"), "dicom_io": ("worker",)}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (migrations included)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``module`` imports anywhere in its file (``from x import y`` counts
    as ``x.y`` when that is a module, else ``x``); ``if TYPE_CHECKING:`` imports left out."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and "TYPE_CHECKING" in ast.unparse(branch.test) for stmt in branch.body for node in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {name for name in names if name in known and name != module}


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {lines} lines")
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (split them by step; bench/ is exempt):\n  "
                      + "\n  ".join(long))


def test_imports_run_one_way_between_the_packages():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        layer = module.split(".")[0]
        for imported in sorted(_imports(module, path, set(modules))):
            if imported.split(".")[0] in FORBIDDEN.get(layer, ()):
                wrong.append(f"{module} imports {imported}")
    assert not wrong, ("imports against the flow (model/ and db/ import nothing of worker/ or dicom_io/, "
                       "dicom_io/ nothing of worker/):\n  " + "\n  ".join(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package_of(module: str, modules: dict[str, Path]) -> str:
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def test_no_two_modules_import_each_other():
    modules = _modules()
    graph = {module: _imports(module, path, set(modules)) for module, path in modules.items()}
    # a package's __init__ that gathers its own modules is not a cycle with them
    graph = {m: {i for i in imports if not (modules[i].name == "__init__.py" and m.startswith(i + "."))}
             for m, imports in graph.items()}
    cycles = _cycles(graph)
    assert not cycles, ("modules that import each other (directly or through others; make the dependency "
                        "one way):\n  " + "\n  ".join(" <-> ".join(c) for c in cycles))


def test_the_cycle_check_finds_a_cycle_and_the_import_reader_sees_function_level_imports(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from model.metrics import spread\n    import db.session\n")
    assert _imports("model.x", source, {"model.metrics", "db.session", "model"}) == {"model.metrics", "db.session"}
