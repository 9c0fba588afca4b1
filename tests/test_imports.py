"""House rule 1: the core is plain PyTorch - no ray, no mlflow."""
import ast
from pathlib import Path

import cnd_ray

CORE = ["config.py", "diffusion.py", "objective.py", "engine.py", "checkpoint.py", "models", "generate.py",
        "monitor.py", "vae.py", "storage.py", "evaluate/metrics.py", "evaluate/features.py", "evaluate/fidelity.py"]
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


def test_config_is_stdlib_and_yaml_only():
    root = Path(cnd_ray.__file__).parent
    mods = set(_imports(root / "config.py"))
    assert "torch" not in mods and "numpy" not in mods
