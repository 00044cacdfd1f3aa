"""Attribution methods, mirroring ``captum.attr``."""

from captum_faithful.attr._core.clip_grad import ClipGrad
from captum_faithful.attr._core.faithfulness_ensemble import FaithfulnessEnsemble

__all__: list[str] = [
    "ClipGrad",
    "FaithfulnessEnsemble",
]
