"""The types of the arguments every method and metric shares.

Captum's aliases (``TensorOrTupleOfTensorsGeneric``, ``BaselineType``,
``TargetType``) come through :mod:`captum_faithful._compat`, the one importer of
Captum's private names; this module adds what the package accepts beyond them:
``baselines`` also takes a preset name (``"zero"``, ``"mean"``, ``"blur"``) or a
callable ``input -> tensor``, alone or per input in a tuple
(:func:`captum_faithful._arguments.format_baselines`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from torch import Tensor

from captum_faithful._compat import (
    BaselineType,
    TargetType,
    TensorOrTupleOfTensorsGeneric,
)

#: One input's baseline: a number, a tensor, a preset name or a callable.
BaselineEntry: TypeAlias = Tensor | int | float | str | Callable[[Tensor], Tensor]

#: ``baselines`` as the package's methods and metrics take it: Captum's
#: ``BaselineType`` (None, a number, a tensor, or a tuple of numbers and tensors),
#: a preset name or a callable, or a tuple with one :data:`BaselineEntry` per input.
BaselineInput: TypeAlias = (
    BaselineType | str | Callable[[Tensor], Tensor] | tuple[BaselineEntry, ...]
)

__all__ = [
    "BaselineEntry",
    "BaselineInput",
    "BaselineType",
    "TargetType",
    "TensorOrTupleOfTensorsGeneric",
]
