"""Studies of one attribution method: they run it over data and score it with the
metrics, to choose or to check its settings.

A study needs a method (:mod:`captum_faithful.attr`), the metrics
(:mod:`captum_faithful.metrics`) and, for a sweep over a dataset, the runner
:func:`captum_faithful.evaluate`; so it sits above all three, and the layers below
stay apart: attribution methods do not import metrics, and the runner knows no
method. :func:`select_gating` chooses Feature-Gated TransMM's layers, κ, c_max and
variant on validation images (returning a :class:`GatingSelection` of
:class:`GatingConfiguration`); :func:`blank_image_diagnostic` runs FEI on constant
images, one ClipGrad rule after another, and measures the evidence it finds there.
Both are importable from the package root too.
"""

from captum_faithful.studies._blank_image import blank_image_diagnostic
from captum_faithful.studies._gating import (
    GatingConfiguration,
    GatingSelection,
    select_gating,
)

__all__ = [
    "GatingConfiguration",
    "GatingSelection",
    "blank_image_diagnostic",
    "select_gating",
]
