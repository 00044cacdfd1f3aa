"""Insertion and deletion curves and their AUC (Petsiuk et al. 2018, RISE)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.log import log_usage
from torch import Tensor

from captum_faithful._compat import (
    TargetType,
    TensorOrTupleOfTensorsGeneric,
)
from captum_faithful._typing import BaselineInput
from captum_faithful._utils import check_bool, check_int
from captum_faithful.metrics._utils import (
    MetricInputs,
    check_generator,
    clean_target_scores,
    compact_indices,
    feature_counts,
    feature_scores,
    nan_where_non_finite,
    perturbed_target_scores,
    prepare_metric_inputs,
    rank_features,
    reading,
    resolve_random_color,
    restores_model_state,
)


def trapezoid_auc(curves: Tensor) -> Tensor:
    """Area under curves sampled at n_steps+1 equally spaced points of [0, 1]
    (trapezoid rule); ``curves`` has shape (N, n_steps + 1)."""
    n_steps = curves.shape[1] - 1
    return torch.trapezoid(curves, dx=1.0 / n_steps, dim=1)


def _curve(
    insertion: bool,
    forward_func: Callable,
    inputs: TensorOrTupleOfTensorsGeneric,
    attributions: TensorOrTupleOfTensorsGeneric,
    target: TargetType,
    additional_forward_args: object,
    baselines: BaselineInput,
    feature_mask: Tensor | tuple[Tensor, ...] | None,
    n_steps: int,
    apply_softmax: bool,
    max_examples_per_batch: int | None,
    return_curves: bool,
    generator: torch.Generator | None,
) -> Tensor | tuple[Tensor, Tensor]:
    n_steps = check_int("n_steps", n_steps, 1)
    check_bool("apply_softmax", apply_softmax)
    check_generator(generator)
    setup: MetricInputs = prepare_metric_inputs(
        inputs,
        attributions,
        resolve_random_color(baselines, generator),
        feature_mask,
        target,
        max_examples_per_batch,
        additional_forward_args,
    )
    n_features = setup.n_features
    # The copy equal to the clean input (everything revealed for insertion, nothing
    # removed for deletion) is scored by the clean pass; repeated counts
    # (n_steps > F) are forwarded once.
    clean_count = n_features if insertion else 0
    counts = feature_counts(n_features, n_steps)
    distinct = sorted(set(counts) - {clean_count})
    with torch.no_grad():
        clean, classes = clean_target_scores(forward_func, setup, apply_softmax)
        ranks = rank_features(
            feature_scores(
                setup.attributions, setup.inputs, setup.feature_ids, n_features
            )
        )
        ranks = compact_indices(ranks, n_features)
        thresholds = compact_indices(
            torch.tensor(distinct, device=ranks.device), n_features
        )

        def take_input(samples: Tensor, perturbations: Tensor) -> Tensor:
            limit = thresholds[perturbations].unsqueeze(1)
            revealed = ranks.index_select(0, samples) < limit
            return revealed if insertion else ~revealed

        scores = perturbed_target_scores(
            forward_func,
            setup,
            take_input,
            len(distinct),
            classes,
            apply_softmax,
        )
        columns = {count: scores[:, i] for i, count in enumerate(distinct)}
        columns[clean_count] = clean.to(scores.dtype)
        curves = torch.stack([columns[count] for count in counts], dim=1).double()
        auc = nan_where_non_finite(
            "insertion_auc" if insertion else "deletion_auc",
            trapezoid_auc(curves),
            curves,
        )
    if return_curves:
        return auc, curves
    return auc


@reading("insertion AUC", True)
@log_usage()
@restores_model_state
def insertion_auc(
    forward_func: Callable,
    inputs: TensorOrTupleOfTensorsGeneric,
    attributions: TensorOrTupleOfTensorsGeneric,
    target: TargetType = None,
    additional_forward_args: object = None,
    baselines: BaselineInput = "blur",
    feature_mask: Tensor | tuple[Tensor, ...] | None = None,
    n_steps: int = 100,
    apply_softmax: bool = True,
    max_examples_per_batch: int | None = None,
    return_curves: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Insertion AUC: how fast the target score recovers as the most important
    features are placed, in attribution order, onto a baseline.

    Features are ranked by their score (the sum of the attributions of their
    elements), highest first, ties broken by the lower feature index. Curve point
    k = 0..n_steps is the target score of the baseline with the top
    :math:`c_k = \operatorname{round}(kF/\text{n\_steps})` features taken from the
    input. The AUC integrates the curve over :math:`x = k/\text{n\_steps} \in [0, 1]`
    with the trapezoid rule. Higher is better. All copies of all samples are built
    as batched tensors and forwarded ``max_examples_per_batch`` at a time, under
    ``torch.no_grad()``.

    .. math::
        \text{AUC} = \frac{1}{n}\sum_{k=1}^{n} \frac{y_{k-1} + y_k}{2},\quad
        y_k = \phi\big(x \odot M_{c_k} + b \odot (1 - M_{c_k})\big)

    where :math:`M_c` selects the elements of the top-c features and :math:`\phi` is
    the target-class score.

    **The baseline decides whose home ground the metric is.** The default, a blur,
    is the baseline of Integrated Gradients from a blurred image, and deletion's
    default, zero, that of IG from a black image; each tends to win the metric
    that uses its own baseline. Two references serve as neutral ground: ``"mean"``,
    the image's mean colour (per channel), and ``"random_color"``, one random colour
    per image (FEI's kind of reference; the colours are FEI's own only when both
    are drawn from the same generator state):

    .. math::
        b_{n,c,h,w} = \underline{x}_{n,c} + u_{n,c}\,
        (\overline{x}_{n,c} - \underline{x}_{n,c}),\quad
        u_{n,c} \sim U[0, 1)

    with :math:`\underline{x}_{n,c}`, :math:`\overline{x}_{n,c}` the minimum and
    maximum of channel c of image n, so the colour lies inside the image's range.
    :math:`u_{n,c}` is seeded from one 64-bit number drawn from ``generator`` per
    call and a hash of image n's values: the same image gets the same colour
    alone, in any batch and at any position, given the generator in the same state.

    Args:

        forward_func (Callable): The model or any callable returning (N, n_classes)
                    outputs (a Hugging Face ``ModelOutput`` is reduced to its logits),
                    or one score per sample (N,) (with ``apply_softmax=False``).
        inputs (Tensor or tuple[Tensor, ...]): Input batch(es), first dimension N.
        attributions (Tensor or tuple[Tensor, ...]): Attributions of ``inputs``, same
                    shape or broadcastable to it with the same batch size (e.g. (N, 1,
                    H, W) for images).
        target (int, tuple, Tensor or list, optional): Class per sample, as in Captum.
                    None scores the class predicted on the unperturbed input.
                    Default: None
        additional_forward_args (Any, optional): Extra arguments for ``forward_func``,
                    after the inputs. As in Captum, tensors must have the batch size N
                    on dim 0 (each perturbed copy gets its sample's row); other values
                    are passed as they are.
                    Default: None
        baselines (str, scalar, Tensor, Callable or tuple, optional): What a hidden
                    feature shows: "zero", "mean" (per sample, per channel: the
                    image's mean colour), "blur" (Gaussian, kernel 11, sigma 5,
                    reflect padding), "random_color" (one random colour per image,
                    from ``generator``; images (N, C, H, W) only), a number, a tensor
                    broadcastable to the input, or a callable ``input -> tensor``; a
                    tuple holds one of these per input tensor.
                    Default: "blur"
        feature_mask (Tensor or tuple[Tensor, ...], optional): Integer ids, same id =
                    same feature (Captum's meaning); broadcastable to the input with
                    batch dimension 1 or N. None: one feature per spatial location for
                    4-D inputs (all channels together), one per element otherwise.
                    Default: None
        n_steps (int, optional): Number of curve segments (n_steps+1 points), >= 1.
                    Default: 100
        apply_softmax (bool, optional): Score = softmax probability of the target class
                    (True) or the raw output (False).
                    Default: True
        max_examples_per_batch (int, optional): Perturbed copies per forward pass. None
                    uses ``DEFAULT_MAX_EXAMPLES_PER_BATCH`` (64, the fastest measured on
                    CPU). The result does not depend on it.
                    Default: None
        return_curves (bool, optional): Also return the curves.
                    Default: False
        generator (torch.Generator, optional): Source of the colours of
                    ``baselines="random_color"``: one 64-bit number per call (per
                    input tensor, in order), mixed with each image's values. None
                    uses torch's global generator. The other baselines draw nothing.
                    Default: None

    Returns:
        Tensor or (Tensor, Tensor): AUC per sample, shape (N,), float64; with
        ``return_curves=True`` also the curves, shape (N, n_steps + 1), float64.

    Examples::

        >>> from captum.attr import Saliency
        >>> from captum_faithful.metrics import insertion_auc
        >>> attributions = Saliency(model).attribute(images, target=labels)
        >>> auc = insertion_auc(model, images, attributions, target=labels)
        >>> # on neutral ground: a random colour per image, reproducible
        >>> g = torch.Generator().manual_seed(0)
        >>> auc = insertion_auc(model, images, attributions, target=labels,
        ...                     baselines="random_color", generator=g)
    """
    return _curve(
        True,
        forward_func,
        inputs,
        attributions,
        target,
        additional_forward_args,
        baselines,
        feature_mask,
        n_steps,
        apply_softmax,
        max_examples_per_batch,
        return_curves,
        generator,
    )


@reading("deletion AUC", False)
@log_usage()
@restores_model_state
def deletion_auc(
    forward_func: Callable,
    inputs: TensorOrTupleOfTensorsGeneric,
    attributions: TensorOrTupleOfTensorsGeneric,
    target: TargetType = None,
    additional_forward_args: object = None,
    baselines: BaselineInput = "zero",
    feature_mask: Tensor | tuple[Tensor, ...] | None = None,
    n_steps: int = 100,
    apply_softmax: bool = True,
    max_examples_per_batch: int | None = None,
    return_curves: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Deletion AUC: how fast the target score falls as the most important
    features are replaced, in attribution order, by a baseline.

    Same ranking, feature counts and trapezoid rule as :func:`insertion_auc`; curve
    point k is the target score of the input with its top
    :math:`c_k = \operatorname{round}(kF/\text{n\_steps})` features replaced by the
    baseline. Lower is better. This is Quantus' pixel flipping with the AUC taken.
    The default baseline, zero, is the baseline of Integrated Gradients from a
    black image; ``"mean"`` and ``"random_color"`` are neutral ground (see
    :func:`insertion_auc`).

    .. math::
        \text{AUC} = \frac{1}{n}\sum_{k=1}^{n} \frac{y_{k-1} + y_k}{2},\quad
        y_k = \phi\big(b \odot M_{c_k} + x \odot (1 - M_{c_k})\big)

    Args:

        forward_func (Callable): The model or any callable returning (N, n_classes)
                    outputs, or one score per sample (N,) (with
                    ``apply_softmax=False``).
        inputs (Tensor or tuple[Tensor, ...]): Input batch(es), first dimension N.
        attributions (Tensor or tuple[Tensor, ...]): Attributions of ``inputs``, same
                    shape or broadcastable to it with the same batch size.
        target (int, tuple, Tensor or list, optional): Class per sample; None scores the
                    class predicted on the unperturbed input.
                    Default: None
        additional_forward_args (Any, optional): Extra arguments for ``forward_func``
                    (see :func:`insertion_auc`).
                    Default: None
        baselines (str, scalar, Tensor, Callable or tuple, optional): "zero", "mean"
                    (the image's mean colour), "blur", "random_color" (one random
                    colour per image, from ``generator``), a number, a tensor or a
                    callable (see :func:`insertion_auc`).
                    Default: "zero"
        feature_mask (Tensor or tuple[Tensor, ...], optional): Feature ids (see
                    :func:`insertion_auc`).
                    Default: None
        n_steps (int, optional): Number of curve segments, >= 1.
                    Default: 100
        apply_softmax (bool, optional): Softmax probability (True) or raw output.
                    Default: True
        max_examples_per_batch (int, optional): Perturbed copies per forward pass; None
                    uses ``DEFAULT_MAX_EXAMPLES_PER_BATCH``.
                    Default: None
        return_curves (bool, optional): Also return the curves.
                    Default: False
        generator (torch.Generator, optional): Source of the colours of
                    ``baselines="random_color"`` (see :func:`insertion_auc`); None
                    uses torch's global generator.
                    Default: None

    Returns:
        Tensor or (Tensor, Tensor): AUC per sample, shape (N,), float64; with
        ``return_curves=True`` also the curves, shape (N, n_steps + 1), float64.

    Examples::

        >>> from captum_faithful.metrics import deletion_auc
        >>> auc = deletion_auc(model, images, attributions, target=labels)
    """
    return _curve(
        False,
        forward_func,
        inputs,
        attributions,
        target,
        additional_forward_args,
        baselines,
        feature_mask,
        n_steps,
        apply_softmax,
        max_examples_per_batch,
        return_curves,
        generator,
    )
