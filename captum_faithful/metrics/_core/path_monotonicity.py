"""Path monotonicity (UNI, Table 1): does the score rise from the baseline to x?"""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.log import log_usage
from torch import Tensor

from captum_faithful._arguments import (
    explained_dtype_errors,
    format_additional_forward_args,
    format_baselines,
    format_inputs,
    format_target,
    resolve_target,
)
from captum_faithful._typing import BaselineInput, TargetType
from captum_faithful._utils import check_bool, check_int, module_of
from captum_faithful.metrics._utils import (
    chunked_outputs,
    chunked_target_scores,
    nan_where_non_finite,
    reading,
    resolve_chunk_size,
    restores_model_state,
    scores_of_classes,
    spearman_correlation,
)


@reading("path monotonicity", True)
@log_usage()
@restores_model_state
def path_monotonicity(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    baselines: BaselineInput,
    target: TargetType = None,
    additional_forward_args: object = None,
    n_steps: int = 15,
    apply_softmax: bool = True,
    max_examples_per_batch: int | None = None,
) -> Tensor:
    r"""
    Path monotonicity measures whether the model's confidence rises steadily along
    the straight path of a path attribution (Integrated Gradients, UNI) from the
    baseline to the input, as it should when the baseline is "featureless" (UNI,
    Table 1). It is the Spearman rank correlation between the position on the path
    and the target score there:

    .. math::
        \mathrm{PM}(x, x') = \rho_{\mathrm{Spearman}}\Big(
        \big(\tfrac{k}{B}\big)_{k=0}^{B},\;
        \big(s_c(x' + \tfrac{k}{B}(x - x'))\big)_{k=0}^{B}\Big)

    with :math:`s_c` the softmax probability of the target class (or the raw
    output when ``apply_softmax=False``). 1 is a monotonically increasing path,
    -1 a decreasing one; tied scores share their average rank, and a constant
    score gives NaN. Runs under ``torch.no_grad()``; the ``N * (n_steps + 1)`` path
    points are forwarded ``max_examples_per_batch`` at a time.

    Args:

        forward_func (Callable): The model's forward function, returning
                (N, n_classes) scores or a ``ModelOutput`` with ``logits``, or
                one score per sample (N,) (with ``apply_softmax=False``).
        inputs (Tensor or tuple[Tensor, ...]): The explained inputs
                (the end of the path), batch on dim 0.
        baselines (scalar, Tensor, str, Callable, or tuple): The start of the
                path, in the forms every metric accepts: a number or a tensor
                broadcastable to the input, a preset ``"zero"``, ``"mean"`` or
                ``"blur"``, a callable ``input -> baseline`` applied to each input
                tensor (e.g. ``UnlearnedIntegratedGradients(model)
                .compute_baselines``), or a tuple with one per input.
        target (int, Tensor, or list, optional): The class whose score is
                followed; None takes the class predicted on ``inputs``.
                Default: None
        additional_forward_args (Any, optional): Passed to ``forward_func``
                after the inputs, as in Captum.
                Default: None
        n_steps (int, optional): :math:`B`; the path has ``n_steps + 1`` points
                from the baseline (k = 0) to the input (k = B).
                Default: 15
        apply_softmax (bool, optional): Score the softmax probability (True) or
                the raw output (False).
                Default: True
        max_examples_per_batch (int, optional): Path points per forward pass;
                None uses the metrics' default chunk size.
                Default: None

    Returns:
        Tensor: the Spearman correlation per sample, shape (N,), float64.

    Examples::

        >>> uni = UnlearnedIntegratedGradients(net)
        >>> baselines = uni.compute_baselines(images)
        >>> pm = path_monotonicity(net, images, baselines, target=labels)
        >>> pm_black = path_monotonicity(net, images, 0.0, target=labels)
    """
    n_steps = check_int("n_steps", n_steps, minimum=1)
    check_bool("apply_softmax", apply_softmax)
    chunk_size = resolve_chunk_size(max_examples_per_batch)
    formatted, _ = format_inputs(inputs)
    n_examples = formatted[0].shape[0]
    target = format_target(target, n_examples)
    args = format_additional_forward_args(additional_forward_args, n_examples)
    starts = format_baselines(baselines, formatted)
    with torch.no_grad():
        with explained_dtype_errors(formatted, module_of(forward_func)):
            output = chunked_outputs(forward_func, formatted, args, chunk_size)
        scores_of_classes(output, apply_softmax)  # refuses a softmax over (N,)
        classes = resolve_target(output, target)
        device = formatted[0].device

        def build_rows(samples: Tensor, points: Tensor) -> tuple[Tensor, ...]:
            rows = []
            for x, b in zip(formatted, starts, strict=True):
                alpha = (points.to(x.dtype) / n_steps).view(-1, *([1] * (x.dim() - 1)))
                x_rows, b_rows = x.index_select(0, samples), b.index_select(0, samples)
                rows.append(b_rows + alpha * (x_rows - b_rows))
            return tuple(rows)

        scores = chunked_target_scores(
            forward_func,
            build_rows,
            n_examples,
            n_steps + 1,
            classes,
            args,
            apply_softmax,
            chunk_size,
            device,
        )
    positions = torch.arange(n_steps + 1, dtype=torch.float64, device=scores.device)
    return nan_where_non_finite(
        "path_monotonicity",
        spearman_correlation(positions.expand(n_examples, -1), scores),
        scores,
    )
