"""Faithfulness-guided Ensemble Interpretation (FEI).

Ensemble quantile optimisation of nested retention maps, one per coverage level,
against a random monochromatic reference, with ClipGrad on the insertion game
(*Beyond Output Faithfulness*, FEI; the formulation is in the class docstring). This
file is the method: its arguments, the games and the optimisation loop. How
parameters become nested maps of exact coverage (per pixel, per feature group, or
smooth), the coverage levels, the area term and the state of one input's maps live
in :mod:`captum_faithful.attr._utils.retention_maps`; the random monochromatic
reference with the other baselines in :mod:`captum_faithful._baselines`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, Literal, cast, overload

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import (
    check_integer_mask,
    check_model_output,
    explained_dtype_errors,
    format_additional_forward_args,
    format_baselines,
    format_inputs,
    format_target,
    resolve_target,
    select_rows,
)
from captum_faithful._baselines import monochrome_reference
from captum_faithful._compat import (
    TargetType,
    TensorOrTupleOfTensorsGeneric,
    _format_output,
    compute_gradients,
)
from captum_faithful._layers import LayerSpec, model_places
from captum_faithful._typing import BaselineInput
from captum_faithful._utils import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    forward_runner,
    preserve_model_state,
    progress,
    resolve_model,
    run_forward,
)
from captum_faithful.attr._core.clip_grad import CLIP_RULES, ClipGrad
from captum_faithful.attr._utils.retention_maps import (
    AreaLoss,
    GroupMaps,
    InputMaps,
    MapParameterisation,
    PixelMaps,
    SmoothMaps,
    level_masses,
    quantile_levels,
)

OBJECTIVES = ("insertion", "deletion", "both")
MAP_KINDS = ("smooth", "pixel")


#: Area weight when ``area_weight=None`` (chosen from measurements, see the
#: documentation's page on choosing hyperparameters).
DEFAULT_AREA_WEIGHT = 1.0
#: Stride of the smooth maps when ``map_stride=None``.
DEFAULT_MAP_STRIDE = 4


class FaithfulnessEnsemble(GradientAttribution):
    r"""Faithfulness-guided Ensemble Interpretation (FEI).

    FEI learns the attribution by optimising the insertion (and/or deletion) game
    directly: for every coverage level :math:`q_k` it learns a soft retention map
    :math:`\alpha_k \in [0, 1]^{H \times W}` (shared across channels) such that the
    image keeping the :math:`\alpha_k` part of ``x`` and filling the rest from a
    reference ``R`` keeps the target class as probable as possible. The maps are
    nested (:math:`\alpha_1 \le \dots \le \alpha_K`) and cover exactly
    :math:`q_k` of the pixels (:math:`\mathrm{mean}\,\alpha_k = q_k`) by construction,
    at every iteration; a sorted-area term pushes them towards binary masks. All
    maps of all samples are optimised jointly in one batch with Adam, and the
    attribution is their mean, which ranks pixels by the smallest coverage at which
    they are kept.

    Internal faithfulness: during the insertion game, ClipGrad zeroes the gradient
    entries at the selected layers' outputs that would push the perturbed activations
    :math:`\tilde h` away from the clean ones :math:`h` (rule ``clip``, see
    :func:`~captum_faithful.attr._core.clip_grad.clip_mask`); ``clip="none"`` is the
    paper's unconstrained FEI_NONE. The deletion game (maps :math:`\beta_k` marking the
    pixels removed) is never clipped: removing evidence is meant to change the
    activations. On Vision Transformers, ``layers="attention"`` clips at the attention
    probabilities of every block (the paper's open question: attention alignment as
    the transformer's pathway) and ``layers="blocks"`` at the residual stream.

    .. math::
        L_{ins} = \sum_k -\varphi\big(\alpha_k \odot x + (1 - \alpha_k) \odot R\big)
                  + \lambda L_{area}(\alpha_k, q_k), \qquad
        L_{del} = \sum_k \varphi\big((1 - \beta_k) \odot x + \beta_k \odot R\big)
                  + \lambda L_{area}(\beta_k, q_k)

    with :math:`\varphi` the softmax probability of the target class (the forward
    output is treated as logits) and
    :math:`L_{area}(\alpha, q) = \mathrm{mean}((\mathrm{sort}(\mathrm{vec}\,\alpha) -
    r_q)^2)`, :math:`r_q` the sorted 0/1 vector with ``round(q H W)`` ones.

    **How the maps are made.** A map lives on C cells, each covering the share
    :math:`\omega_c` of the pixels: one cell per pixel (``maps="pixel"``), per group
    of a Captum ``feature_mask`` (one map value per group, broadcast over the
    channels), or per node of a coarse grid with stride ``map_stride`` upsampled
    bilinearly to the image (``maps="smooth"``, the default). Each cell holds a
    distribution over the level at which it enters,
    :math:`p_c = \mathrm{softmax}(u_c + g)` over :math:`e = 1..K+1` (the last is
    "never"), and

    .. math::
        \alpha_k(c) = \sum_{e \le k} p_{c,e}, \qquad
        \sum_c \omega_c\, p_{c,e} = q_e - q_{e-1}, \qquad
        M = \frac{1}{K} \sum_k \alpha_k .

    The potentials :math:`g` are solved at every iteration (Newton's method, warm
    started), so each :math:`\alpha_k` has mean :math:`q_k` exactly; the gradient
    flows through the solution (:mod:`~captum_faithful.attr._utils.retention_maps`).
    Bilinear upsampling has non-negative weights that sum to one at each pixel, so
    smooth maps stay nested, in [0, 1], and exactly covered in pixels.

    The smooth maps follow Extremal Perturbations (TorchRay's ``MaskGenerator``),
    which also optimises parameters on a grid of step s, but spreads them with a
    smooth maximum of Gaussian-like bumps and holds the area with a penalty only;
    here the spread is linear, so nesting and exact coverage survive it.

    **Defaults.** Smooth maps of stride 4, area weight 1 and K = 5 were chosen
    from measurements on the demo CNN and ViT (evidence precision, insertion and
    deletion AUCs and activation deviation for per-pixel, grouped and smooth maps of
    several strides, each with and without ClipGrad; the area weight's and the
    number of iterations' effect); the measurements and the reasons for each default
    are on the documentation's page on choosing hyperparameters (section FEI).

    **Which rule for which architecture** (``benchmarks/fei_ablations.py``: the demo
    CNN, sequential, and a residual CNN of the same cost trained the same way; 32
    test and 8 blank images, 50 iterations; tables in the docs' hyperparameters
    page). On both, ``clip="vm"`` on all convolutions (the default) is the safe
    choice: it brings blank-image insertion down to a random map's level (against
    ``"none"``: 0.206 vs 0.438 on the CNN, 0.215 vs 0.502 on the residual CNN, random
    0.221 / 0.171), raises evidence precision (0.842 vs 0.753; 0.774 vs 0.703) and
    costs at most 0.03 of insertion; ``"ivm"`` is about as good. On the residual CNN
    ``"avm"`` localises best (0.820) but leaves more blank-image evidence (0.252),
    and ``"ibm"`` localises no better than ``"none"`` (0.672); on the CNN ``"ibm"``
    localises no better than ``"none"`` either (0.749). Of the FEI paper's
    architecture findings neither held here: late-only clipping
    (``layers="late"``) did not collapse insertion (all / early / late within 0.02
    for every rule, on both models), and ``"avm"`` did not fail on the sequential
    CNN nor do better on the residual one. Late-only clipping did let the most
    evidence appear on blank images with ``"avm"`` and ``"ibm"``: clip all layers or
    the early ones.

    Inputs are images ``(N, C, H, W)`` (or a tuple of them; each tensor gets its own
    maps); the maps and attributions have the input's dtype (the parameters are
    float32, float64 for float64 inputs). The parameters start at zero, where every
    :math:`\alpha_k` is uniform at :math:`q_k`; the optimisation is deterministic
    given the reference, which is drawn from ``generator``.

    Examples::

        >>> from captum_faithful import FaithfulnessEnsemble
        >>> fei = FaithfulnessEnsemble(model, clip="vm", layers="conv")
        >>> attributions, maps = fei.attribute(
        >>>     images, target=labels, generator=torch.Generator().manual_seed(0),
        >>>     return_quantile_maps=True)      # maps: (N, 5, H, W), nested
    """

    def __init__(
        self,
        forward_func: Callable,
        model: nn.Module | None = None,
        layers: LayerSpec = "conv",
        clip: str = "vm",
        quantiles: int | Sequence[float] = 5,
        objective: str = "insertion",
        n_iter: int = 100,
        lr: float = 0.1,
        area_weight: float | None = None,
        maps: str = "smooth",
        map_stride: int = DEFAULT_MAP_STRIDE,
    ) -> None:
        r"""
        Args:

            forward_func (Callable): the model's forward function, returning logits
                        (or a Hugging Face ``ModelOutput`` with ``logits``).
            model (nn.Module, optional): the module that holds the layers ClipGrad
                        hooks. Default: ``forward_func`` when it is a Module.
                        Default: None
            layers (str or list, optional): layers whose outputs ClipGrad constrains:
                        ``"conv"`` (every ``nn.Conv2d``), ``"early"`` / ``"late"``
                        (first / second half of them in definition order; with an odd
                        count both share the middle one), for Vision Transformers
                        ``"attention"`` (the attention probabilities of every block,
                        found by :func:`captum_faithful.vit.get_adapter`; eager
                        attention is switched on for the call and restored afterwards)
                        or ``"blocks"`` (every block's output), or a list of modules or
                        submodule names.
                        Default: ``"conv"``
            clip (str, optional): ClipGrad rule, one of ``"vm"``, ``"ivm"``, ``"avm"``,
                        ``"ibm"``, ``"none"``. ``"ibm"`` acts only where the clean
                        activation is :math:`\le 0`; attention probabilities never are,
                        so with ``layers="attention"`` it gives the maps of ``"none"``.
                        Default: ``"vm"``
            quantiles (int or Sequence[float], optional): K levels at ``k / (K + 1)``,
                        or an explicit strictly increasing sequence in (0, 1).
                        Default: 5
            objective (str, optional): ``"insertion"``, ``"deletion"`` or ``"both"``
                        (both games in the same batch, each with its own maps; the
                        attribution averages all 2K maps).
                        Default: ``"insertion"``
            n_iter (int, optional): Adam iterations.
                        Default: 100
            lr (float, optional): Adam learning rate on the parameters u.
                        Default: 0.1
            area_weight (float, optional): :math:`\lambda`, a finite number >= 0.
                        ``None`` uses :data:`DEFAULT_AREA_WEIGHT` (1, chosen from
                        the measurements on the hyperparameters page).
                        Default: None
            maps (str, optional): ``"smooth"`` (cells on a grid of stride
                        ``map_stride``, upsampled bilinearly) or ``"pixel"`` (one value
                        per pixel). A ``feature_mask`` passed to :meth:`attribute`
                        replaces either by one value per group.
                        Default: ``"smooth"``
            map_stride (int, optional): grid step of the smooth maps, in pixels.
                        Default: 4
        """
        if not callable(forward_func):
            raise TypeError("`forward_func` must be callable")
        GradientAttribution.__init__(self, forward_func)
        self.clip = check_choice("clip", clip, CLIP_RULES)
        self.objective = check_choice("objective", objective, OBJECTIVES)
        self.levels = quantile_levels(quantiles)
        self.n_iter = check_int("n_iter", n_iter, minimum=1)
        self.lr = check_float("lr", lr, low=0.0, low_inclusive=False, finite=True)
        if area_weight is None:
            area_weight = DEFAULT_AREA_WEIGHT
        self.area_weight = check_float("area_weight", area_weight, low=0.0, finite=True)
        self.maps = check_choice("maps", maps, MAP_KINDS)
        self.map_stride = check_int("map_stride", map_stride, minimum=1)
        self.model: nn.Module | None = None
        if (
            model is not None
            or isinstance(forward_func, nn.Module)
            or isinstance(getattr(forward_func, "__self__", None), nn.Module)
        ):
            self.model = resolve_model(forward_func, model)
        self.layers = layers
        self._clipped = clip != "none" and objective != "deletion"
        if self._clipped:
            self.model = resolve_model(forward_func, model)
            with model_places(self.model, layers):
                pass  # checks `layers` now, before any call

    # The attributions alone, or with the quantile maps when return_quantile_maps
    # is True (as Captum's return_convergence_delta). The overloads are undecorated:
    # log_usage is untyped and would hide them from type checkers.
    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        feature_mask: Tensor | tuple[Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
        *,
        return_quantile_maps: Literal[True],
        show_progress: bool = False,
    ) -> tuple[TensorOrTupleOfTensorsGeneric, TensorOrTupleOfTensorsGeneric]: ...

    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        feature_mask: Tensor | tuple[Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
        return_quantile_maps: Literal[False] = False,
        show_progress: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric: ...

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        feature_mask: Tensor | tuple[Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
        return_quantile_maps: bool = False,
        show_progress: bool = False,
    ) -> (
        TensorOrTupleOfTensorsGeneric
        | tuple[TensorOrTupleOfTensorsGeneric, TensorOrTupleOfTensorsGeneric]
    ):
        r"""Optimise the quantile maps and return their mean.

        Args:

            inputs (Tensor or tuple[Tensor, ...]): images ``(N, C, H, W)``, N >= 1,
                        at least two pixels (H W >= 2), floating point (float16,
                        bfloat16, float32 or float64).
            baselines (scalar, Tensor, str, Callable or tuple, optional): the
                        reference ``R``: a number, a tensor broadcastable to the
                        input, a preset of the metrics (``"zero"``, ``"mean"``,
                        ``"blur"``), a callable ``input -> tensor``, or a tuple of
                        these per input. ``None`` draws a random monochromatic image
                        per sample
                        (:func:`~captum_faithful._baselines.monochrome_reference`):
                        one colour per
                        channel, uniform between that channel's min and max in the
                        sample. A sample's colour depends on ``generator`` and on the
                        sample only, so an image gets the same reference alone and
                        inside any batch.
                        Default: None
            target (int, tuple, list, Tensor, optional): class per sample, with
                        Captum's meaning. ``None`` explains the class predicted on the
                        unperturbed input (argmax).
                        Default: None
            additional_forward_args (Any, optional): passed to ``forward_func`` after
                        the inputs; tensors with a batch dimension are expanded to
                        the perturbed batch.
                        Default: None
            feature_mask (Tensor or tuple[Tensor, ...], optional): Captum's feature
                        mask: integer group ids per pixel, shape broadcastable to
                        the input with one channel (e.g. ``(1, 1, H, W)``, or
                        ``(N, 1, H, W)`` per sample); the map has one value per group
                        and coverage is counted in pixels. At least two groups per
                        sample. With a tuple of inputs, one mask per input (ids are
                        local to each input).
                        Default: None (the ``maps`` of the constructor)
            generator (torch.Generator, optional): source of the random reference.
                        Default: None (global RNG)
            return_quantile_maps (bool, optional): also return the maps stacked as
                        ``(N, K, H, W)`` (``(N, 2K, H, W)`` for ``"both"``: insertion
                        maps first, then deletion maps).
                        Default: False
            show_progress (bool, optional): tqdm bar over the iterations.
                        Default: False

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**:
                :math:`M` broadcast to each input's shape (mirrors ``inputs``), in
                the input's dtype; with ``return_quantile_maps`` a pair
                ``(attributions, maps)``.

        Examples::

            >>> fei = FaithfulnessEnsemble(model)          # clip="vm", K=5
            >>> attr = fei.attribute(images, target=labels,
            >>>                      generator=torch.Generator().manual_seed(0))
        """
        xs, is_tuple = format_inputs(inputs, floating=True)
        xs = self._check_images(xs)
        n = xs[0].shape[0]
        format_target(target, n)
        check_bool("return_quantile_maps", return_quantile_maps)
        check_bool("show_progress", show_progress)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}"
            )
        cells = self._parameterisations(xs, feature_mask)
        references = self._references(xs, baselines, generator)
        extra_args = format_additional_forward_args(additional_forward_args, n)
        device = xs[0].device
        games = {"insertion": (1,), "deletion": (-1,), "both": (1, -1)}[self.objective]
        n_games, n_levels = len(games), len(self.levels)
        masses = level_masses(self.levels).to(device)
        parameter_dtype = (
            torch.float64 if xs[0].dtype == torch.float64 else torch.float32
        )
        rows = torch.arange(n, device=device).repeat_interleave(n_levels)
        batch_rows = rows.repeat(n_games)
        maps = [
            InputMaps(
                parameterisation,
                torch.zeros(
                    (n_games, n, parameterisation.n_cells, n_levels + 1),
                    dtype=parameter_dtype,
                    device=device,
                    requires_grad=True,
                ),
                parameterisation.weights.repeat(n_games, 1)
                if parameterisation.weights.shape[0] == n
                else parameterisation.weights,
                AreaLoss(self.levels, x.shape[2] * x.shape[3], device),
            )
            for parameterisation, x in zip(cells, xs, strict=True)
        ]
        params = tuple(m.logits for m in maps)
        optimiser = torch.optim.Adam(params, lr=self.lr, fused=True)
        # what the games compose the images from: R + keep * (x - R)
        differences = tuple(
            (x - r).unsqueeze(1) for x, r in zip(xs, references, strict=True)
        )
        batch_args = select_rows(extra_args, batch_rows)
        with ExitStack() as stack:
            if self.model is not None:
                stack.enter_context(preserve_model_state(self.model))
            clip = None
            if self._clipped:
                # the constructor resolves the model whenever the maps are clipped
                model = cast(nn.Module, self.model)
                places = stack.enter_context(model_places(model, self.layers))
                clip = stack.enter_context(ClipGrad(places, self.clip))
            with explained_dtype_errors(xs, self.model):
                if clip is not None:
                    # the insertion game's rows are sample-major: K per sample
                    clean = clip.capture(
                        lambda: run_forward(self.forward_func, xs, extra_args),
                        repeats=n_levels,
                    )
                else:
                    with torch.no_grad():
                        clean = run_forward(self.forward_func, xs, extra_args)
            classes = resolve_target(
                check_model_output(clean, type(self).__name__), target
            )
            batch_classes = classes[batch_rows]

            forward = forward_runner(self.forward_func)

            def loss(*logits: Tensor) -> Tensor:
                return _game_loss(
                    *logits,
                    maps=maps,
                    masses=masses,
                    forward_func=forward,
                    xs=xs,
                    references=references,
                    differences=differences,
                    games=games,
                    classes=batch_classes,
                    weight=self.area_weight,
                    additional_forward_args=batch_args,
                )

            for _ in progress(
                range(self.n_iter), show_progress, desc="FEI", total=self.n_iter
            ):
                if self.gradient_func is compute_gradients:
                    # Captum's default, without re-reading `loss`'s signature
                    with torch.enable_grad():
                        grads = torch.autograd.grad(loss(*params).view(()), params)
                else:
                    grads = self.gradient_func(loss, params)
                for param, grad in zip(params, grads, strict=True):
                    param.grad = grad
                optimiser.step()

        with torch.no_grad():
            all_maps = tuple(
                m.pixel_maps(masses, differentiable=False)
                .transpose(0, 1)
                .flatten(1, 2)
                .to(x.dtype)
                for m, x in zip(maps, xs, strict=True)
            )
        attributions = tuple(
            m.mean(dim=1, keepdim=True, dtype=torch.float64)
            .to(x.dtype)
            .expand_as(x)
            .contiguous()
            for m, x in zip(all_maps, xs, strict=True)
        )
        # _format_output mirrors `inputs` (a tuple exactly when `inputs` is one)
        result = cast(
            TensorOrTupleOfTensorsGeneric, _format_output(is_tuple, attributions)
        )
        if return_quantile_maps:
            maps_out = cast(
                TensorOrTupleOfTensorsGeneric, _format_output(is_tuple, all_maps)
            )
            return result, maps_out
        return result

    def _check_images(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        for x in xs:
            if x.dim() != 4:
                raise ValueError(
                    "`inputs` must be images of shape (N, C, H, W), got shape "
                    f"{tuple(x.shape)}"
                )
            if x.shape[2] * x.shape[3] < 2:
                raise ValueError(
                    "`inputs` must be images of at least two pixels: FEI ranks the "
                    "pixels of an image against each other, and a "
                    f"{x.shape[2]}x{x.shape[3]} image has nothing to rank; got shape "
                    f"{tuple(x.shape)}"
                )
        return tuple(x.detach() for x in xs)

    def _parameterisations(
        self, xs: tuple[Tensor, ...], feature_mask: Any
    ) -> list[MapParameterisation]:
        if feature_mask is None:
            masks: tuple[Any, ...] = (None,) * len(xs)
        elif isinstance(feature_mask, Tensor):
            if len(xs) != 1:
                raise ValueError(
                    "`feature_mask` must be a tuple with one mask per input tensor "
                    f"({len(xs)}) when `inputs` is a tuple of several tensors"
                )
            masks = (feature_mask,)
        elif isinstance(feature_mask, (tuple, list)):
            if len(feature_mask) != len(xs):
                raise ValueError(
                    "`feature_mask` must hold one mask per input tensor "
                    f"({len(xs)}), got {len(feature_mask)}"
                )
            masks = tuple(feature_mask)
        else:
            raise TypeError(
                "`feature_mask` must be an integer tensor or a tuple of them, got "
                f"{type(feature_mask).__name__}"
            )
        result: list[MapParameterisation] = []
        for x, mask in zip(xs, masks, strict=True):
            height, width = x.shape[2:]
            if mask is not None:
                result.append(_group_maps(mask, x))
            elif self.maps == "pixel":
                result.append(PixelMaps(height, width, x.device))
            else:
                result.append(SmoothMaps(height, width, self.map_stride, x.device))
        return result

    def _references(
        self,
        xs: tuple[Tensor, ...],
        baselines: BaselineInput,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, ...]:
        if baselines is None:
            return tuple(monochrome_reference(x, generator) for x in xs)
        return format_baselines(baselines, xs)


def _group_maps(mask: Any, x: Tensor) -> GroupMaps:
    """Validate a Captum feature mask for FEI's maps and relabel it 0..G-1."""
    check_integer_mask(mask, ids="group ids")
    n, _, height, width = x.shape
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if (
        mask.dim() > 4
        or shape[0] not in (1, n)
        or shape[1] != 1
        or shape[2:] != (height, width)
    ):
        raise ValueError(
            "`feature_mask` must have one group id per pixel, shape (H, W), "
            "(1, 1, H, W) or (N, 1, H, W) with (N, H, W) = "
            f"({n}, {height}, {width}) (FEI's maps are shared across channels), "
            f"got shape {tuple(mask.shape)}"
        )
    mask = mask.reshape(shape[0], height, width).to(x.device)
    _, ids = torch.unique(mask, return_inverse=True)
    n_groups = int(ids.max()) + 1
    per_sample = torch.zeros(ids.shape[0], n_groups, dtype=torch.bool, device=x.device)
    per_sample.scatter_(1, ids.flatten(1), True)
    if bool((per_sample.sum(1) < 2).any()):
        raise ValueError(
            "`feature_mask` must split every sample into at least two groups; a "
            "single group leaves nothing to rank"
        )
    return GroupMaps(ids, n_groups)


def _game_loss(
    *logits: Tensor,
    maps: Sequence[InputMaps],
    masses: Tensor,
    forward_func: Callable[..., Tensor],
    xs: tuple[Tensor, ...],
    references: tuple[Tensor, ...],
    differences: tuple[Tensor, ...],
    games: tuple[int, ...],
    classes: Tensor,
    weight: float,
    additional_forward_args: object,
) -> Tensor:
    """Total loss of the games, shape (1,); ``logits`` are the parameters u per input
    (the tensors held by ``maps``, passed again so that gradients flow to them).

    ``games`` holds +1 for the insertion game (keep ``maps`` of x) and -1 for the
    deletion game (remove ``maps`` of x); rows are laid out game, sample, level.
    ``differences`` are ``x - R`` per input, shaped (N, 1, C, H, W).
    """
    n_games = logits[0].shape[0]
    images: list[Tensor] = []
    area: Tensor | float = 0.0
    for x, ref, difference, input_maps, u in zip(
        xs, references, differences, maps, logits, strict=True
    ):
        retention = input_maps.pixel_maps(masses, u)
        if games == (1,):
            keep = retention
        elif games == (-1,):
            keep = 1 - retention
        else:
            keep = torch.cat([retention[:1], 1 - retention[1:]])
        keep = keep.to(x.dtype).unsqueeze(3)
        image = torch.addcmul(ref.unsqueeze(1), keep, difference)
        images.append(image.flatten(0, 2))
        area = area + input_maps.area(retention)
    out = forward_func(tuple(images), additional_forward_args)
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    prob = out.softmax(dim=1).gather(1, classes.view(-1, 1))
    prob = prob.view(n_games, -1).to(torch.float64)
    # one number: the gradient function then differentiates a single output,
    # whatever N (the samples' losses are independent, so their sum has the same
    # gradient per sample)
    played = sum(game * p.sum() for game, p in zip(games, prob, strict=True))
    # `xs` is never empty, so `area` is a tensor
    return (weight * cast(Tensor, area).sum() - played).view(1)
