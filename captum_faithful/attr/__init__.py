"""Attribution methods, mirroring ``captum.attr``."""

from captum_faithful.attr._core.layer_unlearned_integrated_gradients import (
    LayerUnlearnedIntegratedGradients,
)
from captum_faithful.attr._core.unlearned_integrated_gradients import (
    UnlearnedIntegratedGradients,
)

__all__: list[str] = [
    "LayerUnlearnedIntegratedGradients",
    "UnlearnedIntegratedGradients",
]
