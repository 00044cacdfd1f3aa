"""Path monotonicity (UNI, Table 1): does the score rise from the baseline to x?"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from captum_faithful._compat import _format_additional_forward_args
from captum_faithful._utils import (
    check_finite,
    check_int,
    resolve_targets,
    run_forward,
)


def _format(inputs: Any) -> tuple[tuple[Tensor, ...], int]:
    formatted = inputs if isinstance(inputs, tuple) else (inputs,)
    if not formatted or not all(isinstance(t, Tensor) for t in formatted):
        raise TypeError(
            "`inputs` must be a tensor or a non-empty tuple of tensors, got "
            f"{type(inputs).__name__}"
        )
    if any(t.dim() == 0 for t in formatted):
        raise ValueError("`inputs` need a leading batch dimension")
    n_examples = formatted[0].shape[0]
    if n_examples == 0 or any(t.shape[0] != n_examples for t in formatted):
        raise ValueError(
            "`inputs` must share a batch size >= 1 on dim 0, got shapes "
            f"{[tuple(t.shape) for t in formatted]}"
        )
    if not all(t.is_floating_point() for t in formatted):
        raise TypeError("`inputs` must be floating-point tensors")
    check_finite("inputs", formatted)
    return formatted, n_examples


def _baselines(baselines: Any, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    if callable(baselines) and not isinstance(baselines, Tensor):
        baselines = baselines(inputs if len(inputs) > 1 else inputs[0])
    formatted = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(formatted) != len(inputs):
        raise ValueError(
            f"`baselines` must hold one baseline per input ({len(inputs)}), got "
            f"{len(formatted)}"
        )
    result = []
    for i, (baseline, x) in enumerate(zip(formatted, inputs, strict=True)):
        if isinstance(baseline, bool) or not isinstance(baseline, (Tensor, int, float)):
            raise TypeError(
                f"`baselines[{i}]` must be a tensor, a number or a callable, got "
                f"{type(baseline).__name__}"
            )
        baseline = torch.as_tensor(baseline, device=x.device)
        check_finite("baselines", baseline)
        try:
            result.append(torch.broadcast_to(baseline.to(x.dtype), x.shape))
        except RuntimeError as err:
            raise ValueError(
                f"`baselines[{i}]` of shape {tuple(baseline.shape)} cannot be "
                f"broadcast to the input shape {tuple(x.shape)}"
            ) from err
    return tuple(result)


def average_ranks(values: Tensor) -> Tensor:
    """Ranks (1-based) along the last dimension, ties sharing their average rank."""
    less = (values.unsqueeze(-2) < values.unsqueeze(-1)).sum(dim=-1)
    equal = (values.unsqueeze(-2) == values.unsqueeze(-1)).sum(dim=-1)
    return less.to(values.dtype) + (equal.to(values.dtype) + 1) / 2


def spearman_with_position(scores: Tensor) -> Tensor:
    """Spearman correlation of each row of ``scores`` (N, K) with 0, 1, ..., K-1.

    NaN for a row without variation (a constant score along the path).
    """
    scores = scores.double()
    ranks = average_ranks(scores)
    positions = torch.arange(
        1, scores.shape[1] + 1, dtype=torch.float64, device=scores.device
    )
    ranks = ranks - ranks.mean(dim=1, keepdim=True)
    positions = positions - positions.mean()
    numerator = (ranks * positions).sum(dim=1)
    denominator = ranks.norm(dim=1) * positions.norm()
    return torch.where(
        denominator > 0, numerator / denominator, torch.full_like(numerator, torch.nan)
    )


def path_monotonicity(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    baselines: Any,
    target: Any = None,
    additional_forward_args: Any = None,
    n_steps: int = 15,
    apply_softmax: bool = True,
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
    score gives NaN. Runs under ``torch.no_grad()``, one forward pass of the batch
    per path point.

    Args:

        forward_func (Callable): The model's forward function, returning
                (N, n_classes) scores or a ``ModelOutput`` with ``logits``.
        inputs (Tensor or tuple[Tensor, ...]): The explained inputs
                (the end of the path), batch on dim 0.
        baselines (scalar, Tensor, tuple, or Callable): The start of the path:
                a number or a tensor broadcastable to each input (one per input
                in a tuple), or a callable ``inputs -> baselines`` (e.g.
                ``UnlearnedIntegratedGradients(model).compute_baselines``).
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

    Returns:
        *Tensor* of shape (N,), float64: the Spearman correlation per sample.

    Examples::

        >>> uni = UnlearnedIntegratedGradients(net)
        >>> baselines = uni.compute_baselines(images)
        >>> pm = path_monotonicity(net, images, baselines, target=labels)
        >>> pm_black = path_monotonicity(net, images, 0.0, target=labels)
    """
    n_steps = check_int("n_steps", n_steps, minimum=1)
    if not isinstance(apply_softmax, bool):
        raise TypeError(f"`apply_softmax` must be a bool, got {apply_softmax!r}")
    formatted, _ = _format(inputs)
    args = _format_additional_forward_args(additional_forward_args)
    with torch.no_grad():
        starts = _baselines(baselines, formatted)
        output = run_forward(forward_func, formatted, args)
        classes = resolve_targets(output, target)
        rows = torch.arange(classes.shape[0], device=classes.device)
        scores = []
        for k in range(n_steps + 1):
            alpha = k / n_steps
            point = tuple(
                b + alpha * (x - b) for x, b in zip(formatted, starts, strict=True)
            )
            out = output if k == n_steps else run_forward(forward_func, point, args)
            if apply_softmax:
                out = torch.softmax(out, dim=1)
            scores.append(out[rows, classes])
    return spearman_with_position(torch.stack(scores, dim=1))
