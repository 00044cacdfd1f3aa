"""Every public class documents its own constructor, and every public name its doc.

``help(cls)`` shows ``__init__``'s docstring, found along the MRO when the class's
own has none: for a subclass of Captum's ``IntegratedGradients`` that is Captum's
text, which lists only ``forward_func``. So a class that defines ``__init__`` must
give it a docstring whose ``Args:`` name every parameter, and the class docstring
must not repeat them (Sphinx renders both, ``autoclass_content = "both"``). A
dataclass's constructor takes its fields: the class docstring's ``Attributes:`` must
name each of them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re

import pytest

MODULES = (
    "captum_faithful",
    "captum_faithful.attr",
    "captum_faithful.metrics",
    "captum_faithful.evaluation",
    "captum_faithful.studies",
    "captum_faithful.sae",
    "captum_faithful.vit",
    "captum_faithful.lm",
    "captum_faithful.demo",
)


def public_names() -> list[tuple[str, str]]:
    return [
        (module, name)
        for module in MODULES
        for name in importlib.import_module(module).__all__
        if name != "__version__"
    ]


def public_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    for module, name in public_names():
        obj = getattr(importlib.import_module(module), name)
        if inspect.isclass(obj):
            classes.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return classes


CLASSES = public_classes()


def section(doc: str, title: str) -> str | None:
    """The text of a Google-style section of a cleaned docstring, or None."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line == f"{title}:")
    except StopIteration:
        return None
    body = []
    for line in lines[start + 1 :]:
        if line and not line[0].isspace():  # the next section, at column 0
            break
        body.append(line)
    return "\n".join(body)


def documented_names(text: str) -> set[str]:
    """The names of the entries of an Args/Attributes section: ``name (Type...):``."""
    indents = [len(line) - len(line.lstrip()) for line in text.splitlines() if line]
    entry = min(indents)
    return {
        match.group(1)
        for line in text.splitlines()
        if (match := re.match(r"(\*{0,2}\w+) \(.*\):", line[entry:]))
        and len(line) - len(line.lstrip()) == entry
    }


def test_there_are_classes_to_check():
    # the modules' __all__ are read, so a class added later is checked too
    assert len(CLASSES) >= 18
    assert any(c.__name__ == "UnlearnedIntegratedGradients" for c in CLASSES.values())


@pytest.mark.parametrize("cls", CLASSES.values(), ids=list(CLASSES))
def test_constructor_is_documented_by_the_class_itself(cls):
    assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} has no docstring"
    if dataclasses.is_dataclass(cls):
        fields = {field.name for field in dataclasses.fields(cls) if field.init}
        attributes = section(cls.__doc__, "Attributes")
        assert attributes is not None, f"{cls.__name__}: no Attributes: section"
        missing = fields - documented_names(attributes)
        assert not missing, f"{cls.__name__}: fields not in Attributes: {missing}"
        return
    assert "__init__" in vars(cls), (
        f"{cls.__name__} inherits __init__ from "
        f"{next(c for c in cls.__mro__ if '__init__' in vars(c)).__qualname__}"
    )
    own = vars(cls)["__init__"].__doc__
    assert own and own.strip(), (
        f"{cls.__name__}.__init__ has no docstring, so help() shows "
        f"{inspect.getdoc(cls.__init__)!r:.60} instead"
    )
    for base in cls.__mro__[1:]:
        init = vars(base).get("__init__")
        if init is not None and init.__doc__:
            assert inspect.cleandoc(own) != inspect.cleandoc(init.__doc__)
    arguments = section(own, "Args")
    assert arguments is not None, f"{cls.__name__}.__init__ has no Args: section"
    parameters = [
        p.name
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = set(parameters) - documented_names(arguments)
    assert not missing, f"{cls.__name__}.__init__ Args miss {sorted(missing)}"
    assert section(cls.__doc__, "Args") is None, (
        f"{cls.__name__}: Args in both the class and __init__ docstrings "
        "(Sphinx would show them twice)"
    )


@pytest.mark.parametrize(
    ("module", "name"), public_names(), ids=[f"{m}.{n}" for m, n in public_names()]
)
def test_every_public_name_has_its_own_documentation(module, name):
    obj = getattr(importlib.import_module(module), name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__doc__ and obj.__doc__.strip(), f"{module}.{name}: no docstring"
        return
    # data: a `#:` comment right above its assignment in the package module itself,
    # which is what autodoc and autosummary read (not in the module it came from)
    source = inspect.getsource(importlib.import_module(module))
    lines = source.splitlines()
    assignments = [
        node
        for node in ast.parse(source).body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and name
        in [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])]
    ]
    assert assignments, f"{name} is not assigned in {module}, so autodoc shows no doc"
    above = lines[assignments[0].lineno - 2].strip()
    assert above.startswith("#:") and above[2:].strip(), (
        f"{module}.{name}: no #: comment above its assignment"
    )


def test_package_docstring_names_every_public_name_outside_the_root():
    import captum_faithful

    root = set(captum_faithful.__all__)
    doc = captum_faithful.__doc__
    for module, name in public_names():
        if module != "captum_faithful" and name not in root:
            assert module in doc, f"the package docstring does not mention {module}"
            assert f"``{name}``" in doc, f"the package docstring omits {module}.{name}"
    assert "re-export" not in doc


def test_no_public_docstring_points_to_a_private_module():
    private = re.compile(r"captum_faithful(?:\.\w+)*\._\w+")
    for module in MODULES:
        doc = importlib.import_module(module).__doc__ or ""
        assert not private.search(doc), (module, private.search(doc).group(0))
