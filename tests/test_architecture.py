"""The module map holds: the library never imports the jobs, no import circles (lazy imports inside
functions included), no module reaches into another's private names, the engine never imports a
task and the tasks never import each other, no source file grows past ~600 lines, the jobs import
project modules at module level (the few exceptions listed with their reason), a `Task` is handed
explicit values (never an object holding it) and keeps few methods, and every library module has
its test file at the matching path (`dfm/a/b.py` -> `tests/dfm/a/test_b.py`)."""
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
    assert "experiments.engine.training" in EDGES["experiments.text.task"]
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


# Project imports (`dfm`, `experiments`) kept inside a function in experiments/, per (file, function):
# the modules imported there and why. Every other project import of the jobs is at module level, so
# a module's dependencies are read at its top; jax and the rest of the library at module level are
# fine in the jobs.
CLI_START_UP = ("the console script's start-up: `dfm --help` and `dfm config list` import only the stdlib-only "
                "config module; these pull numpy / jax (the registry imports both tasks)")
LAZY_PROJECT_IMPORTS = {
    ("experiments/cli.py", "main"): (
        {"dfm.io", "dfm.sharding", "dfm.train.preemption", "experiments.engine.graph", "experiments.engine.rundir",
         "experiments.engine.task"}, CLI_START_UP),
    ("experiments/cli.py", "_load_job"): ({"experiments.registry"}, CLI_START_UP),
    ("experiments/cli.py", "_changes"): ({"experiments.registry"}, CLI_START_UP),
    ("experiments/cli.py", "_plan_command"): ({"experiments.engine.plan"}, CLI_START_UP),
    ("experiments/cli.py", "_run_command"): (
        {"dfm.sharding", "experiments.engine.evaluation", "experiments.engine.graph", "experiments.engine.pipeline",
         "experiments.engine.training"}, CLI_START_UP),
    ("experiments/cli.py", "_run_seeds"): (
        {"dfm.sharding", "experiments.engine.graph", "experiments.engine.pipeline", "experiments.engine.seeds",
         "experiments.registry"}, CLI_START_UP),
    ("experiments/cli.py", "_run_sweep"): (
        {"dfm.sharding", "experiments.engine.graph", "experiments.engine.pipeline", "experiments.engine.sweep",
         "experiments.registry"}, CLI_START_UP),
}
# Packages of experiments/ not held to the rule, and why (none).
LAZY_IMPORTS_NOT_CHECKED: dict[str, str] = {}


def _function_level_project_imports() -> dict[tuple[str, str], set[str]]:
    """``{(file, outermost function): {imported project module}}`` of every import statement inside
    a function (at any depth; a nested function's count for the function holding it) in experiments/."""
    found: dict[tuple[str, str], set[str]] = {}

    def visit(node, rel, function):
        for child in ast.iter_child_nodes(node):
            if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, rel, child.name)
                continue
            if function is not None and isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif function is not None and isinstance(child, ast.ImportFrom) and not child.level:
                base = child.module or ""
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            else:
                visit(child, rel, function)
                continue
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    found.setdefault((rel, function), set()).add(name)

    for path in sorted((ROOT / "experiments").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if not rel.startswith(tuple(LAZY_IMPORTS_NOT_CHECKED)):
            visit(ast.parse(path.read_text(encoding="utf-8")), rel, None)
    return found


def test_the_jobs_import_project_modules_at_module_level():
    found = _function_level_project_imports()
    unlisted = {f"{f}:{fn}": sorted(mods - LAZY_PROJECT_IMPORTS.get((f, fn), (set(), ""))[0])
                for (f, fn), mods in found.items() if mods - LAZY_PROJECT_IMPORTS.get((f, fn), (set(), ""))[0]}
    assert not unlisted, (f"imports inside functions (move them to the module's top, or list them in "
                          f"LAZY_PROJECT_IMPORTS with the reason): {unlisted}")
    stale = {f"{f}:{fn}": sorted(mods - found.get((f, fn), set()))
             for (f, fn), (mods, _) in LAZY_PROJECT_IMPORTS.items() if mods - found.get((f, fn), set())}
    assert not stale, f"listed in LAZY_PROJECT_IMPORTS but no longer imported there (remove them): {stale}"
    assert all(why for _, why in LAZY_PROJECT_IMPORTS.values())


MAX_TASK_METHODS = 12


def test_a_task_gets_explicit_values_and_has_few_methods():
    """`Task` (experiments/engine/task.py) keeps at most `MAX_TASK_METHODS` methods, and no function of
    the jobs takes a context (``ctx``): stages and task methods receive the config, the run directory,
    the data and the options they use, never an object that holds the task."""
    tree = ast.parse((ROOT / "experiments" / "engine" / "task.py").read_text(encoding="utf-8"))
    task = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Task")
    methods = [n.name for n in task.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert 0 < len(methods) <= MAX_TASK_METHODS, methods
    takes_context = []
    for path in sorted((ROOT / "experiments").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                if "ctx" in names:
                    takes_context.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not takes_context, takes_context


# Library modules without a test file at the matching path, and why. Package `__init__.py` files are
# exempt as a rule (re-exports only; `dfm/__init__.py`'s lazy submodule list is built by pdoc in
# tests/test_docs.py).
NO_TEST_FILE = {
    "dfm/tabular/_einsum.py": "private helper of dfm.tabular, exercised by tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/_validate.py": "private helper of dfm.tabular, exercised by tests/dfm/tabular/test_tabular.py",
    "dfm/progress.py": "terminal progress display only (tqdm or a line per update); no test yet, tests "
                       "run with progress=False",
}
# Modules still tested inside another module's test file (the file named here): each is the place to
# split a test file out when that module next changes. The named file must exist.
TESTED_IN = {
    "dfm/decentral/arguments.py": "tests/dfm/decentral/test_partition.py",
    "dfm/decentral/features.py": "tests/dfm/decentral/test_partition.py",
    "dfm/decentral/learned_router.py": "tests/dfm/decentral/test_routers.py",
    "dfm/hf/configs.py": "tests/dfm/hf/test_parity.py",
    "dfm/hf/load.py": "tests/dfm/hf/test_parity.py",
    "dfm/hf/mapping.py": "tests/dfm/hf/test_load_errors.py",
    "dfm/hf/parity_tools.py": "tests/dfm/hf/test_parity.py",
    "dfm/hf/safetensors_io.py": "tests/dfm/hf/test_load_errors.py",
    "dfm/hf/tokenizers.py": "tests/dfm/hf/test_parity.py",
    "dfm/hf/vision_configs.py": "tests/dfm/hf/test_vision_parity.py",
    "dfm/hf/vision_io.py": "tests/dfm/hf/test_vision_parity.py",
    "dfm/hf/weights.py": "tests/dfm/hf/test_load_errors.py",
    "dfm/inference.py": "tests/integration/test_decentralized_model.py",
    "dfm/io.py": "tests/integration/test_disk_faults.py",
    "dfm/models/classifier.py": "tests/dfm/models/test_decoder.py",
    "dfm/models/config.py": "tests/dfm/models/test_decoder.py",
    "dfm/models/hf.py": "tests/dfm/models/test_decoder.py",
    "dfm/models/internvit.py": "tests/dfm/models/test_vision.py",
    "dfm/models/layers.py": "tests/dfm/models/test_attention.py",
    "dfm/models/layout.py": "tests/dfm/train/test_scale_knobs.py",
    "dfm/models/numerics.py": "tests/dfm/train/test_scale_knobs.py",
    "dfm/models/projector.py": "tests/dfm/models/test_multimodal.py",
    "dfm/sharding/mesh.py": "tests/dfm/sharding/test_placement.py",
    "dfm/sharding/rules.py": "tests/dfm/sharding/test_placement.py",
    "dfm/tabular/distributions.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/info.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/kernels.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/losses.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/mixtures.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/paths.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/posteriors.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/tabular/states.py": "tests/dfm/tabular/test_tabular.py",
    "dfm/train/checkpoint.py": "tests/dfm/train/test_loop.py",
    "dfm/train/optim.py": "tests/dfm/train/test_loop.py",
    "dfm/train/steps.py": "tests/dfm/train/test_scale_knobs.py",
}


def _test_path(module: Path) -> Path:
    rel = module.relative_to(ROOT)
    return ROOT / "tests" / rel.parent / f"test_{rel.name}"


def test_every_library_module_has_its_test_file():
    library = [p for p in sorted((ROOT / "dfm").rglob("*.py")) if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in library if not _test_path(p).exists()
               and str(p.relative_to(ROOT)) not in NO_TEST_FILE and str(p.relative_to(ROOT)) not in TESTED_IN]
    assert not missing, f"no tests/<same path>/test_<name>.py (add one, or say why in NO_TEST_FILE): {missing}"
    stale = [m for m in {**NO_TEST_FILE, **TESTED_IN} if not (ROOT / m).exists() or _test_path(ROOT / m).exists()]
    assert not stale, f"listed but gone, or now with its own test file (remove from the list): {stale}"
    gone = {m: t for m, t in TESTED_IN.items() if not (ROOT / t).exists()}
    assert not gone, f"the named test file does not exist: {gone}"


def test_every_test_file_is_under_a_known_folder():
    allowed = {"dfm", "experiments", "proofs_check", "benchmarks", "integration"}
    tests = ROOT / "tests"
    stray = [str(p.relative_to(tests)) for p in tests.rglob("test_*.py")
             if p.parent != tests and p.relative_to(tests).parts[0] not in allowed]
    assert not stray, stray
