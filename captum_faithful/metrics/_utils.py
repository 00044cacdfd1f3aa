"""Shared machinery of the perturbation metrics.

Every perturbation metric follows the same steps, and each step has one function here:

1. :func:`prepare_metric_inputs` validates ``inputs``, ``attributions``,
   ``baselines``, ``feature_mask``, ``target`` and ``additional_forward_args``
   together (shapes, NaN/Inf, types) and resolves them into a
   :class:`MetricInputs` record, before any forward pass. Captum's arguments go
   through the package's front door, :mod:`captum_faithful._arguments`; the
   metric-only ones through :func:`validate_attributions` and
   :func:`resolve_feature_masks`. The curve metrics' extra baseline name,
   ``"random_color"``, is turned into a callable first
   (:func:`resolve_random_color`).
2. :func:`feature_scores` sums the attributions of every feature, and
   :func:`rank_features` turns the scores into ranks (descending score, ties broken
   by the lower feature index).
3. :func:`clean_target_scores` runs the unperturbed inputs once: it fixes the target
   class (``target=None`` = predicted class) and the reference score.
4. :func:`perturbed_target_scores` builds the perturbed copies of all samples as
   batched tensors (:func:`build_perturbed_inputs`), ``max_examples_per_batch`` at a
   time, and returns the target-class score of each copy. Its forward loop,
   :func:`chunked_target_scores` (one pass per chunk: :func:`target_scores`), takes
   any row builder, e.g. points on an interpolation path.
5. :func:`nan_where_non_finite` gives NaN to every sample whose scores the model
   returned as NaN or Inf, with one warning per call (:func:`warn_non_finite`):
   a metric never reports a finite value computed from them.

Also here: :func:`average_ranks`, :func:`pearson_correlation` and
:func:`spearman_correlation` and :func:`cosine_similarity` (batched, along the
last dimension), and
:func:`restores_model_state`, the decorator that gives every metric the user's model
back as it found it, and :func:`reading`, which keeps on each public metric how to
read it (``label``, ``higher_is_better``), as Quantus keeps it on the metric itself.

A perturbation is described by a function ``take_input(samples, perturbations)``
that returns, for each requested (sample, perturbation) pair, a boolean row over
the features: ``True`` keeps the input's value, ``False`` uses the baseline's. The
copies are built chunk by chunk, so the result does not depend on the chunk size.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_faithful._arguments import (
    broadcasts_to,
    check_integer_mask,
    class_scores,
    explained_dtype_errors,
    format_additional_forward_args,
    format_baselines,
    format_inputs,
    format_target,
    non_finite_rows,
    per_input,
    resolve_target,
    select_rows,
)
from captum_faithful._baselines import BASELINE_PRESETS, monochrome_reference
from captum_faithful._compat import _is_tuple
from captum_faithful._utils import (
    check_finite,
    check_int,
    module_of,
    preserve_model_state,
    run_forward,
)

#: Default number of perturbed examples per forward pass when
#: ``max_examples_per_batch=None``. Measured with ``benchmarks/bench_metrics.py``
#: (small CNN, one CPU thread, batch 16): the model calls alone were equally fast
#: for chunks of 32-256 images at 3x32x32 and 16-128 at 3x64x64, and about 1.8x
#: slower for 256-1024 (the activations no longer fit in cache); the metrics
#: themselves were fastest at 64-256 and 64-128. 64 is inside both ranges and keeps
#: memory small for larger images.
DEFAULT_MAX_EXAMPLES_PER_BATCH = 64

TakeInput = Callable[[Tensor, Tensor], Tensor]
Metric = TypeVar("Metric", bound=Callable[..., Any])


@dataclass(frozen=True)
class MetricInputs:
    """Validated, resolved arguments of a perturbation metric.

    Attributes:
        inputs (tuple of Tensor): The inputs, as a tuple.
        is_tuple (bool): Whether the user passed a tuple.
        attributions (tuple of Tensor): One per input, broadcastable to it.
        baselines (tuple of Tensor): One per input, expanded to its shape.
        feature_ids (tuple of Tensor): One int64 tensor per input, of shape
            (1 or N, ...) broadcastable to the input, holding feature indices in
            ``[0, n_features)``; the same index in two places is the same feature.
        n_features (int): Number of features F.
        n_examples (int): Batch size N.
        target (Tensor or None): The class per sample, (N,) int64, or None for
            the class predicted on the unperturbed inputs.
        additional_forward_args (tuple or None): Formatted and checked (see
            :func:`captum_faithful._arguments.format_additional_forward_args`).
        chunk_size (int): Perturbed examples per forward pass.
        feature_ranges (tuple): Per input, ``(start, stop)`` when its elements, in
            order, are features ``start .. stop-1`` for every sample (the default
            masks), else None; lets :func:`build_perturbed_inputs` slice instead of
            gather.
    """

    inputs: tuple[Tensor, ...]
    is_tuple: bool
    attributions: tuple[Tensor, ...]
    baselines: tuple[Tensor, ...]
    feature_ids: tuple[Tensor, ...]
    n_features: int
    n_examples: int
    chunk_size: int
    target: Tensor | None = None
    additional_forward_args: tuple | None = None
    feature_ranges: tuple[tuple[int, int] | None, ...] = ()


def validate_attributions(
    attributions: Any, inputs: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """Check that ``attributions`` mirror ``inputs``: one tensor per input, with the
    input's number of dimensions, batch size N, every other dimension equal to the
    input's or 1 (e.g. (N, 1, H, W) for (N, C, H, W) images), and finite values."""
    if not isinstance(attributions, (Tensor, tuple)):
        raise TypeError(
            "`attributions` must be a tensor or a tuple of tensors, got "
            f"{type(attributions).__name__}"
        )
    if isinstance(attributions, Tensor) and len(inputs) > 1:
        raise ValueError(
            f"`attributions` must be a tuple with one tensor per input ({len(inputs)})"
        )
    items = per_input("attributions", attributions, inputs)
    for a, x in zip(items, inputs, strict=True):
        if not isinstance(a, Tensor):
            raise TypeError(
                "`attributions` must be a tensor or a tuple of tensors, got "
                f"{type(a).__name__}"
            )
        if (
            a.dim() != x.dim()
            or a.shape[0] != x.shape[0]
            or not broadcasts_to(a.shape, x.shape)
        ):
            raise ValueError(
                "`attributions` must have the shape of the inputs, or one that "
                f"broadcasts to it with the same batch size: input {tuple(x.shape)}, "
                f"attributions {tuple(a.shape)}"
            )
    check_finite("attributions", items)
    return items


def default_feature_ids(inputs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], int]:
    """Features when ``feature_mask=None``: one per spatial location (all channels
    together) for a 4-D input (N, C, H, W), one per element otherwise; numbered
    across the inputs of a tuple in order."""
    ids, offset = [], 0
    for x in inputs:
        shape = (1, 1, *x.shape[2:]) if x.dim() == 4 else (1, *x.shape[1:])
        count = 1
        for size in shape:
            count *= size
        ids.append(torch.arange(offset, offset + count, device=x.device).view(shape))
        offset += count
    return tuple(ids), offset


def resolve_feature_masks(
    feature_mask: Any, inputs: tuple[Tensor, ...]
) -> tuple[tuple[Tensor, ...], int]:
    """Validate ``feature_mask`` and relabel its ids to ``0 .. F-1``.

    Captum's meaning: one integer tensor per input, broadcastable to it, with a batch
    dimension of 1 (shared by all samples) or N; elements with the same integer form
    one feature, also across the tensors of a tuple. Feature order (the tie-breaker
    of the ranking) is the order of the integer ids. A per-sample mask must use the
    same set of ids in every sample, so that all samples have the same F features.

    Returns:
        (ids, n_features): one int64 tensor per input of the input's number of
        dimensions, and F.
    """
    if feature_mask is None:
        return default_feature_ids(inputs)
    if isinstance(feature_mask, Tensor) and len(inputs) > 1:
        raise ValueError(
            f"`feature_mask` must be a tuple with one tensor per input ({len(inputs)})"
        )
    items = per_input("feature_mask", feature_mask, inputs)
    masks = []
    for m, x in zip(items, inputs, strict=True):
        check_integer_mask(m)
        if m.dim() > x.dim() or not broadcasts_to(m.shape, x.shape):
            raise ValueError(
                f"`feature_mask` must broadcast to the input shape {tuple(x.shape)}, "
                f"got shape {tuple(m.shape)}"
            )
        m = m.reshape((1,) * (x.dim() - m.dim()) + tuple(m.shape))
        masks.append(m.to(device=x.device, dtype=torch.long))
    unique_ids = torch.unique(torch.cat([m.reshape(-1).cpu() for m in masks]))
    n_features = unique_ids.numel()
    ids = tuple(
        torch.searchsorted(unique_ids.to(m.device), m.contiguous()) for m in masks
    )
    if any(m.shape[0] != 1 for m in ids):
        n = inputs[0].shape[0]
        present = torch.zeros(n, n_features, dtype=torch.bool, device=ids[0].device)
        for m in ids:
            flat = m.reshape(m.shape[0], -1).expand(n, -1).to(present.device)
            present.scatter_(1, flat, True)
        if not bool(present.all()):
            raise ValueError(
                "a per-sample `feature_mask` must use the same feature ids in every "
                "sample"
            )
    return ids, n_features


#: The reference of ``baselines="random_color"`` in :func:`insertion_auc`,
#: :func:`deletion_auc` and :func:`faithfulness_correlation` (FEI's reference).
RANDOM_COLOR = "random_color"
#: Every name those metrics accept for ``baselines``.
METRIC_BASELINE_NAMES = (*BASELINE_PRESETS, RANDOM_COLOR)


def check_generator(generator: Any) -> torch.Generator | None:
    """``generator`` itself if it is None or a ``torch.Generator``; a TypeError
    naming ``generator`` otherwise."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator, got {type(generator).__name__}"
        )
    return generator


def random_color_reference(
    inputs: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    r"""One random colour per image, shape (N, C, 1, 1): FEI's monochrome reference
    (:func:`~captum_faithful._baselines.monochrome_reference`).

    Channel :math:`c` of image :math:`n` is
    :math:`b_{n,c} = \min_{hw} x_{n,c} + u_{n,c}\,(\max_{hw} x_{n,c} - \min_{hw}
    x_{n,c})` with :math:`u_{n,c} \sim U[0, 1)` seeded from one 64-bit number drawn
    from ``generator`` (torch's global generator if None) per call and the image's
    own values: the same image gets the same colour alone or at any place of any
    batch, given the same generator state. Integer images (e.g. uint8) get the
    colour rounded to their dtype.
    """
    _check_images_for_random_color(inputs)
    if inputs.is_floating_point():
        return monochrome_reference(inputs, generator)
    colour = monochrome_reference(inputs.to(torch.float64), generator)
    return colour.round().to(inputs.dtype)


def _check_images_for_random_color(inputs: Tensor) -> None:
    if inputs.dim() != 4:
        raise ValueError(
            f"`baselines={RANDOM_COLOR!r}` needs image inputs of shape (N, C, H, W), "
            f"got shape {tuple(inputs.shape)}"
        )


def _random_color_placeholder(inputs: Tensor) -> Tensor:
    _check_images_for_random_color(inputs)
    return inputs.new_zeros(())


def resolve_random_color(
    baselines: Any, generator: torch.Generator | None, placeholder: bool = False
) -> Any:
    """``baselines`` with every ``"random_color"`` (the value itself or an entry of
    a tuple) replaced by a callable drawing :func:`random_color_reference` from
    ``generator`` when :func:`format_baselines` calls it, input after input. With
    ``placeholder=True`` the callable only checks the input's shape and gives zero,
    drawing nothing (for a metric that must draw something else first). Any other
    string must be a preset name (ValueError naming ``baselines``)."""

    def resolve(entry: Any) -> Any:
        if not isinstance(entry, str):
            return entry
        if entry not in METRIC_BASELINE_NAMES:
            raise ValueError(
                f"`baselines` must be one of {METRIC_BASELINE_NAMES}, a number, a "
                f"tensor or a callable, got {entry!r}"
            )
        if entry == RANDOM_COLOR and placeholder:
            return _random_color_placeholder
        if entry == RANDOM_COLOR:
            return functools.partial(random_color_reference, generator=generator)
        return entry

    if _is_tuple(baselines):
        return tuple(resolve(entry) for entry in baselines)
    return resolve(baselines)


def uses_random_color(baselines: Any) -> bool:
    """Whether ``baselines`` is ``"random_color"`` or a tuple holding it."""
    entries = baselines if _is_tuple(baselines) else (baselines,)
    return any(isinstance(e, str) and e == RANDOM_COLOR for e in entries)


def resolve_chunk_size(max_examples_per_batch: Any) -> int:
    """``max_examples_per_batch`` as a positive int; None means
    :data:`DEFAULT_MAX_EXAMPLES_PER_BATCH`."""
    if max_examples_per_batch is None:
        return DEFAULT_MAX_EXAMPLES_PER_BATCH
    return check_int("max_examples_per_batch", max_examples_per_batch, 1)


def prepare_metric_inputs(
    inputs: Any,
    attributions: Any,
    baselines: Any,
    feature_mask: Any,
    target: Any,
    max_examples_per_batch: Any,
    additional_forward_args: Any = None,
) -> MetricInputs:
    """Validate and resolve the common arguments of a perturbation metric at once,
    raising ValueError/TypeError that names the argument before any forward pass."""
    inputs, is_tuple = format_inputs(inputs)
    n = inputs[0].shape[0]
    attributions = validate_attributions(attributions, inputs)
    chunk_size = resolve_chunk_size(max_examples_per_batch)
    target = format_target(target, n)
    additional_forward_args = format_additional_forward_args(additional_forward_args, n)
    feature_ids, n_features = resolve_feature_masks(feature_mask, inputs)
    baselines = format_baselines(baselines, inputs)
    return MetricInputs(
        inputs=inputs,
        is_tuple=is_tuple,
        attributions=attributions,
        baselines=baselines,
        feature_ids=feature_ids,
        n_features=n_features,
        n_examples=n,
        chunk_size=chunk_size,
        target=target,
        additional_forward_args=additional_forward_args,
        feature_ranges=tuple(contiguous_feature_range(ids) for ids in feature_ids),
    )


def restores_model_state(metric: Metric) -> Metric:
    """Decorate a metric whose first argument is the forward function (or model):
    the mode, ``requires_grad`` flags and buffers of the module it is (or is a bound
    method of) are restored when the metric returns or raises, since every forward
    pass of a model in training mode updates BatchNorm's statistics. A forward
    function that is no module is left alone (its modules cannot be seen)."""

    @functools.wraps(metric)
    def wrapper(forward_func: Callable, *args: Any, **kwargs: Any) -> Any:
        with preserve_model_state(module_of(forward_func)):
            return metric(forward_func, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def reading(
    label: str | dict[str, str], higher_is_better: bool | dict[str, bool]
) -> Callable[[Metric], Metric]:
    """Keep how to read a metric on the metric itself, as Quantus does: sets the
    attributes ``label`` (the short name a table prints) and ``higher_is_better``
    (its direction) of the public function. A metric that returns a dictionary of
    per-example tensors gives a dictionary of each, one entry per key it returns
    (or one value for all its keys, e.g. per randomised layer). The evaluation and
    the demo read them from here, so a metric's direction is written once."""

    def mark(metric: Metric) -> Metric:
        metric.__dict__.update(label=label, higher_is_better=higher_is_better)
        return metric

    return mark


def metric_reading(metric: Any, key: str | None = None) -> tuple[str, bool]:
    """``(label, higher_is_better)`` of ``metric`` as :func:`reading` set them (of
    its entry ``key`` when it returns a dictionary); any object with the two
    attributes, e.g. a metric class of the user's, is read the same way."""
    label, higher = metric.label, metric.higher_is_better
    if key is not None:
        label = label[key] if isinstance(label, dict) else label
        higher = higher[key] if isinstance(higher, dict) else higher
    if not isinstance(label, str) or not isinstance(higher, bool):
        raise TypeError(
            f"`key`: the metric {getattr(metric, '__name__', metric)!r} returns a "
            "dictionary; name the entry to read"
        )
    return label, higher


def contiguous_feature_range(ids: Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` if ``ids`` is shared by all samples and its elements, in
    order, are the features ``start, start + 1, ..., stop - 1``; else None."""
    if ids.shape[0] != 1:
        return None
    flat = ids.reshape(-1)
    start = int(flat[0])
    expected = torch.arange(start, start + flat.numel(), device=flat.device)
    return (start, start + flat.numel()) if torch.equal(flat, expected) else None


def feature_scores(
    attributions: Sequence[Tensor],
    inputs: Sequence[Tensor],
    feature_ids: Sequence[Tensor],
    n_features: int,
) -> Tensor:
    """Score of each feature: the sum of the attributions of its input elements.

    Attributions are broadcast to the input's shape first, so a (N, 1, H, W) map on
    (N, C, H, W) images counts once per channel. Computed in float64 (ranking ties
    are then real ties, not rounding noise).

    Returns:
        Tensor: shape (N, F), float64.
    """
    n = inputs[0].shape[0]
    device = feature_ids[0].device
    scores = torch.zeros(n, n_features, dtype=torch.float64, device=device)
    for a, x, ids in zip(attributions, inputs, feature_ids, strict=True):
        a = a.detach().to(torch.float64).expand_as(x)
        summed = tuple(
            d for d in range(1, x.dim()) if ids.shape[d] == 1 and x.shape[d] != 1
        )
        if summed:
            a = a.sum(dim=summed, keepdim=True)
        full = (n, *torch.broadcast_shapes(a.shape[1:], ids.shape[1:]))
        a = a.expand(full).reshape(n, -1)
        flat_ids = ids.expand(full).reshape(n, -1).to(device)
        scores.scatter_add_(1, flat_ids, a.to(device))
    return scores


def compact_indices(values: Tensor, bound: int) -> Tensor:
    """``values`` (integers in [0, bound]) in the smallest signed integer dtype that
    holds them: the per-chunk gathers and comparisons then move less memory."""
    for dtype in (torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max:
            return values.to(dtype)
    return values


def feature_counts(n_features: int, n_steps: int) -> list[int]:
    """Features revealed (insertion) or removed (deletion) at each curve point:
    ``round(k * F / n_steps)`` for k = 0..n_steps (Python's round, half to even)."""
    return [round(k * n_features / n_steps) for k in range(n_steps + 1)]


def rank_features(scores: Tensor) -> Tensor:
    """Rank of each feature, shape (N, F): 0 for the highest score; equal scores are
    ranked by feature index (lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[1], device=scores.device)
    ranks.scatter_(1, order, positions.expand_as(order))
    return ranks


def target_scores(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    classes: Tensor,
    additional_forward_args: Any,
    apply_softmax: bool,
) -> Tensor:
    """One forward pass; the score of class ``classes[r]`` for every row r: the
    softmax probability when ``apply_softmax``, else the raw output (an output
    (N,) is one class: :func:`scores_of_classes`)."""
    output = run_forward(forward_func, inputs, additional_forward_args)
    output = scores_of_classes(output, apply_softmax)
    return output.gather(1, classes.view(-1, 1).to(output.device)).squeeze(1)


def scores_of_classes(output: Tensor, apply_softmax: bool) -> Tensor:
    """The forward output as (N, n_classes) scores, softmax probabilities when
    ``apply_softmax``. One score per sample, shape (N,), is one class (that score);
    its softmax would be 1 whatever the input, so ``apply_softmax=True`` is refused
    for it."""
    if output.dim() == 1 and apply_softmax:
        raise ValueError(
            "`apply_softmax`: forward_func returns one score per sample, shape "
            f"{tuple(output.shape)}, whose softmax is always 1; pass "
            "apply_softmax=False to score the output itself"
        )
    output = class_scores(output)
    return torch.softmax(output, dim=1) if apply_softmax else output


def chunked_outputs(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    additional_forward_args: Any,
    chunk_size: int,
) -> Tensor:
    """The forward outputs of ``inputs``, ``chunk_size`` samples per forward pass,
    concatenated: shape (N, ...). ``additional_forward_args`` is formatted (see
    :func:`captum_faithful._arguments.format_additional_forward_args`); its
    per-sample tensors follow their samples."""
    n = inputs[0].shape[0]
    outputs = []
    for start in range(0, n, chunk_size):
        samples = torch.arange(start, min(n, start + chunk_size))
        rows = tuple(x[start : start + chunk_size] for x in inputs)
        args = select_rows(additional_forward_args, samples)
        outputs.append(run_forward(forward_func, rows, args))
    return torch.cat(outputs)


def clean_target_scores(
    forward_func: Callable, setup: MetricInputs, apply_softmax: bool
) -> tuple[Tensor, Tensor]:
    """Forward the unperturbed inputs (in chunks) and return ``(scores, classes)``,
    each of shape (N,): ``classes`` is the target or, for ``target=None``, the
    predicted class; ``scores`` the target-class score. Raises ValueError if a
    target class is out of range."""
    with explained_dtype_errors(setup.inputs, module_of(forward_func)):
        output = chunked_outputs(
            forward_func, setup.inputs, setup.additional_forward_args, setup.chunk_size
        )
    scores = scores_of_classes(output, apply_softmax)
    classes = resolve_target(output, setup.target)
    return scores.gather(1, classes.view(-1, 1)).squeeze(1), classes


def warn_non_finite(metric: str, bad: Tensor, source: str = "the model") -> bool:
    """Warn once that ``source`` returned NaN or Inf for the samples ``bad``
    (bool (N,)), whose results of ``metric`` are NaN; whether any is."""
    if not bool(bad.any()):
        return False
    warnings.warn(
        f"{metric}: {source} returned non-finite values (NaN or Inf) for samples "
        f"{bad.nonzero().flatten().tolist()}, so their results are NaN; check the "
        "model's parameters and `additional_forward_args` for NaN/Inf, and the "
        "forward for overflow",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def nan_where_non_finite(
    metric: str, values: Tensor, *scores: Tensor, source: str = "the model"
) -> Tensor:
    """``values`` (N, ...) with NaN for every sample whose ``scores`` (each
    (N, ...), what the metric read from the model) hold NaN or Inf, and one
    warning per call naming ``metric`` and the samples.

    A score computed from NaN can look finite (comparisons with NaN are False, and
    ranks sort NaN last), so the metric states it has no value for such a sample
    instead of returning one."""
    bad = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    for rows in scores:
        bad |= non_finite_rows(rows).to(bad.device)
    if not warn_non_finite(metric, bad, source):
        return values
    return values.masked_fill(bad.view(-1, *([1] * (values.dim() - 1))), torch.nan)


def build_perturbed_inputs(
    setup: MetricInputs,
    samples: Tensor,
    take_input: Tensor,
    buffers: Sequence[Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """Perturbed copies for the rows ``samples`` (shape (R,)): element e of row r
    is ``inputs[samples[r]][e]`` where ``take_input[r, feature(e)]`` is True and the
    baseline's value otherwise. ``take_input`` has shape (R, F).

    Rows of the same sample that follow each other (the sample-major order of
    :func:`chunked_target_scores`) are built from that sample by broadcasting, with
    no per-row copy of the input. ``buffers`` (optional, from
    :func:`perturbation_buffers`) are written instead of allocating new tensors,
    which saves page faults when chunk after chunk is built; the returned rows are
    then views of them, valid until the next call."""
    n_rows = samples.shape[0]
    values, counts = torch.unique_consecutive(samples, return_counts=True)
    segments = list(zip(values.tolist(), counts.tolist(), strict=True))
    if buffers is None:
        buffers = tuple(
            torch.empty((n_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
            for x in setup.inputs
        )
    ranges = setup.feature_ranges or (None,) * len(setup.inputs)
    rows = []
    for x, b, ids, span, buffer in zip(
        setup.inputs, setup.baselines, setup.feature_ids, ranges, buffers, strict=True
    ):
        if span is not None:
            elements = take_input[:, span[0] : span[1]]
        elif ids.shape[0] == 1:
            elements = take_input.index_select(1, ids.reshape(-1))
        else:
            elements = take_input.gather(1, ids.reshape(ids.shape[0], -1)[samples])
        elements = elements.reshape(n_rows, *ids.shape[1:])
        rows.append(_select_rows(elements, x, b, segments, buffer[:n_rows]))
    return tuple(rows)


def _select_rows(
    keep: Tensor,
    inputs: Tensor,
    baselines: Tensor,
    segments: list[tuple[int, int]],
    out: Tensor,
) -> Tensor:
    """Row r of ``out`` = ``torch.where(keep[r], inputs[n], baselines[n])`` for the
    sample n of its segment (``segments``: (sample, number of rows) in order).

    For floating point it is computed as ``x * m + b * (1 - m)`` with ``m = keep``
    in {0, 1}: exact for finite values (x * 1 + b * 0 = x, up to the sign of a
    zero) and several times faster than ``torch.where`` on the CPU; an all-zero
    baseline skips the second term."""
    shared_baseline = baselines.stride(0) == 0  # expanded: the same for all samples
    zero_baseline = shared_baseline and not bool(baselines[:1].any())
    floating = inputs.is_floating_point()
    m = keep.to(inputs.dtype) if floating else keep
    start = 0
    for sample, count in segments:
        rows = slice(start, start + count)
        x = inputs[sample : sample + 1]
        b = baselines[:1] if shared_baseline else baselines[sample : sample + 1]
        if not floating:
            torch.where(m[rows], x, b, out=out[rows])
        else:
            torch.mul(x, m[rows], out=out[rows])
            if not zero_baseline:
                out[rows].addcmul_(b, 1 - m[rows])
        start += count
    return out


def perturbation_buffers(setup: MetricInputs, n_rows: int) -> tuple[Tensor, ...]:
    """One reusable (n_rows, ...) buffer per input for
    :func:`build_perturbed_inputs`."""
    return tuple(
        torch.empty((n_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        for x in setup.inputs
    )


def chunked_target_scores(
    forward_func: Callable,
    build_rows: Callable[[Tensor, Tensor], tuple[Tensor, ...]],
    n_examples: int,
    n_perturbations: int,
    classes: Tensor,
    additional_forward_args: Any,
    apply_softmax: bool,
    chunk_size: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Target-class scores of ``n_perturbations`` modified copies of every sample,
    forwarded ``chunk_size`` copies at a time.

    The N x P copies are enumerated sample-major; for each chunk,
    ``build_rows(samples, perturbations)`` (two LongTensors of shape (R,) on
    ``device``) returns the chunk's model inputs as a tuple of batched tensors.
    Copy r of the chunk is scored on class ``classes[samples[r]]``; the batched
    tensors of ``additional_forward_args`` (formatted by the front door) follow
    their sample.
    Any metric that scores copies of its inputs (perturbations, interpolation
    paths) can use this as its batched forward loop.

    Returns:
        Tensor: shape (N, P).
    """
    total = n_examples * n_perturbations
    scores = []
    for start in range(0, total, chunk_size):
        rows = torch.arange(start, min(total, start + chunk_size), device=device)
        samples, perturbations = rows // n_perturbations, rows % n_perturbations
        args = select_rows(additional_forward_args, samples)
        scores.append(
            target_scores(
                forward_func,
                build_rows(samples, perturbations),
                classes[samples.to(classes.device)],
                args,
                apply_softmax,
            )
        )
    return torch.cat(scores).view(n_examples, n_perturbations)


def perturbed_target_scores(
    forward_func: Callable,
    setup: MetricInputs,
    take_input: TakeInput,
    n_perturbations: int,
    classes: Tensor,
    apply_softmax: bool,
) -> Tensor:
    """Target-class scores of ``n_perturbations`` perturbed copies of every sample.

    ``take_input(samples, perturbations)`` (both LongTensors of shape (R,)) returns
    the (R, F) boolean feature selection of each copy (True = input's value,
    False = baseline's); the copies are built by :func:`build_perturbed_inputs`
    and forwarded ``setup.chunk_size`` at a time by :func:`chunked_target_scores`.

    Returns:
        Tensor: shape (N, P).
    """

    # The rows of one chunk are consumed by its forward pass before the next chunk
    # overwrites the buffers (scores are gathered into new tensors).
    buffers = perturbation_buffers(
        setup, min(setup.chunk_size, setup.n_examples * n_perturbations)
    )

    def build_rows(samples: Tensor, perturbations: Tensor) -> tuple[Tensor, ...]:
        return build_perturbed_inputs(
            setup, samples, take_input(samples, perturbations), buffers
        )

    return chunked_target_scores(
        forward_func,
        build_rows,
        setup.n_examples,
        n_perturbations,
        classes,
        setup.additional_forward_args,
        apply_softmax,
        setup.chunk_size,
        setup.feature_ids[0].device,
    )


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..n along the last dimension, ties given their average rank (the
    convention of ``scipy.stats.rankdata``), as float64."""
    n = values.shape[-1]
    sorted_values, order = torch.sort(values, dim=-1, stable=True)
    starts_group = torch.ones_like(sorted_values, dtype=torch.bool)
    starts_group[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    group = starts_group.long().cumsum(-1) - 1
    ones = torch.ones_like(group, dtype=torch.float64)
    size = torch.zeros_like(ones).scatter_add_(-1, group, ones)
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    first = torch.zeros_like(ones).scatter_reduce_(
        -1, group, positions.expand_as(ones), reduce="amin", include_self=False
    )
    sorted_ranks = first.gather(-1, group) + (size.gather(-1, group) - 1) / 2
    return torch.empty_like(sorted_ranks).scatter_(-1, order, sorted_ranks)


def pearson_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dimension, in float64; NaN where either
    side is constant."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    constant = (a == a[..., :1]).all(-1) | (b == b[..., :1]).all(-1)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    correlation = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.where(constant, torch.nan, correlation.clamp(-1.0, 1.0))


def spearman_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last dimension (Pearson of average
    ranks), in float64; NaN where either side is constant."""
    return pearson_correlation(average_ranks(a), average_ranks(b))


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    r"""Cosine similarity along the last dimension, in float64.

    .. math::
        \cos(a, b) = \frac{\langle a, b \rangle}{\lVert a \rVert \, \lVert b \rVert}

    Zero vectors follow one convention, chosen so that :math:`\cos(a, a) = 1` for
    every :math:`a`: two zero vectors are identical (1); a zero vector and a
    non-zero one share no direction (0).
    """
    # the cosine is scale-free: dividing each vector by its largest magnitude keeps
    # the norms far from underflow, also for tiny activations
    a, b = (v.to(torch.float64) for v in (a, b))
    tiny = torch.finfo(torch.float64).tiny
    a = a / a.abs().amax(dim=-1, keepdim=True).clamp_min(tiny)
    b = b / b.abs().amax(dim=-1, keepdim=True).clamp_min(tiny)
    both_zero = (a == 0).all(-1) & (b == 0).all(-1)
    return torch.where(both_zero, 1.0, F.cosine_similarity(a, b, dim=-1))


CORRELATIONS = {"pearson": pearson_correlation, "spearman": spearman_correlation}
