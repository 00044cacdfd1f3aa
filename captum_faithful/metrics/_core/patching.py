"""How close attribution patching is to activation patching (UNI, Table 8)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_faithful.metrics._utils import reading, spearman_correlation


def _check_pair(attributions: Any, reference: Any) -> tuple[Tensor, Tensor]:
    """Both real tensors of one shape (N, ...) with N >= 1 and at least one value
    per example, free of NaN/Inf; flattened to (N, n_values)."""
    for name, value in (("attributions", attributions), ("reference", reference)):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"`{name}` must be a tensor (N, n_sites, n_tokens), got "
                f"{type(value).__name__}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"`{name}` must hold real numbers, got {value.dtype}")
        if value.dim() < 2 or value.shape[0] == 0 or value[0].numel() == 0:
            raise ValueError(
                f"`{name}` must have shape (N, n_sites, n_tokens) with N >= 1 and "
                f"at least one value per example, got {tuple(value.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"`{name}` contains NaN or Inf values")
    if attributions.shape != reference.shape:
        raise ValueError(
            "`attributions` and `reference` must have the same shape, got "
            f"{tuple(attributions.shape)} and {tuple(reference.shape)}"
        )
    n_examples = attributions.shape[0]
    return (
        attributions.reshape(n_examples, -1).to(torch.float64),
        reference.reshape(n_examples, -1).to(torch.float64),
    )


@reading("patching distance", False)
def patching_distance(attributions: Tensor, reference: Tensor) -> Tensor:
    r"""
    The L2 distance, per example, between attribution-patching scores and the
    exact activation-patching effects they approximate, over all sites and tokens:
    the faithfulness measure of the UNI paper's language-model experiment (Table
    8, reported as the mean over prompts). Lower is more faithful; 0 is exact.

    .. math::
        D(x) = \Big( \sum_{e} \big(A^{\mathrm{ATTR}}_e(x) -
        A^{\mathrm{ACT}}_e(x)\big)^2 \Big)^{1/2}

    Args:

        attributions (Tensor): Attribution-patching scores (N, n_sites,
                    n_tokens), e.g. from
                    :meth:`~captum_faithful.AttributionPatching.attribute`.
        reference (Tensor): Activation-patching effects of the same shape, e.g.
                    from :func:`~captum_faithful.activation_patching` on the same
                    baseline.

    Returns:
        *Tensor* (N,) of distances, float64.

    Examples::

        >>> patching = AttributionPatching(model)
        >>> x_prime = patching.compute_baselines(input_ids)
        >>> approx = patching.attribute(input_ids, baselines=x_prime)
        >>> exact = activation_patching(model, input_ids, x_prime)
        >>> patching_distance(approx, exact).mean()
    """
    a, r = _check_pair(attributions, reference)
    return torch.linalg.vector_norm(a - r, dim=1)


@reading("patching rank corr.", True)
def patching_rank_correlation(attributions: Tensor, reference: Tensor) -> Tensor:
    r"""
    The Spearman rank correlation, per example, between attribution-patching
    scores and the exact activation-patching effects, over all sites and tokens:
    whether attribution patching orders the activations as activation patching
    does, whatever their scale. 1 is the same order, -1 the reverse; tied values
    share their average rank, and an example whose scores (or effects) are all
    equal gives NaN.

    .. math::
        \rho(x) = \rho_{\mathrm{Spearman}}\big((A^{\mathrm{ATTR}}_e(x))_e,\;
        (A^{\mathrm{ACT}}_e(x))_e\big)

    Args:

        attributions (Tensor): Attribution-patching scores (N, n_sites,
                    n_tokens).
        reference (Tensor): Activation-patching effects of the same shape.

    Returns:
        *Tensor* (N,) of correlations in [-1, 1] (NaN for constant examples),
        float64.

    Examples::

        >>> patching_rank_correlation(approx, exact)
    """
    a, r = _check_pair(attributions, reference)
    return spearman_correlation(a, r)
