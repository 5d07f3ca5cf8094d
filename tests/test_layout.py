"""The package's shape, read from its source with ``ast`` (no imports run): imports flow one way,
data -> reference -> training -> eval -> jobs, and two seams stay clean.

- ``dpo_ray.config`` never imports Ray: configs are built and checked before Ray starts, and
  anywhere (a laptop without a cluster, a unit test).
- ``dpo_ray.eval`` never imports ``dpo_ray.training``: evaluation reads models and run
  directories, so it works on any model, trained here or not. The held-out split rule both use
  lives in the data layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_ray"

# Data-flow order. A module may import its own layer and the layers before it, never a later one.
LAYERS = [
    {"config", "console", "models", "logps", "losses", "assets", "ray_env", "storage", "tracking", "trl_names"},  # shared pure parts, Ray and storage access
    {"data"},
    {"preflight"},  # checks paths and sources before a stage starts: reads data, not models
    {"reference"},
    {"training"},
    {"eval"},
    {"pipeline", "sweep", "recipes", "cli", "cli_fields", "__main__", "__init__"},  # jobs: wire the stages together
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """dpo_ray.data.sources -> data; dpo_ray -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names (function-level ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # "from dpo_ray import training" names the subpackage in the alias
            if node.module == "dpo_ray":
                found += [(node.lineno, f"dpo_ray.{alias.name}") for alias in node.names]
    return found


def _package_modules(package: Path):
    for path in sorted(package.rglob("*.py")):
        module = ".".join(("dpo_ray", *path.relative_to(package).with_suffix("").parts))
        yield module.removesuffix(".__init__") if module != "dpo_ray.__init__" else "dpo_ray", path


def layout_violations(package: Path = PACKAGE) -> list[str]:
    problems = []
    for module, path in _package_modules(package):
        unit = _unit(module)
        assert unit in RANK, f"{path}: new top-level module {unit!r}: place it in LAYERS"
        for line, target in _imports(path):
            where = f"{path.relative_to(package.parent)}:{line}"
            if unit == "config" and (target == "ray" or target.startswith("ray.")):
                problems.append(f"{where}: dpo_ray.config imports {target}")
            if not target.startswith("dpo_ray.") or target == "dpo_ray":
                continue
            to = _unit(target)
            if unit == "eval" and to == "training":
                problems.append(f"{where}: dpo_ray.eval imports {target}")
            if RANK[to] > RANK[unit]:
                problems.append(f"{where}: {module} ({unit}) imports {target}, a later stage ({to})")
    return problems


def test_imports_follow_the_data_flow():
    assert layout_violations() == []


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    """The rules above fail on the imports they forbid (the check itself can fail)."""
    fake = tmp_path / "dpo_ray"
    for name, source in {
        "__init__.py": "",
        "config.py": "def pools():\n    import ray.data\n",
        "eval/__init__.py": "",
        "eval/pairs.py": "from dpo_ray.training.trainer import train\n",
        "data/__init__.py": "",
        "data/sources.py": "from dpo_ray.reference import cache\n",
        "training/__init__.py": "",
        "reference/__init__.py": "",
    }.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(source)
    found = "\n".join(layout_violations(fake))
    assert "dpo_ray.config imports ray.data" in found
    assert "dpo_ray.eval imports dpo_ray.training.trainer" in found
    assert "dpo_ray.data.sources (data) imports dpo_ray.reference" in found
