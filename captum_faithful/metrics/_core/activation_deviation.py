"""Activation deviation: internal faithfulness of a perturbation (FEI paper)."""

from __future__ import annotations

from typing import Any

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import (
    format_additional_forward_args,
    format_inputs,
    select_rows,
)
from captum_faithful._compat import _format_tensor_into_tuples, _run_forward
from captum_faithful._layers import LayerSpec, model_places, record_activations
from captum_faithful._utils import check_finite, check_int, preserve_model_state
from captum_faithful.metrics._core.insertion_deletion import feature_counts
from captum_faithful.metrics._utils import (
    build_perturbed_inputs,
    cosine_similarity,
    feature_scores,
    prepare_metric_inputs,
    rank_features,
    resolve_chunk_size,
)


@log_usage()
def activation_deviation(
    model: nn.Module,
    layers: LayerSpec,
    inputs: Tensor | tuple[Tensor, ...],
    perturbed_inputs: Tensor | tuple[Tensor, ...],
    additional_forward_args: Any = None,
    max_examples_per_batch: int | None = None,
) -> dict[str, Tensor]:
    r"""How far a perturbation moves the model's internal activations.

    An explanation that keeps the model's output while rerouting its computation is
    not faithful to the model's reasoning (FEI paper). This metric compares the
    outputs of the selected layers on the clean inputs, :math:`h_\ell(x)`, with those
    on the perturbed inputs, :math:`h_\ell(\tilde x)`, sample by sample, and averages
    over the layers (every call of a layer that runs several times counts as one
    layer):

    .. math::
        \mathrm{MSE}_i = \frac{1}{L} \sum_\ell \mathrm{mean}\big((h_\ell(\tilde x_i)
        - h_\ell(x_i))^2\big), \qquad
        \cos_i = \frac{1}{L} \sum_\ell \frac{\langle h_\ell(\tilde x_i), h_\ell(x_i)
        \rangle}{\lVert h_\ell(\tilde x_i) \rVert \, \lVert h_\ell(x_i) \rVert}

    Two all-zero activations count as identical (cosine 1); one all-zero activation
    against a non-zero one has cosine 0. Runs under ``torch.no_grad()``, on
    ``max_examples_per_batch`` samples at a time (the activations of the selected
    layers are held for one chunk only); the model's modes, flags and hooks are left
    as they were.

    Args:

        model (nn.Module): the model; ``model(*inputs, *additional_forward_args)``
                    is run on both inputs.
        layers (str or list): ``"conv"`` (every ``nn.Conv2d``), ``"early"`` /
                    ``"late"`` (first / second half of them), for Vision Transformers
                    ``"attention"`` (every block's attention probabilities; eager
                    attention is switched on for the call) or ``"blocks"`` (every
                    block's output), or a list of modules or submodule names.
        inputs (Tensor or tuple[Tensor, ...]): clean inputs, batch size N.
        perturbed_inputs (Tensor or tuple[Tensor, ...]): perturbed inputs, same
                    shapes as ``inputs``.
        additional_forward_args (Any, optional): passed after the inputs to both
                    forwards; a tensor with the batch size on dim 0 follows its
                    samples, anything else is passed as is (Captum's convention).
                    Default: None
        max_examples_per_batch (int, optional): samples per forward pass; None uses
                    the metrics' default chunk size.
                    Default: None

    Returns:
        dict: ``{"mse": Tensor (N,), "cosine": Tensor (N,)}``.

    Examples::

        >>> dev = activation_deviation(model, "conv", images, images + noise)
        >>> dev["mse"], dev["cosine"]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    with model_places(model, layers):
        pass  # checks `layers` before the inputs
    clean, _ = format_inputs(inputs)
    perturbed = _format_tensor_into_tuples(perturbed_inputs)
    if not all(isinstance(t, Tensor) for t in perturbed):
        raise TypeError("`perturbed_inputs` must be a tensor or a tuple of tensors")
    check_finite("perturbed_inputs", perturbed)
    if len(clean) != len(perturbed) or any(
        a.shape != b.shape for a, b in zip(clean, perturbed, strict=False)
    ):
        raise ValueError(
            "`perturbed_inputs` must have the shapes of `inputs`, got "
            f"{[tuple(t.shape) for t in perturbed]} for "
            f"{[tuple(t.shape) for t in clean]}"
        )
    chunk_size = resolve_chunk_size(max_examples_per_batch)
    n = clean[0].shape[0]
    additional_forward_args = format_additional_forward_args(additional_forward_args, n)
    mse, cosine = [], []
    with (
        preserve_model_state(model),
        model_places(model, layers) as places,
        torch.no_grad(),
    ):
        for start in range(0, n, chunk_size):
            samples = torch.arange(start, min(n, start + chunk_size))
            args = select_rows(additional_forward_args, samples)
            with record_activations(places) as clean_acts:
                _run_forward(model, _rows(clean, start, chunk_size), None, args)
            with record_activations(places) as perturbed_acts:
                _run_forward(model, _rows(perturbed, start, chunk_size), None, args)
            values = deviation_from_records(clean_acts, perturbed_acts)
            mse.append(values["mse"])
            cosine.append(values["cosine"])
    return {"mse": torch.cat(mse), "cosine": torch.cat(cosine)}


def _rows(inputs: tuple[Tensor, ...], start: int, count: int) -> tuple[Tensor, ...]:
    return tuple(x[start : start + count] for x in inputs)


@log_usage()
def insertion_activation_deviation(
    model: nn.Module,
    layers: LayerSpec,
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor | tuple[Tensor, ...],
    baselines: Any = "blur",
    additional_forward_args: Any = None,
    feature_mask: Tensor | tuple[Tensor, ...] | None = None,
    n_steps: int = 100,
    max_examples_per_batch: int | None = None,
) -> dict[str, Tensor]:
    r"""Activation deviation along the hard insertion curve of an attribution.

    The images of :func:`~captum_faithful.metrics.insertion_auc`'s curve (the top
    ``round(k F / n_steps)`` features by attribution taken from the input, the rest
    from the baseline, k = 0..n_steps; same ranking, tie-breaking and baselines) are
    compared with the clean input by :func:`activation_deviation`, and the values are
    averaged over the n_steps + 1 curve points. Because every attribution is scored at
    exactly the same coverages, maps are compared at equal coverage: a
    soft map cannot look internally faithful just by keeping more of the input.

    .. math::
        \mathrm{MSE}_i = \frac{1}{n+1} \sum_{k=0}^{n} \mathrm{MSE}\big(x_i,
        \tilde x_i^{(k)}\big), \qquad \tilde x^{(k)} = m_k \odot x + (1 - m_k) \odot b

    Args:

        model (nn.Module): the model.
        layers (str or list): as in :func:`activation_deviation`.
        inputs (Tensor or tuple[Tensor, ...]): clean inputs, batch size N.
        attributions (Tensor or tuple[Tensor, ...]): one map per input, the input's
                    shape or broadcastable to it (e.g. (N, 1, H, W)).
        baselines (str, scalar, Tensor, Callable, optional): what replaces the
                    features not yet inserted, as in ``insertion_auc``.
                    Default: ``"blur"``
        additional_forward_args (Any, optional): passed after the inputs.
                    Default: None
        feature_mask (Tensor, optional): Captum's feature mask; ``None`` makes each
                    spatial location of a 4-D input one feature.
                    Default: None
        n_steps (int, optional): curve segments (n_steps + 1 points).
                    Default: 100
        max_examples_per_batch (int, optional): curve images per forward pass;
                    the clean activations are recorded for the samples of one such
                    chunk at a time.
                    Default: None (the metrics' default chunk size)

    Returns:
        dict: ``{"mse": Tensor (N,), "cosine": Tensor (N,)}``.

    Examples::

        >>> dev = insertion_activation_deviation(model, "conv", images, attr,
        >>>                                      baselines=reference, n_steps=20)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    with model_places(model, layers):
        pass  # checks `layers` before the inputs
    n_steps = check_int("n_steps", n_steps, 1)
    setup = prepare_metric_inputs(
        inputs, attributions, baselines, feature_mask, None, max_examples_per_batch
    )
    n, steps = setup.n_examples, n_steps + 1
    additional_forward_args = format_additional_forward_args(additional_forward_args, n)
    with (
        preserve_model_state(model),
        model_places(model, layers) as modules,
        torch.no_grad(),
    ):
        ranks = rank_features(
            feature_scores(
                setup.attributions, setup.inputs, setup.feature_ids, setup.n_features
            )
        )
        counts = torch.tensor(
            feature_counts(setup.n_features, n_steps), device=ranks.device
        )
        mse, cosine = [], []
        for start in range(0, n * steps, setup.chunk_size):
            rows = torch.arange(start, min(n * steps, start + setup.chunk_size))
            samples, points = rows // steps, rows % steps
            # rows are sample-major: the chunk's samples are a contiguous range,
            # whose clean activations are recorded here (at most one chunk's worth)
            first, last = int(samples[0]), int(samples[-1])
            chunk_samples = torch.arange(first, last + 1)
            with record_activations(modules) as clean:
                _run_forward(
                    model,
                    _rows(setup.inputs, first, last + 1 - first),
                    None,
                    select_rows(additional_forward_args, chunk_samples),
                )
            take = ranks[samples.to(ranks.device)] < counts[points].unsqueeze(1)
            with record_activations(modules) as records:
                _run_forward(
                    model,
                    build_perturbed_inputs(setup, samples, take),
                    None,
                    select_rows(additional_forward_args, samples),
                )
            values = deviation_from_records(clean, records, samples - first)
            mse.append(values["mse"])
            cosine.append(values["cosine"])
    return {
        "mse": torch.cat(mse).view(n, steps).mean(1),
        "cosine": torch.cat(cosine).view(n, steps).mean(1),
    }


def deviation_from_records(
    clean: list[list[Tensor]], perturbed: list[list[Tensor]], rows: Tensor | None = None
) -> dict[str, Tensor]:
    """MSE and cosine per perturbed row, averaged over layers and calls.

    ``clean[l][c]`` is the output of call c of layer l on the clean inputs; perturbed
    row r is compared with clean row ``rows[r]`` (row r when ``rows`` is None).
    """
    mse, cosine, count = 0.0, 0.0, 0
    for clean_calls, perturbed_calls in zip(clean, perturbed, strict=True):
        if len(clean_calls) != len(perturbed_calls):
            raise ValueError(
                "a layer ran a different number of times on the clean and the "
                "perturbed inputs"
            )
        for h, h_tilde in zip(clean_calls, perturbed_calls, strict=True):
            if rows is not None:
                h = h.index_select(0, rows.to(h.device))
            h, h_tilde = h.flatten(1).double(), h_tilde.flatten(1).double()
            mse = mse + ((h_tilde - h) ** 2).mean(dim=1)
            cosine = cosine + cosine_similarity(h, h_tilde)
            count += 1
    return {"mse": (mse / count).float(), "cosine": (cosine / count).float()}
