"""UNI: Integrated Gradients from a baseline learned by unlearning the prediction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._compat import (
    TargetType,
    TensorOrTupleOfTensorsGeneric,
    _format_additional_forward_args,
    _format_output,
    _is_tuple,
)
from captum_faithful._utils import resolve_model, resolve_targets
from captum_faithful.attr._utils.unlearning import (
    ParametrizedForward,
    UnlearningHyperparameters,
    UnlearningSettings,
    buffer_copies,
    check_call_arguments,
    check_sample_args,
    check_unlearnable,
    completeness_gap,
    format_baselines,
    format_inputs,
    protected_forward,
    resolve_class_targets,
)


class UnlearnedIntegratedGradients(UnlearningHyperparameters, GradientAttribution):
    r"""
    Unlearning-based Neural Interpretations (UNI) replace the static baseline of
    Integrated Gradients (black, blurred, noise) by a baseline learned for each
    input: the model's parameters take one normalised gradient-ascent step on the
    loss of the explained class (the prediction is "unlearned"), and the input is
    perturbed, within an L2 ball of radius ``epsilon``, until the original model
    outputs the distribution of the unlearned one. Integrated Gradients is then
    computed from this baseline to the input with the original model. The
    baseline lies close to the input (a low-curvature, monotone path) and carries
    no colour, texture or frequency bias of a hand-picked reference.

    For each sample :math:`x` with class :math:`c` (``target``, or the predicted
    class when ``target=None``):

    .. math::
        g = \nabla_\theta \mathrm{CE}(f(x;\theta), c), \qquad
        \hat\theta = \theta + \eta \frac{g}{\lVert g \rVert_2}, \qquad
        \hat p = \mathrm{softmax} f(x;\hat\theta)

    .. math::
        \delta^{t+1} = \varepsilon \frac{\delta^t - \mu \nabla_\delta
        \mathrm{KL}(\hat p \,\Vert\, \mathrm{softmax} f(x+\delta^t;\theta))}
        {\lVert \delta^t - \mu \nabla_\delta \mathrm{KL}(\cdot) \rVert_2},
        \quad \delta^0 = 0, \qquad x' = x + \delta^T

    .. math::
        \mathrm{UNI}_i(x) = (x_i - x'_i) \sum_{k=1}^{B} w_k
        \frac{\partial f_c(x' + \alpha_k (x - x'))}{\partial x_i}

    with one L2 norm over all parameters with ``requires_grad`` (all floating-point
    parameters when the model is frozen), a per-sample L2 norm over all elements of
    all input tensors jointly (the rescale is skipped while :math:`\delta = 0`), and
    Captum's step sizes :math:`w_k` and points :math:`\alpha_k` for ``method``
    (right Riemann sum by default: :math:`\alpha_k = k/B`, :math:`w_k = 1/B`).
    Outputs are treated as logits. The unlearned parameters and copies of the
    buffers are substituted with :func:`torch.func.functional_call`, so the model is
    never written to (BatchNorm in training mode updates the copies); every module
    runs in the mode the user left it in. The per-sample unlearning is vectorised
    with :func:`torch.func.vmap` in chunks of ``unlearning_batch_size`` samples and
    falls back to a per-sample loop for models vmap cannot run; both compute the
    same function.

    More details in the paper *Unlearning-based Neural Interpretations*
    (Algorithm 1), and in the documentation's "How the methods work" page.
    """

    def __init__(
        self,
        forward_func: Callable,
        model: nn.Module | None = None,
        multiply_by_inputs: bool = True,
        unlearning_step: float = 1.0,
        pgd_steps: int = 10,
        epsilon: float = 0.25,
        pgd_step_size: float = 0.1,
        unlearning_batch_size: int | None = None,
    ) -> None:
        r"""
        Args:

            forward_func (Callable): The forward function of the model or any
                    modification of it. It must return class logits of shape
                    (N, n_classes), or a Hugging Face ``ModelOutput`` / dict with a
                    ``logits`` field.
            model (nn.Module, optional): The module whose parameters are unlearned
                    and whose buffers are protected. ``forward_func`` must use this
                    module. Default: ``forward_func`` when it is an ``nn.Module``
                    (or a bound method of one).
                    Default: None
            multiply_by_inputs (bool, optional): Whether to multiply the
                    integrated gradients by ``(inputs - baselines)`` (global
                    attribution) as Captum's IntegratedGradients does.
                    Default: True
            unlearning_step (float, optional): :math:`\eta`, the L2 length of the
                    gradient-ascent step on the parameters (> 0).
                    Default: 1.0
            pgd_steps (int, optional): :math:`T`, the number of baseline matching
                    steps (>= 0; 0 gives the baseline ``x`` itself).
                    Default: 10
            epsilon (float, optional): :math:`\varepsilon`, the L2 distance between
                    each baseline and its input (> 0): one radius over the whole
                    sample, all elements of all input tensors jointly (not per
                    pixel or per channel), in the units of the inputs. With
                    :math:`d` elements per sample the baseline differs from the
                    input by :math:`\varepsilon / \sqrt{d}` per element (root mean
                    square). The default is the paper's value for 3x224x224
                    ImageNet images (:math:`d` = 150,528): 6.4e-4 per element,
                    0.16/255 of the [0, 1] pixel range. On other inputs it is a
                    different perturbation; to keep the paper's, scale it by
                    :math:`\sqrt{d / 150528}` (3x32x32 in [0, 1]: 0.036) and by the
                    inputs' scale (normalised by a per-channel std :math:`\sigma`,
                    ImageNet's is about 0.226: divide by :math:`\sigma`, i.e. 1.1
                    at 3x224x224). The attributions sum to
                    :math:`f_c(x) - f_c(x')`, which shrinks with
                    :math:`\varepsilon`: on a ResNet-18 with random weights at
                    3x224x224 in [0, 1], 0.25 gives a sum of 0.02 and per-pixel
                    values near 1e-6, which Captum's ``visualize_image_attr`` warns
                    are "approximately 0" (the map is still scaled correctly).
                    Default: 0.25
            pgd_step_size (float, optional): :math:`\mu`, the step size of the
                    baseline matching (> 0), in the units of the inputs, taken
                    before each rescale to :math:`\varepsilon`: when
                    :math:`\mu \lVert \nabla_\delta \mathrm{KL} \rVert` is small
                    against :math:`\varepsilon`, the steps after the first hardly
                    turn :math:`\delta` (random-weight ResNet-18 at 3x224x224:
                    0.3% of :math:`\varepsilon` per step).
                    Default: 0.1
            unlearning_batch_size (int, optional): Samples unlearned together in
                    one vectorised chunk; memory grows as this times the number of
                    parameters (measured: about 3.5 float32 copies of the
                    parameters per sample, 360 MB per sample on ResNet-50). None
                    takes as many as fit ``2**26`` parameter values.
                    Default: None
        """
        self.model = resolve_model(forward_func, model)
        check_unlearnable(self.model)
        self._settings = UnlearningSettings(
            unlearning_step, pgd_steps, epsilon, pgd_step_size, unlearning_batch_size
        )
        GradientAttribution.__init__(self, forward_func)
        self._multiply_by_inputs = bool(multiply_by_inputs)
        self._wrapper = ParametrizedForward(forward_func, self.model)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Any = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric | tuple[TensorOrTupleOfTensorsGeneric, Tensor]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Input for which attributions
                    are computed, floating point, with the batch on dim 0. A tuple
                    of tensors is perturbed jointly (one L2 ball over all of them).
            baselines (scalar, Tensor, tuple of scalars or Tensors, optional):
                    None (default) learns the baselines with Algorithm 1. Anything
                    else is used as given, exactly as in Captum's
                    IntegratedGradients (a scalar, or a tensor of the input's
                    shape or with batch size 1, per input), without unlearning.
                    Default: None
            target (int, tuple, Tensor, or list, optional): The class explained
                    and unlearned per sample, in any of Captum's forms for a 2-D
                    output: an int, a one-element tuple ``(c,)``, a 0-d or
                    one-element tensor, or a list / 1-D tensor with one class per
                    sample. None explains the predicted class (argmax of the
                    output on ``inputs``).
                    Default: None
            additional_forward_args (Any, optional): Passed to ``forward_func``
                    after the inputs, as in Captum. Tensors must have the batch
                    size on dim 0; each sample is unlearned with its own row.
                    Default: None
            n_steps (int, optional): :math:`B`, the number of points of the path
                    integral (>= 1; 1 is one gradient at ``inputs``).
                    Default: 15
            method (str, optional): Captum's approximation method:
                    ``riemann_right``, ``riemann_left``, ``riemann_middle``,
                    ``riemann_trapezoid`` or ``gausslegendre``.
                    Default: ``riemann_right``
            internal_batch_size (int, optional): Maximum number of path points
                    evaluated in one forward pass of the integral, as in Captum: a
                    chunk holds whole steps of all N samples, so at least N rows,
                    and the baseline matching runs the N samples together. Memory
                    is bounded by ``max(internal_batch_size, N)`` forward+backward
                    rows (plus the unlearning chunk).
                    Default: None (all ``n_steps * N`` at once; measured on
                    ResNet-50 at 3x224x224: about 90 MB per row, 3.0 GB for 2
                    images)
            return_convergence_delta (bool, optional): Also return the
                    completeness gap per sample.
                    Default: False

        Returns:
            **attributions** or 2-element tuple of **attributions**, **delta**:
            - **attributions** (*Tensor* or *tuple[Tensor, ...]*):
                    Attributions with the shape of ``inputs``; a tuple when
                    ``inputs`` is a tuple.
            - **delta** (*Tensor*, returned if return_convergence_delta=True):
                    :math:`\sum_i \mathrm{UNI}_i(x) - (f_c(x) - f_c(x'))` per
                    sample, shape (N,).

        Examples::

            >>> # ImageClassifier takes a single input tensor of images Nx3x32x32,
            >>> # and returns an Nx10 tensor of class logits.
            >>> net = ImageClassifier()
            >>> uni = UnlearnedIntegratedGradients(net)
            >>> input = torch.randn(2, 3, 32, 32)
            >>> # Explains the predicted class of each image.
            >>> attribution = uni.attribute(input)
            >>> # The learned baselines, to plot them.
            >>> baselines = uni.compute_baselines(input)
        """
        is_inputs_tuple = _is_tuple(inputs)
        n_steps, method, internal_batch_size = check_call_arguments(
            n_steps, method, internal_batch_size
        )
        formatted = format_inputs(inputs, require_float=True)
        given = None if baselines is None else format_baselines(baselines, formatted)
        args = _format_additional_forward_args(additional_forward_args)
        check_sample_args(args, formatted[0].shape[0])

        with torch.enable_grad():
            forward = protected_forward(self._wrapper, buffer_copies(self.model))
            classes = self._classes(forward, formatted, target, args)
            if given is None:
                starts = self._learn_baselines(
                    forward, formatted, formatted, classes, args, args
                )
            else:
                starts = given
            attributions = self._integrate(
                forward, formatted, starts, classes, args, n_steps, method,
                internal_batch_size,
            )  # fmt: skip
            output = _format_output(is_inputs_tuple, attributions)
            if not return_convergence_delta:
                return output
            delta = completeness_gap(
                forward, attributions, formatted, starts, classes, args
            )
        return output, delta

    def compute_baselines(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> TensorOrTupleOfTensorsGeneric:
        r"""
        The learned baselines :math:`x' = x + \delta^T` (Algorithm 1, lines 1-7).

        Args:

            inputs (Tensor or tuple[Tensor, ...]): As in :meth:`attribute`.
            target (int, tuple, Tensor, or list, optional): As in
                    :meth:`attribute`.
                    Default: None
            additional_forward_args (Any, optional): As in :meth:`attribute`.
                    Default: None

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **baselines**, shaped like
            ``inputs``, at L2 distance ``epsilon`` from them per sample.

        Examples::

            >>> uni = UnlearnedIntegratedGradients(net)
            >>> baselines = uni.compute_baselines(images, target=labels)
        """
        is_inputs_tuple = _is_tuple(inputs)
        formatted = format_inputs(inputs, require_float=True)
        args = _format_additional_forward_args(additional_forward_args)
        check_sample_args(args, formatted[0].shape[0])
        with torch.enable_grad():
            forward = protected_forward(self._wrapper, buffer_copies(self.model))
            classes = self._classes(forward, formatted, target, args)
            baselines = self._learn_baselines(
                forward, formatted, formatted, classes, args, args
            )
        return _format_output(is_inputs_tuple, tuple(b.detach() for b in baselines))

    def _classes(
        self,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        target: TargetType,
        args: tuple | None,
    ) -> Tensor:
        with torch.no_grad():
            logits = forward(*inputs, *(args or ()))
        return resolve_targets(logits, resolve_class_targets(logits, target))
