"""Attribution methods, mirroring ``captum.attr``."""

from captum_faithful.attr._core.feature_gated_transmm import FeatureGatedTransMM
from captum_faithful.attr._core.layer_unlearned_integrated_gradients import (
    LayerUnlearnedIntegratedGradients,
)
from captum_faithful.attr._core.transmm import TransMM
from captum_faithful.attr._core.unlearned_integrated_gradients import (
    UnlearnedIntegratedGradients,
)

__all__: list[str] = [
    "FeatureGatedTransMM",
    "LayerUnlearnedIntegratedGradients",
    "TransMM",
    "UnlearnedIntegratedGradients",
]
