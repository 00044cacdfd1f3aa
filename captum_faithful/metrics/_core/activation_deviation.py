"""Activation deviation: internal faithfulness of a perturbation (FEI paper)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import (
    explained_dtype_errors,
    format_additional_forward_args,
    format_inputs,
    select_rows,
)
from captum_faithful._compat import _format_tensor_into_tuples, _run_forward
from captum_faithful._layers import (
    LayerSpec,
    Place,
    model_places,
    record_activations,
)
from captum_faithful._typing import BaselineInput
from captum_faithful._utils import check_finite, check_int, preserve_model_state
from captum_faithful.metrics._utils import (
    build_perturbed_inputs,
    cosine_similarity,
    feature_counts,
    feature_scores,
    prepare_metric_inputs,
    rank_features,
    reading,
    resolve_chunk_size,
    warn_non_finite,
)


@reading(
    {"mse": "activation deviation (MSE)", "cosine": "activation cosine"},
    {"mse": False, "cosine": True},
)
@log_usage()
def activation_deviation(
    model: nn.Module,
    layers: LayerSpec,
    inputs: Tensor | tuple[Tensor, ...],
    perturbed_inputs: Tensor | tuple[Tensor, ...],
    additional_forward_args: object = None,
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
    against a non-zero one has cosine 0. The differences and products are taken in
    the activations' dtype (float32 for half precision) and summed in float64.

    Runs under ``torch.no_grad()``, on ``max_examples_per_batch`` samples at a time;
    the model's modes, flags and hooks are left as they were. The clean pass of a
    chunk records the selected layers' outputs; in the perturbed pass each layer
    output is compared with them inside its forward hook and reduced to per-sample
    sums at once, so the memory holds one chunk's clean activations (in their dtype)
    and no perturbed one beyond its layer.

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
        dict: ``{"mse": Tensor (N,), "cosine": Tensor (N,)}``, float64.

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
        explained_dtype_errors(clean, model),
    ):
        for start in range(0, n, chunk_size):
            samples = torch.arange(start, min(n, start + chunk_size))
            args = select_rows(additional_forward_args, samples)

            def run_clean(args: Any = args, start: int = start) -> Any:
                return _run_forward(model, _rows(clean, start, chunk_size), None, args)

            def run_perturbed(args: Any = args, start: int = start) -> Any:
                return _run_forward(
                    model, _rows(perturbed, start, chunk_size), None, args
                )

            values = _deviation(places, run_clean, run_perturbed)
            mse.append(values["mse"])
            cosine.append(values["cosine"])
    return _nan_for_non_finite(
        "activation_deviation", torch.cat(mse), torch.cat(cosine)
    )


def _rows(inputs: tuple[Tensor, ...], start: int, count: int) -> tuple[Tensor, ...]:
    return tuple(x[start : start + count] for x in inputs)


@reading(
    {"mse": "activation deviation (MSE)", "cosine": "activation cosine"},
    {"mse": False, "cosine": True},
)
@log_usage()
def insertion_activation_deviation(
    model: nn.Module,
    layers: LayerSpec,
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor | tuple[Tensor, ...],
    baselines: BaselineInput = "blur",
    additional_forward_args: object = None,
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
                    chunk at a time, and the curve images' activations are reduced
                    inside the forward hooks (see :func:`activation_deviation`).
                    Default: None (the metrics' default chunk size)

    Returns:
        dict: ``{"mse": Tensor (N,), "cosine": Tensor (N,)}``, float64.

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
        model_places(model, layers) as places,
        torch.no_grad(),
        explained_dtype_errors(setup.inputs, model),
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
            # whose clean activations are recorded (at most one chunk's worth)
            first, last = int(samples[0]), int(samples[-1])
            chunk_samples = torch.arange(first, last + 1)
            take = ranks[samples.to(ranks.device)] < counts[points].unsqueeze(1)

            def run_clean(
                first: int = first,
                last: int = last,
                chunk_samples: Tensor = chunk_samples,
            ) -> Any:
                return _run_forward(
                    model,
                    _rows(setup.inputs, first, last + 1 - first),
                    None,
                    select_rows(additional_forward_args, chunk_samples),
                )

            def run_perturbed(samples: Tensor = samples, take: Tensor = take) -> Any:
                return _run_forward(
                    model,
                    build_perturbed_inputs(setup, samples, take),
                    None,
                    select_rows(additional_forward_args, samples),
                )

            values = _deviation(
                places, run_clean, run_perturbed, clean_rows=samples - first
            )
            mse.append(values["mse"])
            cosine.append(values["cosine"])
    return _nan_for_non_finite(
        "insertion_activation_deviation",
        torch.cat(mse).view(n, steps).mean(1),
        torch.cat(cosine).view(n, steps).mean(1),
    )


def _nan_for_non_finite(metric: str, mse: Tensor, cosine: Tensor) -> dict[str, Tensor]:
    """The result, with one warning when samples met NaN or Inf activations
    (:func:`_compare` gives them NaN, which finite activations never give: a
    finite deviation computed from them would be meaningless). An infinite MSE
    of finite activations (an overflow of the result's float32) stays."""
    warn_non_finite(metric, mse.isnan() | cosine.isnan(), "the selected layers")
    return {"mse": mse, "cosine": cosine}


def _deviation(
    places: list[Place],
    run_clean: Callable[[], Any],
    run_perturbed: Callable[[], Any],
    clean_rows: Tensor | None = None,
) -> dict[str, Tensor]:
    """MSE and cosine of each perturbed row, averaged over the calls of the layers at
    ``places``.

    ``run_clean()`` forwards the clean rows, whose layer outputs are recorded (in
    their dtype); ``run_perturbed()`` forwards the perturbed rows, and each of their
    layer outputs is compared inside its forward hook (read at hook time: an
    in-place activation may overwrite it afterwards) and reduced to per-row sums, so
    that no perturbed activation outlives its hook. Perturbed row r is compared with
    clean row ``clean_rows[r]`` (row r when ``clean_rows`` is None); the rows of one
    clean row follow each other.
    """
    with record_activations(places) as clean:
        run_clean()
    if clean_rows is None:
        segments = [_Segment(None, slice(None))]
    else:
        segments, start = [], 0
        values, lengths = torch.unique_consecutive(clean_rows, return_counts=True)
        for value, length in zip(values.tolist(), lengths.tolist(), strict=True):
            segments.append(_Segment(value, slice(start, start + length)))
            start += length
    with _comparing_hooks(places, clean, segments) as state:
        run_perturbed()
    if state.calls != [len(calls) for calls in clean]:
        raise ValueError(
            "a layer ran a different number of times on the clean and the "
            "perturbed inputs"
        )
    count = sum(state.calls)
    if count == 0:
        raise ValueError("none of the selected layers ran during the forward pass")
    # count > 0: a hook ran, and its first call set both sums
    return {
        "mse": cast(Tensor, state.mse) / count,
        "cosine": cast(Tensor, state.cosine) / count,
    }


@dataclass
class _Segment:
    """Perturbed rows ``rows`` of a forward pass, compared with clean row ``clean``
    (None: with the clean rows ``rows``)."""

    clean: int | None
    rows: slice


@dataclass
class _HookState:
    calls: list[int]
    mse: Tensor | None = None
    cosine: Tensor | None = None


@contextmanager
def _comparing_hooks(
    places: list[Place], clean: list[list[Tensor]], segments: list[_Segment]
) -> Iterator[_HookState]:
    """Forward hooks that add the MSE and cosine of each call's output against the
    same call's ``clean[place][call]`` to the state's per-row sums (float64).
    Removed on exit, also when the forward raises."""
    state = _HookState(calls=[0] * len(places))

    def make_hook(index: int, place: Place) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = place.select(module, output).detach()
            call = state.calls[index]
            state.calls[index] += 1
            if call >= len(clean[index]):
                raise ValueError(
                    "a layer ran a different number of times on the clean and the "
                    "perturbed inputs"
                )
            h = clean[index][call]
            mse_sums, cosine_sums = state.mse, state.cosine
            if mse_sums is None or cosine_sums is None:  # the first call: both None
                mse_sums = torch.zeros(
                    out.shape[0], dtype=torch.float64, device=out.device
                )
                cosine_sums = torch.zeros_like(mse_sums)
                state.mse, state.cosine = mse_sums, cosine_sums
            for segment in segments:
                reference = (
                    h if segment.clean is None else h[segment.clean : segment.clean + 1]
                )
                mse, cosine = _compare(reference, out[segment.rows])
                mse_sums[segment.rows] += mse.to(mse_sums.device)
                cosine_sums[segment.rows] += cosine.to(mse_sums.device)

        return hook

    handles = []
    try:
        for index, place in enumerate(places):
            handles.append(place.module.register_forward_hook(make_hook(index, place)))
        yield state
    finally:
        for handle in handles:
            handle.remove()


#: Row sums of squares and products below this (in the dtype the comparison works
#: in) may have lost precision to underflow; those rows are compared exactly.
_SMALLEST_SAFE_SUM = {torch.float32: 2.0**-90, torch.float64: 2.0**-900}
_BLOCK = 1024


def _compare(clean: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    r"""MSE and cosine (float64) of each row of ``rows`` (m, ...) against ``clean``
    ((1, ...) or (m, ...)).

    The differences and products are taken elementwise in the activations' dtype
    (float32 for lower precisions, whose products float32 holds exactly) and summed
    per row in float64 (see :func:`_row_sums`); no float64 copy of an activation is
    made. Rows whose sums leave the range where that is accurate (all values tiny
    or huge, zero or non-finite activations) are recomputed exactly in float64,
    with :func:`cosine_similarity`'s conventions for zero vectors.
    """
    work = (
        torch.float32
        if rows.is_floating_point() and rows.dtype != torch.float64
        else torch.float64
    )
    h = clean.flatten(1).to(work)
    h_tilde = rows.flatten(1).to(work)
    difference = h_tilde - h
    squared_error = _row_sums(difference.mul_(difference))
    del difference
    dot = _row_sums(h_tilde * h)
    norm_tilde = _row_sums(h_tilde * h_tilde)
    norm = _row_sums(h * h)
    mse = squared_error / h_tilde.shape[1]
    cosine = dot / (norm_tilde.sqrt() * norm.sqrt())
    low = _SMALLEST_SAFE_SUM[work]

    def safe(total: Tensor) -> Tensor:
        return (total >= low) & (total < math.inf)

    accurate = (
        safe(norm_tilde)
        & safe(norm)
        & dot.isfinite()
        & ((squared_error == 0) | safe(squared_error))
    )
    if not bool(accurate.all()):
        redo = torch.nonzero(~accurate).flatten()
        a = h.expand_as(h_tilde).index_select(0, redo).double()
        b = h_tilde.index_select(0, redo).double()
        mse[redo] = ((b - a) ** 2).mean(dim=1)
        cosine[redo] = cosine_similarity(a, b)
        # NaN or Inf activations: no deviation (see _nan_for_non_finite)
        broken = redo[~(torch.isfinite(a).all(dim=1) & torch.isfinite(b).all(dim=1))]
        mse[broken] = torch.nan
        cosine[broken] = torch.nan
    return mse, cosine


@functools.lru_cache(maxsize=256)
def _block_length(length: int) -> int:
    """The largest divisor of ``length`` that is at most ``_BLOCK``."""
    return next(b for b in range(min(length, _BLOCK), 0, -1) if length % b == 0)


def _row_sums(values: Tensor) -> Tensor:
    """Row sums of a contiguous (m, D) tensor, accumulated in float64.

    A float32 tensor is summed in blocks of at most 1024 consecutive elements in
    float32 (pairwise: the error of a block stays within a few units of float32's
    roundoff, whatever D), and the block sums are added in float64. This reads the
    values once, where converting them to float64 first would write a copy twice
    their size.
    """
    if values.dtype == torch.float64:
        return values.sum(dim=1)
    m, d = values.shape
    block = _block_length(d)
    return values.view(m, d // block, block).sum(dim=2).double().sum(dim=1)
