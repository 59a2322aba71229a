"""The folder layout is the architecture: imports only go down, and the pairs that must not
know each other do not. Read from the source (every import, function-level ones included),
so a new upward import fails here before it tangles the package."""

from __future__ import annotations

import ast
import pathlib

import workerpool

PACKAGE = pathlib.Path(workerpool.__file__).parent
# Lowest first; a module may import its own layer's and lower ones.
LAYERS = [
    {"errors", "modules", "memfd", "malloc", "config", "signature", "tensors", "request_ids"},
    {"ipc", "frameworks"},
    {"sources", "publishing"},
    {"specs", "pool", "workers"},
    {"serving"},
    {"serve", "scoring", "ray", "cli", "demo", "__init__", "__main__"},
]
FORBIDDEN = {  # (importer, imported): neither of a pair may know the other
    ("ipc", "frameworks"), ("frameworks", "ipc"), ("workers", "pool"),
    ("scoring", "serve"), ("ray", "serve"), ("serving", "serve"),
}


def top(module: str) -> str:
    return module.split(".")[0]


def imports_of(path: pathlib.Path) -> set[str]:
    """The workerpool top-level names a module imports (relative imports resolved)."""
    package = path.relative_to(PACKAGE).parts[:-1]  # the package the module is in
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                names = base + (node.module.split(".") if node.module else [])
                if names:
                    found.add(names[0])
                else:  # from .. import x: x is a module, or the package's own attribute
                    found.update(alias.name for alias in node.names if is_module(alias.name))
            elif node.module and top(node.module) == "workerpool":
                rest = node.module.split(".")[1:]
                found.update(rest[:1] or [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if top(alias.name) == "workerpool" and "." in alias.name:
                    found.add(alias.name.split(".")[1])
    return found


def is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def layer_of(name: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if name in members)


def test_every_module_imports_only_its_layer_and_below():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        owner = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for imported in imports_of(path) - {owner}:
            if layer_of(imported) > layer_of(owner) or (owner, imported) in FORBIDDEN:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert wrong == []


def test_every_top_level_module_and_package_has_a_layer():
    names = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert names - set().union(*LAYERS) == set()
