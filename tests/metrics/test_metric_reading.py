"""Each metric carries how to read it (``label``, ``higher_is_better``), and the
direction it states is the one its values take: on a linear model, the exact
attribution (weight × input, the contribution of every feature) must score better
than the same attribution reversed, in the stated direction."""

import pytest
import torch
from torch import nn

from captum_faithful import metrics
from captum_faithful.metrics._utils import metric_reading

NOT_METRICS = {"blur_baseline", "mean_baseline", "zero_baseline", "patch_mask"}


def test_every_public_metric_carries_a_label_and_a_direction():
    for name in sorted(set(metrics.__all__) - NOT_METRICS):
        metric = getattr(metrics, name)
        assert isinstance(metric.label, (str, dict)), name
        assert isinstance(metric.higher_is_better, (bool, dict)), name
    assert metric_reading(metrics.activation_deviation, "mse")[1] is False
    assert metric_reading(metrics.activation_deviation, "cosine")[1] is True
    with pytest.raises(TypeError, match="key"):
        metric_reading(metrics.activation_deviation)


def _linear_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False)).eval()
    inputs = torch.rand(6, 1, 4, 4)
    exact = model[1].weight.detach().view(1, 1, 4, 4) * inputs
    return model, inputs, exact


@pytest.mark.parametrize(
    "name", ["insertion_auc", "deletion_auc", "saco", "faithfulness_correlation"]
)
def test_the_stated_direction_prefers_the_exact_attribution(name):
    model, inputs, exact = _linear_problem()
    metric = getattr(metrics, name)
    kwargs = dict(target=0, baselines=0.0)
    if name != "faithfulness_correlation":  # it reads the raw output already
        kwargs["apply_softmax"] = False  # one output: its softmax is constant
    with torch.no_grad():
        good = metric(model, inputs, exact, **kwargs)
        bad = metric(model, inputs, -exact, **kwargs)
    better = good > bad if metric.higher_is_better else good < bad
    assert bool(better.all()), (name, good, bad)
