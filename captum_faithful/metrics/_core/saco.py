"""Salience-guided faithfulness coefficient, SaCo (Wu et al., CVPR 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.log import log_usage
from torch import Tensor

from captum_faithful._typing import (
    BaselineInput,
    TargetType,
    TensorOrTupleOfTensorsGeneric,
)
from captum_faithful._utils import check_bool, check_int
from captum_faithful.metrics._utils import (
    clean_target_scores,
    compact_indices,
    feature_scores,
    nan_where_non_finite,
    perturbed_target_scores,
    prepare_metric_inputs,
    rank_features,
    reading,
    restores_model_state,
)


def rank_groups(n_features: int, n_groups: int, device: torch.device) -> Tensor:
    """Group of each rank, shape (F,): K groups of consecutive ranks whose sizes
    differ by at most one, the larger groups first (``torch.tensor_split``)."""
    ranks = torch.arange(n_features, device=device)
    group = torch.empty_like(ranks)
    for index, members in enumerate(ranks.tensor_split(n_groups)):
        group[members] = index
    return group


def saco_from_groups(group_scores: Tensor, deltas: Tensor) -> Tensor:
    r"""SaCo of each sample from its group attribution sums ``group_scores`` and
    score drops ``deltas`` (both (N, K), groups in rank order); NaN when every pair
    weight is zero.

    .. math::
        \text{SaCo} = \frac{\sum_{i<j} w_{ij}}{\sum_{i<j} |w_{ij}|},\quad
        w_{ij} = \begin{cases} s_i - s_j & \Delta_i \ge \Delta_j \\
        -(s_i - s_j) & \text{otherwise} \end{cases}
    """
    s = group_scores.to(torch.float64)
    d = deltas.to(torch.float64)
    n_groups = s.shape[1]
    difference = s.unsqueeze(2) - s.unsqueeze(1)
    agrees = d.unsqueeze(2) >= d.unsqueeze(1)
    weights = torch.where(agrees, difference, -difference)
    pairs = torch.ones(n_groups, n_groups, dtype=torch.bool, device=s.device).triu(1)
    numerator = (weights * pairs).sum(dim=(1, 2))
    denominator = (weights.abs() * pairs).sum(dim=(1, 2))
    return torch.where(denominator > 0, numerator / denominator, torch.nan)


@reading("SaCo", True)
@log_usage()
@restores_model_state
def saco(
    forward_func: Callable,
    inputs: TensorOrTupleOfTensorsGeneric,
    attributions: TensorOrTupleOfTensorsGeneric,
    target: TargetType = None,
    additional_forward_args: object = None,
    baselines: BaselineInput = "mean",
    feature_mask: Tensor | tuple[Tensor, ...] | None = None,
    n_groups: int = 10,
    apply_softmax: bool = True,
    max_examples_per_batch: int | None = None,
) -> Tensor:
    r"""Salience-guided faithfulness coefficient (SaCo).

    Features are ranked by their attribution score (sum over their elements,
    descending, ties by feature index) and cut into K = ``n_groups`` groups of
    consecutive ranks whose sizes differ by at most one (larger groups first). Each
    group is replaced by the baseline on its own (not cumulatively) and the drop of
    the target score :math:`\Delta_i = \phi(x) - \phi(x_{G_i \to b})` is recorded.
    A faithful attribution gives a larger attribution sum :math:`s_i` to the group
    whose removal hurts more: every pair i < j contributes :math:`+|s_i - s_j|` when
    the orders agree and :math:`-|s_i - s_j|` when they do not. The result lies in
    [-1, 1]; it is NaN when all groups have the same attribution sum.

    .. math::
        \text{SaCo} = \frac{\sum_{i<j} w_{ij}}{\sum_{i<j} |w_{ij}|},\quad
        w_{ij} = \begin{cases} s_i - s_j & \Delta_i \ge \Delta_j \\
        -(s_i - s_j) & \text{otherwise} \end{cases}

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
                    (per sample, per channel), "blur", a number, a tensor or a callable
                    ``input -> tensor``.
                    Default: "mean"
        feature_mask (Tensor or tuple[Tensor, ...], optional): Feature ids, Captum's
                    meaning; None: one feature per spatial location for 4-D inputs, one
                    per element otherwise.
                    Default: None
        n_groups (int, optional): Number of groups K, 2 <= K <= number of features.
                    Default: 10
        apply_softmax (bool, optional): Softmax probability (True) or raw output.
                    Default: True
        max_examples_per_batch (int, optional): Perturbed copies per forward pass; None
                    uses ``DEFAULT_MAX_EXAMPLES_PER_BATCH``.
                    Default: None

    Returns:
        Tensor: SaCo per sample, shape (N,), float64.

    Examples::

        >>> from captum_faithful.metrics import patch_mask, saco
        >>> score = saco(model, images, attributions, target=labels,
        ...              feature_mask=patch_mask(images, 16))
    """
    n_groups = check_int("n_groups", n_groups, 2)
    check_bool("apply_softmax", apply_softmax)
    setup = prepare_metric_inputs(
        inputs,
        attributions,
        baselines,
        feature_mask,
        target,
        max_examples_per_batch,
        additional_forward_args,
    )
    if n_groups > setup.n_features:
        raise ValueError(
            f"`n_groups` must be <= the number of features ({setup.n_features}), "
            f"got {n_groups}"
        )
    with torch.no_grad():
        clean, classes = clean_target_scores(forward_func, setup, apply_softmax)
        scores = feature_scores(
            setup.attributions, setup.inputs, setup.feature_ids, setup.n_features
        )
        groups = rank_groups(setup.n_features, n_groups, scores.device)
        feature_group = groups[rank_features(scores)]

        compact_group = compact_indices(feature_group, n_groups)

        def take_input(samples: Tensor, perturbations: Tensor) -> Tensor:
            groups_of_rows = compact_group.index_select(0, samples)
            return groups_of_rows != perturbations.to(groups_of_rows.dtype).unsqueeze(1)

        removed = perturbed_target_scores(
            forward_func,
            setup,
            take_input,
            n_groups,
            classes,
            apply_softmax,
        )
        group_scores = torch.zeros(
            setup.n_examples, n_groups, dtype=torch.float64, device=scores.device
        ).scatter_add_(1, feature_group, scores)
        deltas = clean.unsqueeze(1).double() - removed.double()
        return nan_where_non_finite(
            "saco", saco_from_groups(group_scores, deltas), clean, removed
        )
