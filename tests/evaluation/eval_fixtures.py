"""Tiny model, data, explainers and metrics shared by the evaluation tests, the
subprocess worker and the config fixtures (one module, so that the names the run
fingerprint records are the same in every process)."""

from __future__ import annotations

import os
import signal

import torch
from captum.attr import IntegratedGradients, Saliency
from helpers import small_cnn
from torch.utils.data import DataLoader, TensorDataset

from captum_faithful import evaluate

N_SAMPLES = 18
BATCH_SIZE = 4  # 5 batches: 4, 4, 4, 4, 2


def model() -> torch.nn.Module:
    return small_cnn(in_channels=3, n_classes=5, seed=0)


def dataset(n: int = N_SAMPLES) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return TensorDataset(inputs, labels)


def loader(batch_size: int = BATCH_SIZE, n: int = N_SAMPLES) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size)


def top_feature_drop(forward_func, inputs, attributions, target=None, fraction=0.25):
    """Drop of the target probability when the top `fraction` of the pixels (by
    summed attribution) are set to zero: a small deletion-style metric."""
    with torch.no_grad():
        scores = attributions.sum(dim=1).flatten(1)
        k = max(1, int(fraction * scores.shape[1]))
        top = scores.topk(k, dim=1).indices
        mask = torch.ones_like(scores).scatter(1, top, 0.0)
        masked = inputs * mask.view(inputs.shape[0], 1, *inputs.shape[2:])
        rows = torch.arange(inputs.shape[0])
        before = forward_func(inputs).softmax(1)[rows, target]
        after = forward_func(masked).softmax(1)[rows, target]
        return before - after


def attribution_mass(forward_func, inputs, attributions, target=None):
    return attributions.abs().flatten(1).sum(1)


def noisy_mass(forward_func, inputs, attributions, target=None):
    """Uses the global torch generator: equal across runs only if each batch is
    seeded the same way."""
    return attributions.abs().flatten(1).sum(1) + torch.rand(inputs.shape[0])


def explainers(model: torch.nn.Module) -> dict:
    return {
        "saliency": Saliency(model),
        "ig": IntegratedGradients(model),
    }


def metrics() -> dict:
    return {"drop": top_feature_drop, "mass": attribution_mass, "noisy": noisy_mass}


def interruptible(model, fail_after=None, how="raise", log=None):
    """A Saliency explainer (callable form) that records the first input value of
    every sample it explains in `log`, and after `fail_after` calls raises or
    SIGKILLs its own process."""
    saliency = Saliency(model)
    calls = [0]

    def saliency_explainer(inputs, target):
        calls[0] += 1
        if fail_after is not None and calls[0] > fail_after:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "interrupt":
                raise KeyboardInterrupt("injected interruption")
            raise RuntimeError("injected failure")
        if log is not None:
            log.append(inputs[:, 0, 0, 0].tolist())
        return saliency.attribute(inputs, target=target)

    return saliency_explainer


def sample_positions(values: list[float]) -> list[int]:
    """The dataset positions of samples identified by their first input value."""
    first = dataset().tensors[0][:, 0, 0, 0].tolist()
    return [first.index(v) for v in values]


def run_explainers(model, fail_after=None, how="raise", log=None) -> dict:
    """The explainers of the resume and distributed tests."""
    return {
        "saliency": interruptible(model, fail_after, how=how, log=log),
        "ig": IntegratedGradients(model),
    }


def uninterrupted_run(out):
    """``run_explainers`` and ``metrics`` evaluated in one go into ``out``: what a
    resumed or a sharded run must reproduce."""
    net = model()
    return evaluate(
        net, loader(), run_explainers(net), metrics(), out=out, show_progress=False
    )


def failing_metric(forward_func, inputs, attributions, target=None):
    """A metric that raises, for the command line's error reporting."""
    raise RuntimeError("the metric failed on purpose")


def rows(results, sort: bool = False) -> list[tuple]:
    """A run's table as ``(index, method, metric, value)`` tuples (no timing column):
    in the table's order, or sorted by index, method and metric (``sort=True``)."""
    table = results.table
    if sort:
        table = table.sort_values(["index", "method", "metric"])
    columns = ["index", "method", "metric", "value"]
    return [tuple(row) for row in table[columns].itertuples(index=False)]
