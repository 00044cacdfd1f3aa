"""Faithfulness metrics, mirroring ``captum.metrics``.

Every metric is a function ``metric(forward_func, inputs, attributions, target=...,
additional_forward_args=..., ...)`` that returns one value per example. They share
their argument checks, feature ranking and chunked perturbed forwards (bounded by
``max_examples_per_batch``, as in Captum), so the same argument means the same thing
in each. The baselines that perturbations fill removed features from are public
here too: :func:`blur_baseline`, :func:`mean_baseline`, :func:`zero_baseline`.

Each metric carries how to read it, as Quantus keeps it on the metric: the
attributes ``label`` (the short name a table prints) and ``higher_is_better``
(``insertion_auc.higher_is_better`` is True, ``deletion_auc``'s False); a metric
that returns a dictionary holds a dictionary of each, per key
(``activation_deviation.higher_is_better["mse"]`` is False).

Every metric returns float64 tensors on the inputs' device, whatever the model's
dtype: the per-example values, the insertion/deletion curves, every entry of the
dictionaries of ``activation_deviation``, ``insertion_activation_deviation`` and
``parameter_randomization``, and the patching distances and rank correlations. The
model runs in its own dtype; the areas, sums, correlations and ranks computed from
its outputs are accumulated in float64, so a half-precision model's values are not
rounded to its precision.
"""

from captum_faithful._baselines import blur_baseline, mean_baseline, zero_baseline
from captum_faithful.metrics._core.activation_deviation import (
    activation_deviation,
    insertion_activation_deviation,
)
from captum_faithful.metrics._core.faithfulness_correlation import (
    faithfulness_correlation,
)
from captum_faithful.metrics._core.insertion_deletion import deletion_auc, insertion_auc
from captum_faithful.metrics._core.parameter_randomization import (
    parameter_randomization,
)
from captum_faithful.metrics._core.patch_mask import patch_mask
from captum_faithful.metrics._core.patching import (
    patching_distance,
    patching_rank_correlation,
)
from captum_faithful.metrics._core.path_monotonicity import path_monotonicity
from captum_faithful.metrics._core.saco import saco

__all__ = [
    "activation_deviation",
    "blur_baseline",
    "deletion_auc",
    "faithfulness_correlation",
    "insertion_activation_deviation",
    "insertion_auc",
    "mean_baseline",
    "parameter_randomization",
    "patch_mask",
    "patching_distance",
    "patching_rank_correlation",
    "path_monotonicity",
    "saco",
    "zero_baseline",
]
