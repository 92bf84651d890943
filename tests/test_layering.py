"""The package's layers, read from its source (ast, nothing imported).

Ray lives only where work is orchestrated: the core, deployment, face detection and evaluation import no
Ray, directly or through the package modules they import (a deployed model, a plain evaluation run without
a cluster). Data preparation does not import deployment (face detection lives in `faces/`, below both);
evaluation does not import training (training may import evaluation's judges); `deploy/` has no import
cycle. Imports inside functions count: they run too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "epd_ray"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def direct_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `name` names in an import statement (package modules resolved, external ones by their
    full dotted name), relative imports included."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules)
    return {m for m in found if m and m != "__future__"}


def with_parents(module: str, modules: dict[str, Path]) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules) | {module}


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: direct_imports(name, path, modules) for name, path in modules.items()}


def reachable(start: str, edges: dict[str, set[str]], modules: dict[str, Path]) -> set[str]:
    """Every module (package or external) that importing `start` imports, through package modules."""
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        for target in edges.get(current, ()):
            for module in with_parents(target, modules):
                if module not in seen:
                    seen.add(module)
                    if module in modules:
                        todo.append(module)
    return seen


def find_cycle(nodes: set[str], edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle among `nodes` by their direct imports, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, set()) & nodes):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _layer(layer: str, modules: dict[str, Path]) -> list[str]:
    prefix = f"{PACKAGE}.{layer}"
    return [m for m in modules if m == prefix or m.startswith(prefix + ".")]


def _violations(layers: tuple[str, ...], forbidden, modules: dict[str, Path], edges) -> list[str]:
    out = []
    for layer in layers:
        for module in _layer(layer, modules):
            bad = sorted(m for m in reachable(module, edges, modules) if forbidden(m))
            if bad:
                out.append(f"{module} imports {', '.join(bad)}")
    return out


def _is_ray(module: str) -> bool:
    return module == "ray" or module.startswith("ray.")


def _within(layer: str):
    prefix = f"{PACKAGE}.{layer}"
    return lambda module: module == prefix or module.startswith(prefix + ".")


def test_ray_free_layers_import_no_ray():
    modules = package_modules()
    assert _violations(("core", "deploy", "faces", "evaluate", "artifacts", "checkpoints"), _is_ray, modules,
                       graph(modules)) == []


def test_data_does_not_import_deploy_and_evaluate_not_train():
    modules = package_modules()
    edges = graph(modules)
    assert _violations(("data",), _within("deploy"), modules, edges) == []
    assert _violations(("evaluate",), _within("train"), modules, edges) == []


def test_deploy_has_no_import_cycle():
    modules = package_modules()
    assert find_cycle(set(_layer("deploy", modules)), graph(modules)) is None


def test_the_checks_see_what_they_look_for(tmp_path):
    """A made-up package with a function-level Ray import two modules down and a cycle: both are found."""
    root = tmp_path / PACKAGE
    for rel, text in {"__init__.py": "", "core/__init__.py": "", "core/a.py": "from epd_ray.core import b\n",
                      "core/b.py": "def f():\n    from ..deploy import c\n",
                      "deploy/__init__.py": "", "deploy/c.py": "from . import d\n",
                      "deploy/d.py": "import ray.train\nfrom epd_ray.deploy.c import x\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    modules = package_modules(root)
    edges = graph(modules)
    assert any(v.startswith("epd_ray.core.a imports") and "ray.train" in v
               for v in _violations(("core",), _is_ray, modules, edges))
    assert set(find_cycle(set(_layer("deploy", modules)), edges)) == {"epd_ray.deploy.c", "epd_ray.deploy.d"}
