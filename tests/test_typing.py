"""The package's type information: the PEP 561 marker ships, and every public
method's annotations resolve at run time (a name used only in an annotation but
never imported would fail here, not in a user's type checker or in Sphinx)."""

from __future__ import annotations

import importlib.resources
import inspect
import typing

import pytest
from torch import Tensor

import captum_faithful
from captum_faithful import attr, metrics


def test_the_package_ships_py_typed():
    marker = importlib.resources.files("captum_faithful") / "py.typed"
    assert marker.is_file()


PUBLIC_CLASSES = [
    getattr(attr, name) for name in attr.__all__ if inspect.isclass(getattr(attr, name))
]


def test_the_public_classes_are_found():
    names = {cls.__name__ for cls in PUBLIC_CLASSES}
    assert {"UnlearnedIntegratedGradients", "TransMM", "FeatureGatedTransMM"} <= names


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_the_annotations_of_attribute_resolve(cls):
    for name in ("__init__", "attribute", "compute_baselines"):
        method = getattr(cls, name, None)
        if method is None:  # compute_baselines: UNI, Layer UNI, AttributionPatching
            continue
        hints = typing.get_type_hints(method)
        assert "return" in hints, f"{cls.__name__}.{name} has no return annotation"
        if name == "attribute":
            parameters = inspect.signature(method).parameters
            annotated = set(hints) - {"return"}
            # every parameter but self is annotated
            assert annotated == set(parameters) - {"self"}, cls.__name__


@pytest.mark.parametrize(
    "function",
    [getattr(metrics, name) for name in metrics.__all__]
    + [captum_faithful.evaluate, captum_faithful.select_gating],
    ids=lambda f: getattr(f, "__name__", repr(f)),
)
def test_the_annotations_of_the_public_functions_resolve(function):
    if inspect.isclass(function):
        function = function.__init__
    hints = typing.get_type_hints(function)
    assert "return" in hints


def test_the_convergence_delta_overloads_are_captums():
    """UNI's attribute has Captum's two overloads: Literal[True] returns the
    attributions and the gap, Literal[False] the attributions alone."""
    overloads = typing.get_overloads(attr.UnlearnedIntegratedGradients.attribute)
    if not overloads:  # typing.get_overloads records them from Python 3.11 on
        pytest.skip("typing.get_overloads needs Python >= 3.11")
    returns = {}
    for overload in overloads:
        hints = typing.get_type_hints(overload)
        flag = typing.get_args(hints["return_convergence_delta"])
        returns[flag] = hints["return"]
    assert set(returns) == {(True,), (False,)}
    assert typing.get_origin(returns[(True,)]) is tuple
    assert typing.get_args(returns[(True,)])[1] is Tensor
