"""Attribution methods, mirroring ``captum.attr``."""

from captum_faithful.attr._core.blank_image_diagnostic import blank_image_diagnostic
from captum_faithful.attr._core.clip_grad import ClipGrad
from captum_faithful.attr._core.faithfulness_ensemble import FaithfulnessEnsemble

__all__: list[str] = [
    "ClipGrad",
    "FaithfulnessEnsemble",
    "blank_image_diagnostic",
]
