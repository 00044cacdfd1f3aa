"""The extras in the package's metadata say what each optional feature imports.

The extras are read from the installed metadata (``Requires-Dist`` with its
``extra == "..."`` markers), as pip sees them; the imports from the package's source
with an AST scan. A wrong extra in an ``optional_import`` call, a lazy import that
bypasses it, or a README table that differs from ``setup.cfg`` fails here.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "captum_faithful"
SELF = "captum-faithful"

# import name -> distribution, for modules this environment does not have installed
# (importlib.metadata.packages_distributions() answers for the installed ones)
DISTRIBUTION_OF = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "sae_lens": "sae-lens",
    "transformer_lens": "transformer-lens",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "pandas": "pandas",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "torchvision": "torchvision",
    "pyarrow": "pyarrow",
}
FEATURE_EXTRAS = ("vit", "lm", "sae", "progress", "evaluate")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """The core requirements and the extras' requirements (canonical names)."""
    meta = metadata.metadata(SELF)
    extras = {canonicalize_name(e) for e in meta.get_all("Provides-Extra") or []}
    core: set[str] = set()
    per_extra: dict[str, set[str]] = defaultdict(set)
    for line in meta.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if requirement.marker is None:
            core.add(name)
            continue
        for extra in extras:
            if requirement.marker.evaluate({"extra": extra}):
                per_extra[extra].add(name)
    return core, {e: per_extra.get(e, set()) for e in extras}


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distribution(module: str) -> str:
    top = module.split(".")[0]
    if top == "captum_faithful":
        return SELF
    installed = installed_distributions().get(top)
    if installed:
        return canonicalize_name(installed[0])
    if top in DISTRIBUTION_OF:
        return canonicalize_name(DISTRIBUTION_OF[top])
    raise AssertionError(
        f"add {top!r} to DISTRIBUTION_OF (import name -> distribution)"
    )


@functools.cache
def sources() -> list[tuple[Path, ast.Module]]:
    return [
        (p, ast.parse(p.read_text(encoding="utf-8"))) for p in PACKAGE.rglob("*.py")
    ]


def optional_imports(tree: ast.Module) -> list[tuple[str, str, int]]:
    """``(module, extra, line)`` of every ``optional_import("module", "extra")``."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            == "optional_import"
        ):
            module, extra = (ast.literal_eval(a) for a in node.args)
            found.append((module, extra, node.lineno))
    return found


def function_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """Modules imported with an import statement inside a function body."""
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((node.module, node.lineno))
    return found


def extras_table(path: Path) -> dict[str, set[str]]:
    """The rows of the ``| extra | for | installs |`` table in a Markdown file."""
    text = path.read_text(encoding="utf-8")
    table = text.split("| extra | for | installs |\n", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (`\w+`|\(none\)) \| [^|\n]+ \| ([^|\n]+) \|$", table, re.M)
    return {
        name.strip("`"): {canonicalize_name(d) for d in installs.split(", ")}
        for name, installs in rows
    }


def test_the_metadata_parser_reads_markers():
    """The marker evaluation the other tests rely on, on hand-written lines."""
    requirement = Requirement('pandas>=1.5; extra == "evaluate"')
    assert requirement.marker.evaluate({"extra": "evaluate"})
    assert not requirement.marker.evaluate({"extra": "demo"})
    assert distribution("yaml.constructor") in ("pyyaml", canonicalize_name("PyYAML"))
    assert distribution("sklearn.datasets") == "scikit-learn"
    assert distribution("captum_faithful.metrics") == SELF


def test_every_optional_import_names_an_extra_that_provides_it():
    core, extras = declared()
    calls = [(p, *call) for p, tree in sources() for call in optional_imports(tree)]
    assert len(calls) > 20  # the scan sees the package's calls
    wrong = []
    for path, module, extra, line in calls:
        where = f"{path.relative_to(ROOT)}:{line}"
        dist = distribution(module)
        if extra not in extras:
            wrong.append(f"{where}: {module!r} names [{extra}], not an extra")
        elif dist != SELF and dist not in core and dist not in extras[extra]:
            wrong.append(f"{where}: [{extra}] does not list {dist} ({module!r})")
    assert not wrong, "\n".join(wrong)


def test_the_demo_names_its_own_extra_and_evaluation_the_evaluate_extra():
    """A user running the demo is told to install ``[demo]``, one running
    ``evaluate`` ``[evaluate]``: one extra each, never one missing piece at a time."""
    for path, tree in sources():
        part = path.relative_to(PACKAGE).parts[0]
        expected = {"demo": "demo", "evaluation": "evaluate"}.get(part)
        for module, extra, line in optional_imports(tree):
            if expected is not None:
                assert extra == expected, f"{path.name}:{line}: {module} -> [{extra}]"


#: Modules used only when they happen to be installed, with a fallback otherwise
#: (no feature needs them, so no extra names them): module -> what happens without.
USED_WHEN_INSTALLED = {
    "pyarrow": "evaluate writes CSV instead of Parquet, and reading a Parquet run "
    "says to install pyarrow",
}


def test_no_lazy_import_bypasses_optional_import():
    """Inside a function, a third-party module outside the core requirements is
    imported only through ``optional_import`` (which names the extra), unless it is
    one of :data:`USED_WHEN_INSTALLED`."""
    core, _ = declared()
    stdlib = set(sys.stdlib_module_names)
    bypassing = []
    for path, tree in sources():
        for module, line in function_level_imports(tree):
            top = module.split(".")[0]
            if top in stdlib or distribution(module) in core | {SELF}:
                continue
            if top in USED_WHEN_INSTALLED:
                continue
            bypassing.append(f"{path.relative_to(ROOT)}:{line}: import {module}")
    assert not bypassing, "\n".join(bypassing)


def test_extras_named_in_messages_and_docstrings_exist():
    """``pip install captum-faithful[x]`` and "the ``x`` extra" in any string of the
    package name a declared extra."""
    _, extras = declared()
    named = []
    for _, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
                named += re.findall(r"captum-faithful\[([\w,]+)\]", text)
                named += re.findall(r"the ``?(\w+)``? extra", text)
    names = {n for group in named for n in group.split(",")}
    assert "evaluate" in names  # the scan sees the docstrings
    assert names <= set(extras), names - set(extras)


def test_the_demo_and_all_extras_hold_every_feature():
    """The demo trains a ViT (transformers), SAEs (sae-lens), a GPT-2 with its own
    tokenizer (tokenizers) and scores with ``evaluate``: ``[demo]`` alone must cover
    every feature extra, and ``[all]`` every extra but the tools (docs, test)."""
    _, extras = declared()
    assert set(FEATURE_EXTRAS) | {"demo", "all", "docs", "test"} == set(extras)
    features = set().union(*(extras[e] for e in FEATURE_EXTRAS))
    assert features <= extras["demo"], features - extras["demo"]
    assert extras["all"] == features | extras["demo"]


@pytest.mark.parametrize("document", ["README.md", "docs/index.md"])
def test_the_extras_table_lists_the_extras_as_declared(document):
    core, extras = declared()
    table = extras_table(ROOT / document)
    assert table.pop("(none)") == core
    assert table == extras


@pytest.mark.parametrize("document", ["README.md", "docs/index.md", "CONTRIBUTING.md"])
def test_pip_commands_name_declared_extras(document):
    """``pip install ".[all,test]"`` and ``"...whl[evaluate]"`` in the install
    instructions name extras the metadata declares."""
    _, extras = declared()
    text = (ROOT / document).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if "pip install" in line]
    named = re.findall(r"[.\w]\[([\w,]+)\]", "\n".join(lines))
    assert named, f"{document} shows no pip install with an extra"
    names = {n for group in named for n in group.split(",")}
    assert names <= set(extras), names - set(extras)
