"""The blank-image diagnostic of the FEI paper: evidence found where there is none.

It runs a method (:class:`~captum_faithful.attr.FaithfulnessEnsemble`) and scores it
with two metrics (:func:`~captum_faithful.metrics.insertion_auc`,
:func:`~captum_faithful.metrics.insertion_activation_deviation`), so it is a study
above both rather than part of either: attribution methods do not import metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import resolve_target
from captum_faithful._baselines import monochrome_reference
from captum_faithful._compat import TargetType
from captum_faithful._layers import LayerSpec, model_places
from captum_faithful._utils import (
    check_choice,
    check_finite,
    check_float,
    check_int,
    progress,
    resolve_model,
    run_forward,
)
from captum_faithful.attr._core.clip_grad import CLIP_RULES
from captum_faithful.attr._core.faithfulness_ensemble import (
    DEFAULT_MAP_STRIDE,
    FaithfulnessEnsemble,
)
from captum_faithful.metrics import insertion_activation_deviation, insertion_auc


@log_usage()
def blank_image_diagnostic(
    forward_func: Callable,
    blank_inputs: Tensor,
    clips: Sequence[str] = CLIP_RULES,
    target: TargetType = None,
    model: nn.Module | None = None,
    layers: LayerSpec = "conv",
    deviation_layers: LayerSpec = "conv",
    baselines: Tensor | float | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    quantiles: int | Sequence[float] = 5,
    n_iter: int = 100,
    lr: float = 0.1,
    area_weight: float | None = None,
    maps: str = "smooth",
    map_stride: int = DEFAULT_MAP_STRIDE,
    n_steps: int = 100,
    additional_forward_args: object = None,
    generator: torch.Generator | None = None,
    show_progress: bool = False,
) -> dict[str, dict[str, Tensor]]:
    r"""Run FEI on constant images, one ClipGrad rule after another.

    A constant image holds no evidence, yet an unconstrained optimiser can compose
    one from the image and the reference that the model likes (the FEI paper's
    spurious attributions on blank images). For every rule in ``clips`` this runs
    :class:`FaithfulnessEnsemble` (insertion game) on ``blank_inputs`` and scores the
    map on its hard insertion curve (top-q pixels of M from the blank image, the rest
    from the reference R; the same R as the optimisation; q = k / n_steps):

    - ``"probability"``: the mean target probability over the n_steps + 1 curve
      points, :math:`\frac{1}{n+1}\sum_k \varphi(\tilde x^{(k)})`;
    - ``"insertion_auc"``: the trapezoid AUC of the same curve
      (:func:`~captum_faithful.metrics.insertion_auc`);
    - ``"mse"``, ``"cosine"``: the activation deviation of the curve images from the
      blank image on ``deviation_layers``
      (:func:`~captum_faithful.metrics.insertion_activation_deviation`).

    A rule that preserves the model's pathway should find much less "evidence"
    (lower probability) and move the activations less than ``"none"``.

    Args:

        forward_func (Callable): the model's forward function (logits).
        blank_inputs (Tensor): constant images ``(N, C, H, W)``, N >= 1, H W >= 2:
                    each channel of each sample holds one value.
        clips (Sequence[str], optional): the rules to compare.
                    Default: ``("vm", "ivm", "avm", "ibm", "none")``
        target (int, list, Tensor, optional): class per sample; ``None`` takes the
                    class predicted on the blank image.
                    Default: None
        model (nn.Module, optional): module holding the layers. Default:
                    ``forward_func`` when it is a Module.
                    Default: None
        layers (str or list, optional): ClipGrad layers, as in
                    :class:`FaithfulnessEnsemble` (``"attention"`` or ``"blocks"`` on
                    a Vision Transformer).
                    Default: ``"conv"``
        deviation_layers (str or list, optional): layers on which the activation
                    deviation is measured (all convolutions by default, so that
                    early / late clipping are compared on the same layers; on a
                    Vision Transformer ``"attention"`` or ``"blocks"``).
                    Default: ``"conv"``
        baselines (Tensor or float, optional): the reference R, broadcastable to
                    ``blank_inputs``. ``None`` draws one random colour per sample and
                    channel, uniform in ``value_range`` (the per-sample range used by
                    FEI's default is empty for a constant image), with
                    :func:`~captum_faithful._baselines.monochrome_reference`:
                    a sample's colour depends on ``generator`` and on the sample
                    only.
                    Default: None
        value_range (tuple[float, float], optional): range of the random
                    reference colours.
                    Default: (0.0, 1.0)
        quantiles, n_iter, lr, area_weight, maps, map_stride: passed to
                    :class:`FaithfulnessEnsemble`.
        n_steps (int, optional): hard insertion curve segments.
                    Default: 100
        additional_forward_args (Any, optional): passed after the inputs.
                    Default: None
        generator (torch.Generator, optional): source of the random reference.
                    Default: None
        show_progress (bool, optional): tqdm bar over the rules.
                    Default: False

    Returns:
        dict: ``{clip: {"probability", "insertion_auc", "mse", "cosine"}}``, each a
        Tensor of shape (N,).

    Examples::

        >>> blank = torch.zeros(8, 3, 32, 32)            # all-black images
        >>> report = blank_image_diagnostic(model, blank,
        >>>                                 generator=torch.Generator().manual_seed(0))
        >>> {clip: r["probability"].mean().item() for clip, r in report.items()}
    """
    if not isinstance(blank_inputs, Tensor) or blank_inputs.dim() != 4:
        raise ValueError("`blank_inputs` must be a tensor of shape (N, C, H, W)")
    n, channels, height, width = blank_inputs.shape
    if n == 0 or channels == 0 or height * width < 2:
        raise ValueError(
            "`blank_inputs` must hold at least one image of at least two pixels (FEI "
            f"ranks pixels), got shape {tuple(blank_inputs.shape)}"
        )
    check_finite("blank_inputs", blank_inputs)
    if not bool((blank_inputs == blank_inputs[:, :, :1, :1]).all()):
        raise ValueError(
            "`blank_inputs` must be constant images: every channel of every sample "
            "holds a single value"
        )
    if isinstance(clips, str) or not clips:
        raise ValueError(f"`clips` must be a non-empty list of {CLIP_RULES}")
    clips = [check_choice("clips", clip, CLIP_RULES) for clip in clips]
    if len(set(clips)) != len(clips):
        raise ValueError(f"`clips` must not repeat a rule, got {clips}")
    n_steps = check_int("n_steps", n_steps, 1)
    if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
        raise ValueError("`value_range` must be a pair (low, high)")
    low = check_float("value_range", value_range[0])
    high = check_float("value_range", value_range[1])
    if not low < high:
        raise ValueError(f"`value_range` must have low < high, got {value_range}")
    model = resolve_model(forward_func, model)
    with model_places(model, deviation_layers):
        pass  # checks `deviation_layers` before any heavy work
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator, got {type(generator).__name__}"
        )
    explainers = {
        clip: FaithfulnessEnsemble(
            forward_func,
            model=model,
            layers=layers,
            clip=clip,
            quantiles=quantiles,
            n_iter=n_iter,
            lr=lr,
            area_weight=area_weight,
            maps=maps,
            map_stride=map_stride,
        )
        for clip in clips
    }
    x = blank_inputs.detach()
    if baselines is None:
        reference = monochrome_reference(x, generator, value_range=(low, high))
    else:
        reference = torch.as_tensor(baselines, dtype=x.dtype, device=x.device)
        try:
            fits = torch.broadcast_shapes(reference.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"`baselines` of shape {tuple(reference.shape)} does not broadcast to "
                f"`blank_inputs` of shape {tuple(x.shape)}"
            )
        check_finite("baselines", reference)
    with torch.no_grad():
        classes = resolve_target(
            run_forward(forward_func, (x,), additional_forward_args), target
        )
    report = {}
    for clip in progress(clips, show_progress, desc="blank-image diagnostic"):
        attributions = explainers[clip].attribute(
            x,
            baselines=reference,
            target=classes,
            additional_forward_args=additional_forward_args,
        )
        auc, curves = insertion_auc(
            forward_func,
            x,
            attributions,
            target=classes,
            additional_forward_args=additional_forward_args,
            baselines=reference,
            n_steps=n_steps,
            return_curves=True,
        )
        deviation = insertion_activation_deviation(
            model,
            deviation_layers,
            x,
            attributions,
            baselines=reference,
            additional_forward_args=additional_forward_args,
            n_steps=n_steps,
        )
        report[clip] = {
            "probability": curves.mean(dim=1),
            "insertion_auc": auc,
            "mse": deviation["mse"],
            "cosine": deviation["cosine"],
        }
    return report
