"""The one module that imports private Captum helpers.

Captum does not promise stability for names that start with an underscore. Every
such import in captum_faithful goes through here, so that a Captum upgrade that
moves one of them touches this file only. Only the helpers the package uses are
imported.
"""

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _run_forward,
)
from captum._utils.gradient import compute_gradients
from captum._utils.typing import BaselineType, TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr._core.llm_attr import GradientForwardFunc
from captum.attr._utils.approximation_methods import (
    SUPPORTED_METHODS,
    approximation_parameters,
)
from captum.attr._utils.batching import _batch_attribution
from captum.attr._utils.common import _reshape_and_sum

__all__ = [
    "SUPPORTED_METHODS",
    "BaselineType",
    "GradientForwardFunc",
    "TargetType",
    "TensorOrTupleOfTensorsGeneric",
    "_batch_attribution",
    "_format_additional_forward_args",
    "_format_output",
    "_format_tensor_into_tuples",
    "_is_tuple",
    "_reshape_and_sum",
    "_run_forward",
    "approximation_parameters",
    "compute_gradients",
]
