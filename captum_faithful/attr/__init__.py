"""Attribution methods, mirroring ``captum.attr``."""

from captum_faithful.attr._core.feature_gated_transmm import FeatureGatedTransMM
from captum_faithful.attr._core.transmm import TransMM

__all__: list[str] = ["FeatureGatedTransMM", "TransMM"]
