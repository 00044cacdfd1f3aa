"""Faithfulness correlation, MuFidelity (Bhatt et al. 2020)."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from captum.log import log_usage
from torch import Tensor

from captum_faithful._arguments import format_baselines
from captum_faithful._typing import (
    BaselineInput,
    TargetType,
    TensorOrTupleOfTensorsGeneric,
)
from captum_faithful._utils import check_bool, check_choice, check_int
from captum_faithful.metrics._utils import (
    CORRELATIONS,
    MetricInputs,
    check_generator,
    clean_target_scores,
    feature_scores,
    nan_where_non_finite,
    perturbed_target_scores,
    prepare_metric_inputs,
    reading,
    resolve_random_color,
    restores_model_state,
    uses_random_color,
)


def subset_count(subset_size: Any, n_features: int) -> int:
    """Number of features per subset: ``subset_size`` itself when it is an int
    (1 <= size <= F), else ``max(1, round(subset_size * F))`` for a fraction in
    (0, 1]."""
    if isinstance(subset_size, numbers.Integral) and not isinstance(subset_size, bool):
        if not 1 <= int(subset_size) <= n_features:
            raise ValueError(
                f"`subset_size` as a count must be in [1, {n_features}] (the number "
                f"of features), got {subset_size}"
            )
        return int(subset_size)
    if isinstance(subset_size, numbers.Real) and not isinstance(subset_size, bool):
        if not 0.0 < float(subset_size) <= 1.0:
            raise ValueError(
                "`subset_size` as a fraction must be in (0, 1], got "
                f"{float(subset_size)}"
            )
        return max(1, round(float(subset_size) * n_features))
    raise TypeError(
        "`subset_size` must be a fraction in (0, 1] or a feature count, got "
        f"{subset_size!r}"
    )


def smallest_k_members(keys: Tensor, k: int) -> Tensor:
    """Boolean rows marking the ``k`` smallest entries of every row of the 2-D CPU
    tensor ``keys``; a tie at the threshold goes to the lower index. Uses numpy's
    introselect (linear time) and falls back to a stable sort for tied rows."""
    threshold = np.partition(keys.numpy(), k - 1, axis=1)[:, k - 1 : k]
    members = keys <= torch.from_numpy(threshold)
    tied = (members.sum(dim=1) != k).nonzero().flatten()
    if tied.numel():
        smallest = keys[tied].argsort(dim=1, stable=True)[:, :k]
        members[tied] = torch.zeros_like(members[tied]).scatter_(1, smallest, True)
    return members


def random_feature_subsets(
    n_examples: int,
    n_samples: int,
    n_features: int,
    size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean membership (N, n_samples, F) of uniformly random ``size``-subsets,
    the same ``n_samples`` subsets for every example.

    One integer drawn from ``generator`` (torch's global generator if None) seeds
    a numpy PCG64 generator (several times faster than torch's CPU generator),
    which draws ``n_samples x F`` float32 keys; each subset holds the ``size``
    features with the smallest keys (:func:`smallest_k_members`). Sharing the
    subsets makes an example's value independent of the batch it is in (with
    subsets drawn example after example, the same image alone and at position 3
    of a batch would get different subsets from the same seed). The result is an
    expanded view: one (n_samples, F) draw in memory.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    keys = np.random.default_rng(seed).random((n_samples, n_features), dtype=np.float32)
    members = smallest_k_members(torch.from_numpy(keys), size).to(device)
    return members.unsqueeze(0).expand(n_examples, -1, -1)


def faithfulness_correlation_for_subsets(
    forward_func: Callable,
    setup: MetricInputs,
    subsets: Tensor,
    correlation: str,
    apply_softmax: bool,
) -> Tensor:
    """Faithfulness correlation for given feature subsets ``subsets``
    (N, n_samples, F) boolean: the correlation, over the subsets, between the
    summed attribution of a subset and the score drop when it is replaced by the
    baseline. Used by :func:`faithfulness_correlation` and by benchmarks that
    replay another library's subsets."""
    with torch.no_grad():
        clean, classes = clean_target_scores(forward_func, setup, apply_softmax)
        scores = feature_scores(
            setup.attributions, setup.inputs, setup.feature_ids, setup.n_features
        )
        subsets = subsets.to(scores.device)

        def take_input(samples: Tensor, perturbations: Tensor) -> Tensor:
            return ~subsets[samples, perturbations]

        perturbed = perturbed_target_scores(
            forward_func,
            setup,
            take_input,
            subsets.shape[1],
            classes,
            apply_softmax,
        )
        attribution_sums = torch.stack(
            [
                members.to(torch.float64) @ row
                for members, row in zip(subsets, scores, strict=True)
            ]
        )
        drops = clean.double().unsqueeze(1) - perturbed.double()
        return nan_where_non_finite(
            "faithfulness_correlation",
            CORRELATIONS[correlation](attribution_sums, drops),
            clean,
            perturbed,
        )


@reading("faithfulness corr.", True)
@log_usage()
@restores_model_state
def faithfulness_correlation(
    forward_func: Callable,
    inputs: TensorOrTupleOfTensorsGeneric,
    attributions: TensorOrTupleOfTensorsGeneric,
    target: TargetType = None,
    additional_forward_args: object = None,
    baselines: BaselineInput = "zero",
    feature_mask: Tensor | tuple[Tensor, ...] | None = None,
    subset_size: float | int = 0.25,
    n_samples: int = 100,
    correlation: str = "pearson",
    apply_softmax: bool = False,
    max_examples_per_batch: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Faithfulness correlation (MuFidelity, Bhatt et al. 2020).

    For ``n_samples`` random subsets S of the features (each of ``subset_size``
    features, drawn uniformly without replacement from ``generator``, see
    :func:`random_feature_subsets`), replace S by the baseline and record the drop
    of the target score; the metric is the correlation, over the subsets, between
    the summed attribution of S and that drop. All examples of a call share the same
    subsets, so an example's value does not depend on the other examples of its
    batch. A feature's attribution is the sum of the
    attributions of its elements. NaN when either side is constant.

    .. math::
        \mu_F = \operatorname{corr}_{S}\Big(\sum_{i \in S} a_i,\;
        \phi(x) - \phi(x_{S \to b})\Big)

    The default baseline, zero, is the baseline of Integrated Gradients from a
    black image; ``"mean"`` (the image's mean colour) and ``"random_color"`` (one
    random colour per image inside its range, see
    :func:`~captum_faithful.metrics.insertion_auc` for the formula) are neutral
    ground. ``"random_color"`` draws from ``generator`` after the subsets, so the
    subsets are the same as under any other baseline with the same generator.

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
                    (tensors with the batch size N on dim 0, see
                    :func:`~captum_faithful.metrics.insertion_auc`).
                    Default: None
        baselines (str, scalar, Tensor, Callable or tuple, optional): "zero", "mean"
                    (the image's mean colour), "blur", "random_color" (one random
                    colour per image, from ``generator``; images (N, C, H, W) only),
                    a number, a tensor or a callable.
                    Default: "zero"
        feature_mask (Tensor or tuple[Tensor, ...], optional): Feature ids, Captum's
                    meaning; None: one feature per spatial location for 4-D inputs, one
                    per element otherwise.
                    Default: None
        subset_size (float or int, optional): Fraction of the features in (0, 1]
                    (rounded, at least one) or a feature count.
                    Default: 0.25
        n_samples (int, optional): Number of random subsets, >= 2.
                    Default: 100
        correlation (str, optional): "pearson" or "spearman".
                    Default: "pearson"
        apply_softmax (bool, optional): Softmax probability (True) or raw output
                    (False).
                    Default: False
        max_examples_per_batch (int, optional): Perturbed copies per forward pass; None
                    uses ``DEFAULT_MAX_EXAMPLES_PER_BATCH``.
                    Default: None
        generator (torch.Generator, optional): Source of the random subsets (one draw
                    per call, shared by all examples) and then of the colours of
                    ``baselines="random_color"`` (one 64-bit number per input
                    tensor, mixed with each image's values); None uses torch's
                    global generator.
                    Default: None

    Returns:
        Tensor: Correlation per sample, shape (N,), float64.

    Examples::

        >>> from captum_faithful.metrics import faithfulness_correlation
        >>> g = torch.Generator().manual_seed(0)
        >>> mu = faithfulness_correlation(model, images, attributions,
        ...                               target=labels, generator=g)
    """
    n_samples = check_int("n_samples", n_samples, 2)
    check_choice("correlation", correlation, tuple(CORRELATIONS))
    check_bool("apply_softmax", apply_softmax)
    check_generator(generator)
    # The subsets are drawn first, so that they do not depend on the baseline: the
    # random colours are drawn after them (a placeholder stands in until then).
    random_colors = uses_random_color(baselines)
    setup = prepare_metric_inputs(
        inputs,
        attributions,
        resolve_random_color(baselines, generator, placeholder=True),
        feature_mask,
        target,
        max_examples_per_batch,
        additional_forward_args,
    )
    size = subset_count(subset_size, setup.n_features)
    subsets = random_feature_subsets(
        setup.n_examples,
        n_samples,
        setup.n_features,
        size,
        generator,
        setup.feature_ids[0].device,
    )
    if random_colors:
        resolved = resolve_random_color(baselines, generator)
        setup = dataclasses.replace(
            setup, baselines=format_baselines(resolved, setup.inputs)
        )
    return faithfulness_correlation_for_subsets(
        forward_func, setup, subsets, correlation, apply_softmax
    )
