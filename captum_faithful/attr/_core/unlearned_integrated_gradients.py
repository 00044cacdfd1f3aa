"""UNI: Integrated Gradients from a baseline learned by unlearning the prediction."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import (
    check_integration_arguments,
    check_model_output,
    explained_dtype_errors,
    format_additional_forward_args,
    format_baselines,
    format_inputs,
    format_target,
    non_finite_rows,
    resolve_target,
    select_rows,
)
from captum_faithful._compat import (
    GradientForwardFunc,
    _batch_attribution,
    _format_output,
)
from captum_faithful._typing import (
    BaselineInput,
    TargetType,
    TensorOrTupleOfTensorsGeneric,
)
from captum_faithful._utils import (
    check_float,
    check_int,
    module_of,
    resolve_model,
)
from captum_faithful.attr._utils.unlearning import (
    ParametrizedForward,
    buffer_copies,
    completeness_gap,
    gradient_function,
    integrated_gradients,
    match_baselines,
    protected_forward,
    share_unbatched_args,
    unlearned_log_probs,
    unlearned_parameters,
    unlearning_chunk_size,
)

#: The UNI paper's L2 radius :math:`\varepsilon`, chosen for 3x224x224 images in
#: [0, 1], and the number of elements of such an image.
PAPER_EPSILON = 0.25
PAPER_ELEMENTS = 3 * 224 * 224


@dataclass(frozen=True)
class PathSpace:
    """Where the path integral of one call lives.

    Attributes:
        points (tuple of Tensor): The end of the path, detached: the inputs, or a
            layer's output.
        forward (Callable): The class scores as a function of ``points`` (and of
            ``args``), with the original parameters.
        args (tuple or None): What ``forward`` takes after the points.
        groups (tuple of (int, bool)): How the points are returned: one group per
            input tuple or per layer, each the number of its tensors and whether
            they are returned as a tuple.
        logits (Tensor): The class scores (N, n_classes) on the inputs.
        is_list (bool): Whether the groups are returned as a list (a list of
            layers) or the single group alone.
    """

    points: tuple[Tensor, ...]
    forward: Callable[..., Tensor]
    args: tuple | None
    groups: tuple[tuple[int, bool], ...]
    logits: Tensor
    is_list: bool = False

    def format(self, tensors: tuple[Tensor, ...]) -> Any:
        """``tensors`` (one per point) in the form the user gets them."""
        formatted, start = [], 0
        for count, is_tuple in self.groups:
            formatted.append(_format_output(is_tuple, tensors[start : start + count]))
            start += count
        return formatted if self.is_list else formatted[0]


@dataclass(frozen=True)
class CallContext:
    """What one call of ``attribute`` or ``compute_baselines`` runs with, read
    from the instance at call time (Captum's ``LLMGradientAttribution`` replaces
    ``forward_func`` on a shallow copy after construction).

    Attributes:
        wrapper (ParametrizedForward): ``forward_func`` with ``model``'s
            parameters and buffers substitutable.
        model (nn.Module or None): The module whose parameters are unlearned.
        gradient_func (Callable): Captum's gradient function, or one passing
            ``grad_kwargs`` to :func:`torch.autograd.grad`.
        layer_input (bool): For a layer method, whether the path lives on the
            layer's input instead of its output.
        captum_llm (bool): Whether ``forward_func`` is the wrapper of Captum's
            ``LLMGradientAttribution`` (the log-probability of one target token):
            its ``additional_forward_args`` are ``(inp, target_tokens,
            cur_target_idx)``, the target tokens of their own length (shared by
            all samples instead of refused), and the ``cur_target_idx`` previous
            target tokens appended after the prompt.
    """

    wrapper: ParametrizedForward
    model: nn.Module | None
    gradient_func: Callable
    layer_input: bool = False
    captum_llm: bool = False


class UnlearnedIntegratedGradients(GradientAttribution):
    r"""
    Unlearning-based Neural Interpretations (UNI) replace the static baseline of
    Integrated Gradients (black, blurred, noise) by a baseline learned for each
    input: the model's parameters take one normalised gradient-ascent step on the
    loss of the explained class (the prediction is "unlearned"), and the input is
    perturbed, within an L2 ball of radius ``epsilon`` (by default the paper's
    0.25 for 3x224x224 images, scaled to the input's size), until the original
    model outputs the distribution of the unlearned one. Integrated Gradients is then
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
    Unless ``epsilon`` is given, :math:`\varepsilon = 0.25 \sqrt{d / 150528}` for
    the :math:`d` elements of one sample: the paper's 0.25 on 3x224x224 images,
    at the same size per element on any input.
    Outputs are treated as logits. The unlearning direction is computed as the
    gradient of the log-odds against :math:`c`, which has the direction of
    :math:`g` and does not underflow in float32 on confident predictions. The
    unlearned parameters and copies of the buffers are substituted with
    :func:`torch.func.functional_call`, so the model is never written to
    (BatchNorm in training mode updates the copies); every module runs in the mode
    the user left it in. The per-sample unlearning is vectorised with
    :func:`torch.func.vmap` in chunks of ``unlearning_batch_size`` samples and
    falls back to a per-sample loop for models vmap cannot run; both compute the
    same function.

    **One log-probability per sample.** A ``forward_func`` returning one score per
    sample, shape (N,) or (N, 1), is read as a log-probability
    :math:`s = \log p \le 0` (e.g. of the next token of a language model, as
    Captum's ``LLMGradientAttribution`` returns), and UNI unlearns the binary
    distribution :math:`(p, 1 - p)`:

    .. math::
        g = \nabla_\theta (-s(x;\theta)), \qquad
        \hat p = e^{s(x;\hat\theta)}, \qquad
        \mathrm{KL}\big((\hat p, 1 - \hat p) \,\Vert\, (p_\delta, 1 - p_\delta)\big)
        = \hat p \log \frac{\hat p}{p_\delta}
        + (1 - \hat p) \log \frac{1 - \hat p}{1 - p_\delta}

    with :math:`p_\delta = e^{s(x + \delta;\theta)}`: :math:`-s` is the
    full-softmax cross-entropy of the token, so the step on :math:`\theta` is
    exactly UNI's, and the attributions sum to :math:`s(x) - s(x')`. A positive
    score is no log-probability and is refused when the baselines are learned.

    With explicit ``baselines`` UNI is Captum's IntegratedGradients (no unlearning,
    no parameters needed): a drop-in for it, with UNI's defaults for ``n_steps``
    and ``method``.

    :class:`~captum_faithful.LayerUnlearnedIntegratedGradients` is this class with
    the path on a layer's output: it overrides :meth:`_path_space` and
    :meth:`_given_starts`.

    More details in the paper *Unlearning-based Neural Interpretations*
    (Algorithm 1), and in the documentation's "How the methods work" page.
    """

    #: Whether ``inputs`` must be floating point (the path runs through them).
    _floating_inputs = True

    def __init__(
        self,
        forward_func: Callable,
        model: nn.Module | None = None,
        multiply_by_inputs: bool = True,
        unlearning_step: float = 1.0,
        pgd_steps: int = 10,
        epsilon: float | None = None,
        pgd_step_size: float = 0.1,
        unlearning_batch_size: int | None = None,
    ) -> None:
        r"""
        Args:

            forward_func (Callable): The forward function of the model or any
                        modification of it. It returns class scores of shape
                        (N, n_classes), one score per sample (N,) (a log-probability
                        when the baselines are learned), or a Hugging Face
                        ``ModelOutput`` / dict with a ``logits`` field. It is read at
                        each call: a shallow copy whose ``forward_func`` is replaced
                        (as Captum's ``LLMGradientAttribution`` does) uses the new
                        one, and the original keeps its own.
            model (nn.Module, optional): The module whose parameters are unlearned
                        and whose buffers are protected; ``forward_func`` must use it.
                        Only learning the baselines needs it. Resolved here, and kept
                        when ``forward_func`` is replaced later.
                        Default: ``forward_func`` when it is an ``nn.Module`` (or a
                        bound method of one), else the module the ``forward_func`` of
                        the call is, if any
            multiply_by_inputs (bool, optional): Whether to multiply the integrated
                        gradients by ``(inputs - baselines)`` (global attribution), as
                        Captum's IntegratedGradients does.
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
                        square). None follows the input's size with the paper's
                        per-element size: the paper's 0.25 on 3x224x224 images
                        (:math:`d_0` = 150,528) scaled to the :math:`d` elements of
                        each call's samples,
                        :math:`\varepsilon = 0.25 \sqrt{d / d_0}` (0.25 at
                        3x224x224, 0.25 / 7 = 0.0357 at 3x32x32, 0.018 at 1x28x28):
                        :math:`6.4 \times 10^{-4}` per element, 0.16/255 of the
                        [0, 1] pixel range, whatever the size (see
                        :meth:`resolved_epsilon`). It does not follow the inputs'
                        scale: for inputs normalised by a per-channel std
                        :math:`\sigma` (ImageNet's is about 0.226) or in [0, 255],
                        pass ``epsilon`` divided by :math:`\sigma` or times 255. A
                        number is used as given, at every input size. The
                        attributions sum to :math:`f_c(x) - f_c(x')`, which shrinks
                        with :math:`\varepsilon`: on a ResNet-18 with random weights
                        at 3x224x224 in [0, 1], 0.25 gives a sum of 0.02 and
                        per-pixel values near 1e-6, which Captum's
                        ``visualize_image_attr`` warns are "approximately 0" (the map
                        is still scaled correctly).
                        Default: None (:math:`0.25 \sqrt{d / 150528}`)
            pgd_step_size (float, optional): :math:`\mu`, the step size of the
                        baseline matching (> 0), in the units of the inputs, taken
                        before each rescale to :math:`\varepsilon`: when
                        :math:`\mu \lVert \nabla_\delta \mathrm{KL} \rVert` is small
                        against :math:`\varepsilon`, the steps after the first hardly
                        turn :math:`\delta` (random-weight ResNet-18 at 3x224x224:
                        0.3% of :math:`\varepsilon` per step).
                        Default: 0.1
            unlearning_batch_size (int, optional): Samples unlearned together in one
                        vectorised chunk; memory grows as this times the number of
                        parameters (measured: about 3 float32 copies of the
                        parameters per sample, 280 to 320 MB per sample on
                        ResNet-50). None
                        takes as many as fit ``2**26`` parameter values (256 MB per
                        copy at float32).
                        Default: None
        """
        if not callable(forward_func):
            raise TypeError(
                "`forward_func` must be callable (the model, or a function of the "
                f"inputs returning its outputs), got {type(forward_func).__name__}"
            )
        GradientAttribution.__init__(self, forward_func)
        self.model = resolve_model(forward_func, model, required=False)
        self._multiply_by_inputs = bool(multiply_by_inputs)
        self.unlearning_step = _positive_finite("unlearning_step", unlearning_step)
        self.pgd_steps = check_int("pgd_steps", pgd_steps, minimum=0)
        self.epsilon = None if epsilon is None else _positive_finite("epsilon", epsilon)
        self.pgd_step_size = _positive_finite("pgd_step_size", pgd_step_size)
        self.unlearning_batch_size = (
            None
            if unlearning_batch_size is None
            else check_int("unlearning_batch_size", unlearning_batch_size, minimum=1)
        )

    def _context(
        self, grad_kwargs: dict[str, Any] | None = None, layer_input: bool = False
    ) -> CallContext:
        """The forward function, model and gradient function of one call, read
        from the instance now: ``forward_func`` may have been replaced since
        construction (as Captum's ``LLMGradientAttribution`` does on a shallow
        copy). ``model`` is the module resolved at construction; without one, the
        module the current ``forward_func`` is (or is a method of)."""
        model = self.model if self.model is not None else module_of(self.forward_func)
        gradient_func = (
            self.gradient_func
            if grad_kwargs is None
            else gradient_function(grad_kwargs)
        )
        return CallContext(
            ParametrizedForward(self.forward_func, model),
            model,
            gradient_func,
            layer_input,
            # Captum's LLMGradientAttribution passes the target tokens (their own
            # length, shared by all samples) in additional_forward_args
            isinstance(self.forward_func, GradientForwardFunc),
        )

    # As in Captum's IntegratedGradients: the attributions alone, or with the
    # completeness gap when return_convergence_delta is True. The overloads are
    # undecorated: log_usage is untyped and would hide them from type checkers.
    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        internal_batch_size: int | None = None,
        *,
        return_convergence_delta: Literal[True],
    ) -> tuple[TensorOrTupleOfTensorsGeneric, Tensor]: ...

    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        internal_batch_size: int | None = None,
        return_convergence_delta: Literal[False] = False,
    ) -> TensorOrTupleOfTensorsGeneric: ...

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric | tuple[TensorOrTupleOfTensorsGeneric, Tensor]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Input for which attributions
                        are computed, floating point, with the batch on dim 0. A
                        tuple of tensors is perturbed jointly (one L2 ball over all
                        of them).
            baselines (scalar, Tensor, str, Callable, or tuple, optional): None
                        learns the baselines with Algorithm 1. Anything else is
                        used as given, without unlearning, as in Captum's
                        IntegratedGradients: a number or a tensor broadcastable to
                        the input (batch 1 or N), a preset ``"zero"``, ``"mean"``
                        or ``"blur"``, a callable ``input -> tensor``, or a tuple
                        with one per input.
                        Default: None
            target (int, tuple, Tensor, or list, optional): The class explained
                        and unlearned per sample, in any of Captum's forms: an
                        int, a one-element tuple ``(c,)``, a tensor with one class,
                        or a list / 1-D tensor with one class per sample. None
                        explains the predicted class (argmax of the output on
                        ``inputs``); for one score per sample, that score.
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
                        evaluated in one forward pass of the integral, as in
                        Captum. A batch of more than ``internal_batch_size``
                        samples is explained that many samples at a time (the
                        samples are independent: the same result in one chunk or
                        several, unless a module in training mode mixes them, as
                        BatchNorm does), so memory is bounded by
                        ``internal_batch_size`` forward+backward rows, plus the
                        unlearning chunk, whatever the batch size. None evaluates
                        all ``n_steps * N`` at once (measured on ResNet-50 at
                        3x224x224: about 100 MB per row).
                        Default: None
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
        return self._attribute_call(
            self._context(),
            inputs,
            baselines,
            target,
            additional_forward_args,
            n_steps,
            method,
            internal_batch_size,
            return_convergence_delta,
        )

    def _attribute_call(
        self,
        context: CallContext,
        inputs: Tensor | tuple[Tensor, ...],
        baselines: BaselineInput,
        target: TargetType,
        additional_forward_args: object,
        n_steps: int,
        method: str,
        internal_batch_size: int | None,
        return_convergence_delta: bool,
    ) -> Any:
        """``attribute`` with the call's context (shared with the layer method)."""
        n_steps, method, internal_batch_size = check_integration_arguments(
            n_steps, method, internal_batch_size
        )
        inputs, is_tuple, target, args = self._front_door(
            inputs, target, additional_forward_args, context.captum_llm
        )
        given = None if baselines is None else format_baselines(baselines, inputs)
        n_examples = inputs[0].shape[0]
        samples_per_chunk = min(n_examples, internal_batch_size or n_examples)
        chunks = []
        # every sample is explained independently (its own unlearning, baseline and
        # path), so a batch larger than internal_batch_size is explained that many
        # samples at a time: memory is bounded by the chunk, not by the batch
        for start in range(0, n_examples, samples_per_chunk):
            stop = min(n_examples, start + samples_per_chunk)
            chunks.append(
                self._attribute_samples(
                    context,
                    tuple(x[start:stop] for x in inputs),
                    is_tuple,
                    None if target is None else target[start:stop],
                    select_rows(args, torch.arange(start, stop)),
                    None if given is None else tuple(b[start:stop] for b in given),
                    n_steps,
                    method,
                    internal_batch_size,
                    return_convergence_delta,
                )
            )
        output = chunks[0][0].format(
            tuple(
                torch.cat(parts) for parts in zip(*(c[1] for c in chunks), strict=True)
            )
        )
        if not return_convergence_delta:
            return output
        # every chunk has its gap (return_convergence_delta)
        return output, torch.cat([gap for *_, gap in chunks if gap is not None])

    def _attribute_samples(
        self,
        context: CallContext,
        inputs: tuple[Tensor, ...],
        is_tuple: bool,
        target: Tensor | None,
        args: tuple | None,
        given: tuple[Tensor, ...] | None,
        n_steps: int,
        method: str,
        internal_batch_size: int | None,
        return_convergence_delta: bool,
    ) -> tuple[PathSpace, tuple[Tensor, ...], Tensor | None]:
        """``attribute`` on one chunk of samples: the path space (which formats
        the attributions), the attributions, and the completeness gap (None
        unless asked for)."""
        with torch.enable_grad():
            forward = protected_forward(context.wrapper, buffer_copies(context.model))
            with explained_dtype_errors(inputs, context.model):
                space = self._path_space(context, forward, inputs, is_tuple, args)
            classes = resolve_target(
                check_model_output(space.logits, type(self).__name__), target
            )
            if given is None:
                starts = self._learned_starts(context, space, inputs, classes, args)
            else:
                starts = self._given_starts(context, forward, space, given, args)
            attributions = self._integrate(
                context, space, starts, classes, n_steps, method, internal_batch_size
            )
            delta = None
            if return_convergence_delta:
                delta = completeness_gap(
                    space.forward,
                    attributions,
                    space.points,
                    starts,
                    classes,
                    space.args,
                )
        return space, attributions, delta

    def compute_baselines(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: object = None,
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
            *Tensor* or *tuple[Tensor, ...]* of **baselines**, shaped like the
            path's end (``inputs``), at L2 distance :meth:`resolved_epsilon` from it
            per sample.

        Examples::

            >>> uni = UnlearnedIntegratedGradients(net)
            >>> baselines = uni.compute_baselines(images, target=labels)
        """
        return self._baselines_call(
            self._context(), inputs, target, additional_forward_args
        )

    def _baselines_call(
        self,
        context: CallContext,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: object,
    ) -> Any:
        """``compute_baselines`` with the call's context."""
        inputs, is_tuple, target, args = self._front_door(
            inputs, target, additional_forward_args, context.captum_llm
        )
        with torch.enable_grad():
            forward = protected_forward(context.wrapper, buffer_copies(context.model))
            with explained_dtype_errors(inputs, context.model):
                space = self._path_space(context, forward, inputs, is_tuple, args)
            classes = resolve_target(
                check_model_output(space.logits, type(self).__name__), target
            )
            baselines = self._learned_starts(context, space, inputs, classes, args)
        return space.format(tuple(b.detach() for b in baselines))

    def resolved_epsilon(self, inputs: TensorOrTupleOfTensorsGeneric) -> float:
        r"""
        The radius :math:`\varepsilon` the baselines of ``inputs`` are learned
        with: ``epsilon`` when it was given, else the paper's 0.25 scaled to the
        :math:`d` elements of one sample of ``inputs`` (all tensors of a tuple
        together), :math:`0.25 \sqrt{d / 150528}`.

        Args:

            inputs (Tensor or tuple[Tensor, ...]): As in :meth:`attribute`, with
                        the batch on dim 0 (only the shapes are read).

        Returns:
            *float*: :math:`\varepsilon`.

        Examples::

            >>> uni = UnlearnedIntegratedGradients(net)
            >>> uni.resolved_epsilon(torch.rand(8, 3, 32, 32))  # 0.25 / 7
            0.03571428571428571
        """
        formatted, _ = format_inputs(inputs, floating=False)
        return self._radius(formatted)

    def _radius(self, points: tuple[Tensor, ...]) -> float:
        """``epsilon``, or the paper's per-element size over the elements of one
        sample of ``points`` (the inputs, or a layer's values)."""
        if self.epsilon is not None:
            return self.epsilon
        # every tensor has elements (format_inputs refuses empty inputs)
        elements = sum(math.prod(x.shape[1:]) for x in points)
        return PAPER_EPSILON * math.sqrt(elements / PAPER_ELEMENTS)

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute_future(self) -> None:
        """Not implemented, as for Captum's IntegratedGradients."""
        raise NotImplementedError(
            f"attribute_future is not implemented for {type(self).__name__}"
        )

    def _front_door(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: object,
        share_unbatched: bool = False,
    ) -> tuple[tuple[Tensor, ...], bool, Tensor | None, tuple | None]:
        """Captum's arguments in their canonical forms (inputs detached).

        With ``share_unbatched``, a tensor of ``additional_forward_args`` whose
        first dimension is not the batch size is shared by all samples (see
        :class:`~captum_faithful.attr._utils.unlearning.SharedArgument`) instead of
        refused."""
        formatted, is_tuple = format_inputs(inputs, floating=self._floating_inputs)
        n_examples = formatted[0].shape[0]
        if share_unbatched:
            additional_forward_args = share_unbatched_args(
                additional_forward_args, n_examples
            )
        return (
            tuple(x.detach() for x in formatted),
            is_tuple,
            format_target(target, n_examples),
            format_additional_forward_args(additional_forward_args, n_examples),
        )

    def _path_space(
        self,
        context: CallContext,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        is_tuple: bool,
        args: tuple | None,
    ) -> PathSpace:
        """The path lives on the inputs (the hook the layer variant overrides)."""
        with torch.no_grad():
            logits = forward(*inputs, *(args or ()))
        return PathSpace(inputs, forward, args, ((len(inputs), is_tuple),), logits)

    def _given_starts(
        self,
        context: CallContext,
        forward: Callable[..., Tensor],
        space: PathSpace,
        given: tuple[Tensor, ...],
        args: tuple | None,
    ) -> tuple[Tensor, ...]:
        """The start of the path for explicit input-space ``baselines``."""
        return given

    def _learned_starts(
        self,
        context: CallContext,
        space: PathSpace,
        inputs: tuple[Tensor, ...],
        classes: Tensor,
        args: tuple | None,
    ) -> tuple[Tensor, ...]:
        """Algorithm 1, lines 1-7: unlearn the prediction of ``inputs`` per sample,
        then move ``space.points`` until the original model's output matches the
        unlearned distribution."""
        model = self._check_unlearnable(context.model, space.logits)
        free = self._free_values(context, space, args)
        params = unlearned_parameters(model)
        log_target = unlearned_log_probs(
            context.wrapper,
            params,
            buffer_copies(context.model),
            inputs,
            classes,
            args,
            self.unlearning_step,
            unlearning_chunk_size(
                self.unlearning_batch_size, params, inputs[0].shape[0]
            ),
        )
        unlearned_to_nan = non_finite_rows(log_target)
        if bool(unlearned_to_nan.any()):
            raise ValueError(
                f"{type(self).__name__}: the model unlearned with "
                f"`unlearning_step`={self.unlearning_step:g} returned non-finite "
                "values (NaN or Inf) for samples "
                f"{unlearned_to_nan.nonzero().flatten().tolist()} (the step moved "
                "the parameters too far); pass a smaller `unlearning_step` (default "
                "1.0)"
            )
        return match_baselines(
            context.gradient_func,
            space.forward,
            space.points,
            log_target,
            space.args,
            self.pgd_steps,
            self._radius(space.points),
            self.pgd_step_size,
            free,
        )

    def _free_values(
        self, context: CallContext, space: PathSpace, args: tuple | None
    ) -> tuple[Tensor | None, ...] | None:
        """Masks (broadcastable 0/1) of the path values the learned baseline may
        move, one per point (None: all). All values here; the layer variant
        holds the target tokens Captum's LLM wrapper appends after the prompt."""
        return None

    @staticmethod
    def _check_unlearnable(model: nn.Module | None, logits: Tensor) -> nn.Module:
        """Learning baselines needs parameters to unlearn, and class scores or one
        log-probability per sample (explicit ``baselines`` need neither): the
        model, checked."""
        if model is None:
            reason = "`forward_func` is no nn.Module"
        elif not any(p.is_floating_point() for p in model.parameters()):
            reason = "the model has no floating-point parameters"
        else:
            # finite: check_model_output read these logits first
            if logits.shape[1] == 1 and not bool((logits <= 0).all()):
                raise ValueError(
                    "UNI reads one score per sample as a finite log-probability "
                    "(<= 0) "
                    "and unlearns the distribution (p, 1 - p), but forward_func "
                    f"returned {logits.flatten()[:4].tolist()}; return the "
                    "log-probability of the explained class (e.g. "
                    "`torch.log_softmax(logits, dim=-1)[:, c]`), or class scores "
                    "of shape (N, n_classes), or pass explicit `baselines`"
                )
            return model
        raise ValueError(
            "UNI learns the baselines by unlearning the model's parameters on the "
            f"explained class, but {reason}; pass the module that holds the "
            "parameters as `model=`, or explicit `baselines` (used as given, as in "
            "Captum)"
        )

    def _integrate(
        self,
        context: CallContext,
        space: PathSpace,
        starts: tuple[Tensor, ...],
        classes: Tensor,
        n_steps: int,
        method: str,
        internal_batch_size: int | None,
    ) -> tuple[Tensor, ...]:
        """Integrated gradients of ``space.forward`` from ``starts`` to
        ``space.points``, in chunks of ``internal_batch_size`` path points when
        given (Captum's batching, which calls :meth:`_attribute`)."""
        if internal_batch_size is not None and n_steps > 1:
            attributions = _batch_attribution(
                self,
                space.points[0].shape[0],
                internal_batch_size,
                n_steps,
                inputs=space.points,
                baselines=starts,
                target=classes,
                additional_forward_args=space.args,
                method=method,
                forward_fn=space.forward,
                gradient_func=context.gradient_func,
            )
        else:
            attributions = self._attribute(
                space.points, starts, classes, space.args, n_steps, method,
                forward_fn=space.forward, gradient_func=context.gradient_func,
            )  # fmt: skip
        return tuple(a.detach() for a in attributions)

    def _attribute(
        self,
        inputs: tuple[Tensor, ...],
        baselines: tuple[Tensor, ...],
        target: Tensor,
        additional_forward_args: tuple | None = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        step_sizes_and_alphas: tuple[list[float], list[float]] | None = None,
        forward_fn: Callable[..., Tensor] | None = None,
        gradient_func: Callable | None = None,
    ) -> tuple[Tensor, ...]:
        if forward_fn is None:
            forward_fn = self._context().wrapper
        return integrated_gradients(
            gradient_func if gradient_func is not None else self.gradient_func,
            forward_fn,
            inputs,
            baselines,
            target,
            additional_forward_args,
            n_steps,
            method,
            self.multiplies_by_inputs,
            step_sizes_and_alphas,
        )


def _positive_finite(name: str, value: Any) -> float:
    value = check_float(name, value, low=0.0, low_inclusive=False)
    if value == float("inf"):
        raise ValueError(f"`{name}` must be finite, got inf")
    return value
