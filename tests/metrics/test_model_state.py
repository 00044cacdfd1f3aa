"""Every metric gives the user's model back as it found it: BatchNorm statistics of
a model in training mode included, also when the metric raises."""

import functools

import pytest
import torch
from helpers import ModelSnapshot
from torch import nn

from captum_faithful import evaluate
from captum_faithful.metrics import (
    activation_deviation,
    deletion_auc,
    faithfulness_correlation,
    insertion_activation_deviation,
    insertion_auc,
    path_monotonicity,
    saco,
)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).train()


X = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
ATTRIBUTIONS = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))

METRICS = {
    "insertion_auc": lambda m: insertion_auc(m, X, ATTRIBUTIONS, n_steps=4),
    "deletion_auc": lambda m: deletion_auc(m, X, ATTRIBUTIONS, n_steps=4),
    "saco": lambda m: saco(m, X, ATTRIBUTIONS, n_groups=4),
    "faithfulness_correlation": lambda m: faithfulness_correlation(
        m, X, ATTRIBUTIONS, n_samples=6, max_examples_per_batch=5
    ),
    "path_monotonicity": lambda m: path_monotonicity(m, X, "blur", n_steps=4),
    "activation_deviation": lambda m: activation_deviation(m, "conv", X, X.flip(-1)),
    "insertion_activation_deviation": lambda m: insertion_activation_deviation(
        m, "conv", X, ATTRIBUTIONS, n_steps=4
    ),
    "bound_forward": lambda m: insertion_auc(m.forward, X, ATTRIBUTIONS, n_steps=4),
}


class FailingForward(Exception):
    pass


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_restore_batchnorm_statistics(name):
    model = bn_model()
    snapshot = ModelSnapshot.take(model)
    METRICS[name](model)
    snapshot.assert_same(model)
    # the metric did run the model in training mode (it would have changed them)
    with torch.no_grad():
        model(X)
    assert not torch.equal(model[1].running_mean, snapshot.state["1.running_mean"])


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_restore_batchnorm_statistics_when_they_raise(name):
    """The forward pass after the first raises: the statistics the first one
    changed are restored all the same."""
    model = bn_model()
    snapshot = ModelSnapshot.take(model)
    calls = {"n": 0}

    def fail_on_second_call(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FailingForward("boom")

    handle = model[-1].register_forward_hook(fail_on_second_call)
    try:
        with pytest.raises(FailingForward, match="boom"):
            METRICS[name](model)
    finally:
        handle.remove()
    snapshot.assert_same(model)


def test_evaluate_restores_batchnorm_statistics(tmp_path):
    from captum.attr import Saliency
    from torch.utils.data import DataLoader, TensorDataset

    model = bn_model()
    snapshot = ModelSnapshot.take(model)
    loader = DataLoader(
        TensorDataset(X, torch.zeros(4, dtype=torch.long)), batch_size=2
    )
    with pytest.warns(UserWarning, match="training mode"):
        evaluate(
            model,
            loader,
            {"saliency": Saliency(model)},
            {"deletion": functools.partial(deletion_auc, n_steps=4)},
            out=tmp_path / "run",
            show_progress=False,
        )
    snapshot.assert_same(model)
