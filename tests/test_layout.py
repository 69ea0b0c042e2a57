"""The package's shape: no import circles (lazy imports inside functions count too), every module imports."""
import ast
import subprocess
import sys
from pathlib import Path

import expandlm

PACKAGE = Path(expandlm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its text (a name imported from a package
    that is a module of its own counts as that module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names]
            found.update(s for s in subs if s in known)
            if not all(s in known for s in subs):
                found.add(target)
    return {m for m in found if m in known and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle_and_only_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circles():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    assert circles(graph) == []


def test_no_import_circles_between_packages():
    """Data flows one way through the stages (docs/DESIGN.md): no package imports one that imports it back,
    through any chain of modules."""
    found = modules()
    stage = lambda name: ".".join(name.split(".")[:2])  # noqa: E731  expandlm.data.vocab → expandlm.data
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        graph.setdefault(stage(name), set()).update(stage(m) for m in imports(name, path, set(found))
                                                   if stage(m) != stage(name))
    assert circles(graph) == []


def test_every_module_imports_on_its_own():
    names = sorted(n for n in modules() if not n.endswith("__main__"))  # __main__ runs the CLI
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    run = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_packages_read_as_the_pipeline():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert stages == {"data", "domains", "model", "training", "adapt", "formats", "merge", "routing",
                      "inference", "serve", "evaluation", "studies"}
