"""Model parameter randomisation sanity check (Adebayo et al. 2018)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import (
    explained_dtype_errors,
    format_inputs,
    format_target,
    non_finite_rows,
)
from captum_faithful._compat import TargetType, TensorOrTupleOfTensorsGeneric
from captum_faithful._utils import check_choice
from captum_faithful.metrics._utils import (
    CORRELATIONS,
    cosine_similarity,
    reading,
    warn_non_finite,
)

SIMILARITIES = {**CORRELATIONS, "cosine": cosine_similarity}


def parameterised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in definition order, with their names
    (the root module is called ``"<model>"``)."""
    return [
        (name or "<model>", module)
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]


def randomize_layer_(layer: nn.Module, generator: torch.Generator | None) -> None:
    r"""Replace every parameter the layer owns, in place, by independent draws from
    :math:`\mathcal{N}(0, \sigma^2)`, σ the standard deviation of the original
    tensor (its RMS when the tensor is constant, 1 when it is all zero).
    Only for the deep copy made by :func:`parameter_randomization`."""
    with torch.no_grad():
        for param in layer.parameters(recurse=False):
            values = param.detach().to(torch.float64)
            sigma = float(values.std()) if values.numel() > 1 else 0.0
            if sigma == 0.0:
                sigma = float(values.pow(2).mean().sqrt()) or 1.0
            gen_device = generator.device if generator is not None else "cpu"
            noise = torch.randn(
                param.shape, generator=generator, device=gen_device, dtype=torch.float64
            )
            param.copy_((sigma * noise).to(device=param.device, dtype=param.dtype))


def _flatten_attributions(attributions: Any, n: int) -> Tensor:
    items = attributions if isinstance(attributions, (tuple, list)) else (attributions,)
    if not items or not all(isinstance(a, Tensor) for a in items):
        raise TypeError(
            "`explain` must return a tensor or a tuple of tensors, got "
            f"{type(attributions).__name__}"
        )
    if any(a.dim() < 1 or a.shape[0] != n for a in items):
        raise ValueError(
            f"`explain` must return attributions with batch size {n}, got shapes "
            f"{[tuple(a.shape) for a in items]}"
        )
    return torch.cat([a.detach().reshape(n, -1).to(torch.float64) for a in items], 1)


@reading("similarity after randomisation", False)
@log_usage()
def parameter_randomization(
    explain: Callable[[nn.Module, Any, TargetType], Any],
    model: nn.Module,
    inputs: TensorOrTupleOfTensorsGeneric,
    target: TargetType = None,
    order: str = "top_down",
    similarity: str = "spearman",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Cascading model parameter randomisation (Adebayo et al. 2018).

    An explanation that depends on what the model learned must change when the
    model's weights are destroyed. On a deep copy of ``model`` (the user's model is
    never touched), the layers that own parameters are randomised one after the
    other, cumulatively — from the output layer backwards (``"top_down"``, in
    reverse definition order) or from the input forwards (``"bottom_up"``) — and
    after each layer the attribution ``explain(model_copy, inputs, target)`` is
    compared with the attribution of the intact copy. Low similarity is good: the
    explanation is sensitive to the parameters.

    A randomised parameter tensor gets independent draws from
    :math:`\mathcal{N}(0, \sigma^2)` with σ the standard deviation of the original
    tensor (its RMS when constant, 1 when all zero), from ``generator``.

    .. math::
        \rho_\ell = \operatorname{sim}\big(E(f_\theta, x),\,
        E(f_{\tilde\theta_{\le \ell}}, x)\big)

    Args:

        explain (Callable): ``explain(model, inputs, target) -> attributions`` (a tensor
                    or tuple of tensors with batch size N), e.g. ``lambda m, x, t:
                    Saliency(m).attribute(x, target=t)``.
        model (nn.Module): The model; copied with ``copy.deepcopy``.
        inputs (Tensor or tuple[Tensor, ...]): Input batch(es), first dimension N.
        target (int, tuple, Tensor or list, optional): Passed to ``explain`` as is.
                    Default: None
        order (str, optional): "top_down" or "bottom_up".
                    Default: "top_down"
        similarity (str, optional): "spearman" (rank correlation of the flattened
                    attributions), "pearson" or "cosine" (two all-zero attributions are
                    identical, 1; an all-zero one against another, 0; see
                    :func:`~captum_faithful.metrics._utils.cosine_similarity`).
                    Default: "spearman"
        generator (torch.Generator, optional): Source of the random weights; None uses
                    torch's global generator.
                    Default: None

    Returns:
        dict[str, Tensor]: For each randomised layer (by module name, in
        randomisation order), the similarity per sample, shape (N,), float64.

    Examples::

        >>> from captum.attr import Saliency
        >>> from captum_faithful.metrics import parameter_randomization
        >>> explain = lambda m, x, t: Saliency(m).attribute(x, target=t)
        >>> per_layer = parameter_randomization(explain, model, images, labels)
    """
    if not callable(explain):
        raise TypeError(f"`explain` must be callable, got {type(explain).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    check_choice("order", order, ("top_down", "bottom_up"))
    check_choice("similarity", similarity, tuple(SIMILARITIES))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator, got {type(generator).__name__}"
        )
    items, is_tuple = format_inputs(inputs)
    # the checked inputs, in the form the user passed
    inputs = cast(TensorOrTupleOfTensorsGeneric, items if is_tuple else items[0])
    n = items[0].shape[0]
    format_target(target, n)
    model_copy = copy.deepcopy(model)
    layers = parameterised_layers(model_copy)
    if not layers:
        raise ValueError("`model` has no parameters to randomise")
    if order == "top_down":
        layers.reverse()
    compare = SIMILARITIES[similarity]
    with explained_dtype_errors(items, model_copy):
        original = _flatten_attributions(explain(model_copy, inputs, target), n)
    broken_original = non_finite_rows(original)
    broken = torch.zeros_like(broken_original)
    result = {}
    for name, layer in layers:
        randomize_layer_(layer, generator)
        randomized = _flatten_attributions(explain(model_copy, inputs, target), n)
        if randomized.shape != original.shape:
            raise ValueError(
                "`explain` returned attributions of a different shape after "
                f"randomising {name!r}"
            )
        # a similarity of NaN explanations is meaningless (their ranks tie: 1.0)
        layer_broken = broken_original | non_finite_rows(randomized)
        broken |= layer_broken
        result[name] = compare(original, randomized).masked_fill(
            layer_broken.to(original.device), torch.nan
        )
    warn_non_finite("parameter_randomization", broken, "`explain`")
    return result
