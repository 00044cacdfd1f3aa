"""A Python config for `captum-faithful evaluate` (used by the CLI tests)."""

from functools import partial

import eval_fixtures
from captum.attr import IntegratedGradients, Saliency

model = eval_fixtures.model  # a factory: called once by the CLI
dataset = eval_fixtures.dataset
batch_size = 4
target = "predicted"
out = "runs/eval-config-example"


def explainers(model):
    return {
        "saliency": Saliency(model),
        "ig": partial(IntegratedGradients(model).attribute, n_steps=8),
    }


metrics = {
    "drop": partial(eval_fixtures.top_feature_drop, fraction=0.5),
    "mass": eval_fixtures.attribution_mass,
}
