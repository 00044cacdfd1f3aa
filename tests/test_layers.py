"""The layers of the package point one way: each folder imports only the folders
below it (imports inside functions included; ``captum_faithful`` alone, the root,
is the public front door and may import everything)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "captum_faithful"

BOTTOM = {"_compat", "_typing", "_utils", "_arguments", "_baselines", "_files", "_cli"}
#: Layer -> the layers it may import (besides itself).
MAY_IMPORT = {
    "bottom": set(),
    "models": {"bottom"},  # vit, lm, sae: where things live in a model
    "places": {"bottom", "models"},  # _layers: layer presets, ViT ones via vit
    "metrics": {"bottom", "models", "places"},
    "attr": {"bottom", "models", "places"},
    "evaluation": {"bottom", "models", "places", "metrics", "attr"},
    "studies": {"bottom", "models", "places", "metrics", "attr", "evaluation"},
    "top": {"bottom", "models", "places", "metrics", "attr", "evaluation", "studies"},
}


def layer(parts: tuple[str, ...]) -> str:
    """The layer of ``captum_faithful.<parts>``."""
    head = parts[0] if parts else ""
    if head in BOTTOM:
        return "bottom"
    if head in ("vit", "lm", "sae"):
        return "models"
    if head == "_layers":
        return "places"
    if head in ("metrics", "attr", "evaluation", "studies"):
        return head
    return "top"  # demo, cli, the package root


def imports(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """Every ``captum_faithful`` module ``path`` imports, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = tuple(name.split("."))
            if parts[0] != "captum_faithful":
                continue
            if len(parts) == 1 and isinstance(node, ast.ImportFrom):
                # `from captum_faithful import metrics`: the subpackages named
                parts += (node.names[0].name,)
            found.append((node.lineno, parts[1:]))
    return found


def test_no_import_climbs_a_layer():
    climbing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = path.relative_to(PACKAGE).with_suffix("").parts
        if here == ("__init__",):
            continue  # the root re-exports the public names
        source = layer(here)
        for line, target in imports(path):
            destination = layer(target)
            if destination != source and destination not in MAY_IMPORT[source]:
                climbing.append(
                    f"{path.relative_to(PACKAGE)}:{line} ({source}) imports "
                    f"captum_faithful.{'.'.join(target)} ({destination})"
                )
    assert not climbing, "\n".join(climbing)


def test_only_compat_imports_private_captum_names():
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [alias.name for alias in node.names], []
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] != "captum":
                    continue
                if any(p.startswith("_") for p in parts) or any(
                    n.startswith("_") for n in names
                ):
                    private.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not private, private


def test_the_check_sees_a_climbing_import(tmp_path):
    """The walk above finds function-level imports too."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from captum_faithful.metrics import saco\n")
    assert imports(module) == [(2, ("metrics",))]
    assert "metrics" not in MAY_IMPORT[layer(("attr", "_core", "x"))]
