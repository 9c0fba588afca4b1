"""House rule 1: the core is plain PyTorch - no ray, no mlflow; Ray lives in launch/, MLflow in
tracking/; and modules meet through public names."""
import ast
from pathlib import Path

import cnd_ray

CORE = ["config.py", "diffusion.py", "objective.py", "engine.py", "checkpoint.py", "models", "generate.py",
        "distributed.py", "monitor.py", "vae.py", "weights.py", "storage.py", "evaluate", "fairness"]
FORBIDDEN = {"ray", "mlflow"}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def test_core_imports_neither_ray_nor_mlflow():
    root = Path(cnd_ray.__file__).parent
    files = []
    for entry in CORE:
        p = root / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    assert len(files) >= 8
    bad = {str(f.relative_to(root)): sorted(set(_imports(f)) & FORBIDDEN) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_ray_is_imported_in_launch_only_and_mlflow_in_tracking_only():
    """The layers are folders: every module that imports Ray (at its top or inside a function) is in
    cnd_ray/launch/, every one that imports MLflow in cnd_ray/tracking/ (DESIGN.md, "Layers")."""
    root = Path(cnd_ray.__file__).parent
    where = {"ray": "launch", "mlflow": "tracking"}
    found = {lib: set() for lib in where}
    for path in sorted(root.rglob("*.py")):
        for lib in set(_imports(path)) & set(where):
            found[lib].add(path.relative_to(root).parts[0])
    assert found == {"ray": {"launch"}, "mlflow": {"tracking"}}


def test_config_is_stdlib_and_yaml_only():
    root = Path(cnd_ray.__file__).parent
    mods = set(_imports(root / "config.py"))
    assert "torch" not in mods and "numpy" not in mods


def _module_of(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(root: Path) -> dict[str, set[str]]:
    """cnd_ray module -> the modules it imports, at the top or inside a function (a lazy import
    is still a dependency): cnd_ray modules by full name, others by their top-level package."""
    graph = {}
    for path in root.rglob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name if a.name.startswith("cnd_ray") else a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("cnd_ray"):
                    # `from cnd_ray.data import stream` names a module; `from cnd_ray.x import f` a name
                    subs = {f"{node.module}.{a.name}" for a in node.names}
                    deps |= {s for s in subs if (root.parent / s.replace(".", "/")).with_suffix(".py").exists()
                             or (root.parent / s.replace(".", "/")).is_dir()} or {node.module}
                else:
                    deps.add(node.module.split(".")[0])
        graph[_module_of(root, path)] = deps
    return graph


def test_core_reaches_neither_ray_nor_mlflow_even_through_other_modules():
    """Following every import, lazy ones included: a core module that imports one which imports
    Ray (say the data stream, for one constant) breaks house rule 1 as surely as importing Ray."""
    root = Path(cnd_ray.__file__).parent
    graph = _graph(root)
    core = {_module_of(root, f) for entry in CORE
            for f in ((root / entry).rglob("*.py") if (root / entry).is_dir() else [root / entry])}
    for start in sorted(core):
        seen, todo, via = {start}, [start], {start: None}
        while todo:
            mod = todo.pop()
            for dep in graph.get(mod, ()):
                if dep in FORBIDDEN:
                    chain, m = [dep], mod
                    while m:
                        chain.append(m)
                        m = via[m]
                    raise AssertionError(" <- ".join(chain))
                if dep.startswith("cnd_ray") and dep not in seen:
                    seen.add(dep)
                    via[dep] = mod
                    todo.append(dep)


def test_no_import_loops_among_the_modules():
    """Lazy imports included: the stream, ingest and the VAE loader once imported each other in a
    ring (ingest -> vae -> stream -> ingest), for a constant and a manifest reader."""
    root = Path(cnd_ray.__file__).parent
    graph = {k: {d for d in v if d.startswith("cnd_ray.")} for k, v in _graph(root).items()}
    state = {}

    def visit(mod, path):
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == "open":
                raise AssertionError(" -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def _private_uses(path: Path) -> list[str]:
    """`from cnd_ray.x import _name` and `x._name` where x is an imported cnd_ray module or name."""
    tree = ast.parse(path.read_text())
    bound, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnd_ray"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
                bound.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("cnd_ray")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return out


def test_no_module_bench_or_test_uses_anothers_private_names():
    """What another module (or a test, or a bench script) needs is public; a private name may change
    without a look outside its file."""
    top = Path(cnd_ray.__file__).parent.parent
    files = [f for d in ("cnd_ray", "bench", "tests") for f in sorted((top / d).rglob("*.py"))]
    assert len(files) > 50
    assert [u for f in files for u in _private_uses(f)] == []
