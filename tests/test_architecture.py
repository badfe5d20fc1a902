"""The module map holds: the library never imports the jobs, no import circles (lazy imports inside
functions included), no module reaches into another's private names, the engine never imports a
task and the tasks never import each other, and no source file grows past ~600 lines."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dfm", "experiments", "proofs_check")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """``[(target module, imported names, line)]`` of every import statement (any depth), and the
    aliases bound to modules (for ``alias._private`` attribute access)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    found.append((a.name, [], node.lineno))
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                    aliases[a.asname or a.name] = sub
                else:
                    found.append((base, [a.name], node.lineno))
    return tree, found, aliases


def _graph():
    edges, private, attrs = {}, [], []
    for name, path in MODULES.items():
        tree, found, aliases = _imports(name, path)
        targets = set()
        for target, names, line in found:
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target != name:
                targets.add(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != name:
                    private.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{n}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                attrs.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
        edges[name] = targets
    return edges, private, attrs


EDGES, PRIVATE_IMPORTS, PRIVATE_ATTRS = _graph()


def _cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert "experiments.engine.stages" in EDGES["experiments.text.task"]
    assert "dfm.decentral.mixing" in EDGES["dfm.decentral.ensemble"]
    assert len(MODULES) > 100


def test_the_library_never_imports_the_jobs():
    bad = [f"{m} -> {t}" for m, ts in EDGES.items() if m.startswith("dfm") for t in ts
           if t.startswith("experiments")]
    assert not bad, bad


def test_no_import_circles():
    assert _cycles(EDGES) == []


def test_no_module_uses_another_modules_private_names():
    assert not PRIVATE_IMPORTS, PRIVATE_IMPORTS
    assert not PRIVATE_ATTRS, PRIVATE_ATTRS


@pytest.mark.parametrize("package, forbidden", [
    ("experiments.engine", ("experiments.text", "experiments.mllm", "experiments.registry", "experiments.cli")),
    ("experiments.text", ("experiments.mllm", "experiments.registry", "experiments.cli")),
    ("experiments.mllm", ("experiments.text", "experiments.registry", "experiments.cli")),
])
def test_engine_and_tasks_stay_apart(package, forbidden):
    bad = [f"{m} -> {t}" for m, ts in EDGES.items() if m.startswith(package) for t in ts
           if t.startswith(forbidden)]
    assert not bad, bad


def test_no_source_file_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long
