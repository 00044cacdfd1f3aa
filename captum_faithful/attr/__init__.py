"""Attribution methods, mirroring ``captum.attr``."""

from captum_faithful.attr._core.activation_patching import activation_patching
from captum_faithful.attr._core.attribution_patching import AttributionPatching
from captum_faithful.attr._core.clip_grad import ClipGrad
from captum_faithful.attr._core.faithfulness_ensemble import FaithfulnessEnsemble
from captum_faithful.attr._core.feature_gated_transmm import FeatureGatedTransMM
from captum_faithful.attr._core.layer.layer_unlearned_integrated_gradients import (
    LayerUnlearnedIntegratedGradients,
)
from captum_faithful.attr._core.transmm import TransMM
from captum_faithful.attr._core.unlearned_integrated_gradients import (
    UnlearnedIntegratedGradients,
)

__all__: list[str] = [
    "AttributionPatching",
    "ClipGrad",
    "FaithfulnessEnsemble",
    "FeatureGatedTransMM",
    "LayerUnlearnedIntegratedGradients",
    "TransMM",
    "UnlearnedIntegratedGradients",
    "activation_patching",
]
