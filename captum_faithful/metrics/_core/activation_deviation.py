"""Activation deviation: internal faithfulness of a perturbation (FEI paper)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_faithful._compat import (
    _format_additional_forward_args,
    _format_tensor_into_tuples,
    _run_forward,
)
from captum_faithful._layers import LayerSpec, record_activations, select_layers
from captum_faithful._utils import check_finite, preserve_model_state


def activation_deviation(
    model: nn.Module,
    layers: LayerSpec,
    inputs: Tensor | tuple[Tensor, ...],
    perturbed_inputs: Tensor | tuple[Tensor, ...],
    additional_forward_args: Any = None,
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
    against a non-zero one has cosine 0. Runs under ``torch.no_grad()``; the model's
    modes, flags and hooks are left as they were.

    Args:

        model (nn.Module): the model; ``model(*inputs, *additional_forward_args)``
                    is run on both inputs.
        layers (str or list): ``"conv"`` (every ``nn.Conv2d``), ``"early"`` /
                    ``"late"`` (first / second half of them), or a list of modules or
                    submodule names.
        inputs (Tensor or tuple[Tensor, ...]): clean inputs, batch size N.
        perturbed_inputs (Tensor or tuple[Tensor, ...]): perturbed inputs, same
                    shapes as ``inputs``.
        additional_forward_args (Any, optional): passed after the inputs, unchanged,
                    to both forwards.
                    Default: None

    Returns:
        dict: ``{"mse": Tensor (N,), "cosine": Tensor (N,)}``.

    Examples::

        >>> dev = activation_deviation(model, "conv", images, images + noise)
        >>> dev["mse"], dev["cosine"]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    modules = select_layers(model, layers)
    clean = _format_tensor_into_tuples(inputs)
    perturbed = _format_tensor_into_tuples(perturbed_inputs)
    for name, tensors in (("inputs", clean), ("perturbed_inputs", perturbed)):
        if not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError(f"`{name}` must be a tensor or a tuple of tensors")
        check_finite(name, tensors)
    if len(clean) != len(perturbed) or any(
        a.shape != b.shape for a, b in zip(clean, perturbed, strict=False)
    ):
        raise ValueError(
            "`perturbed_inputs` must have the shapes of `inputs`, got "
            f"{[tuple(t.shape) for t in perturbed]} for "
            f"{[tuple(t.shape) for t in clean]}"
        )
    afa = _format_additional_forward_args(additional_forward_args)
    with preserve_model_state(model), torch.no_grad():
        with record_activations(modules) as clean_acts:
            _run_forward(model, clean, None, afa)
        with record_activations(modules) as perturbed_acts:
            _run_forward(model, perturbed, None, afa)
    return deviation_from_records(clean_acts, perturbed_acts)


def deviation_from_records(
    clean: list[list[Tensor]], perturbed: list[list[Tensor]], repeats: int = 1
) -> dict[str, Tensor]:
    """MSE and cosine per perturbed row, averaged over layers and calls.

    ``clean[l][c]`` holds N rows; ``perturbed[l][c]`` holds ``N * repeats`` rows,
    ``repeats`` consecutive rows per clean row.
    """
    mse, cosine, count = 0.0, 0.0, 0
    for clean_calls, perturbed_calls in zip(clean, perturbed, strict=True):
        if len(clean_calls) != len(perturbed_calls):
            raise ValueError(
                "a layer ran a different number of times on the clean and the "
                "perturbed inputs"
            )
        for h, h_tilde in zip(clean_calls, perturbed_calls, strict=True):
            h = h.flatten(1).repeat_interleave(repeats, dim=0).double()
            h_tilde = h_tilde.flatten(1).double()
            mse = mse + ((h_tilde - h) ** 2).mean(dim=1)
            cosine = cosine + _cosine(h, h_tilde)
            count += 1
    return {"mse": (mse / count).float(), "cosine": (cosine / count).float()}


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    both_zero = (norm_a == 0) & (norm_b == 0)
    value = F.cosine_similarity(a, b, dim=1, eps=1e-12)
    return torch.where(both_zero, torch.ones_like(value), value)
