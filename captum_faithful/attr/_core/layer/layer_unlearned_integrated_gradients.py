"""Layer UNI: the learned perturbation lives on a layer's output (e.g. embeddings)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeAlias, overload

import torch
from captum.attr import LayerAttribution, LayerIntegratedGradients
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import repeat_rows
from captum_faithful._typing import BaselineInput, TargetType
from captum_faithful._utils import check_bool
from captum_faithful.attr._core.unlearned_integrated_gradients import (
    CallContext,
    PathSpace,
    UnlearnedIntegratedGradients,
)

#: What a layer method returns per call: the layer's value as the layer takes or
#: returns it (a tensor or a tuple), or a list of them for a list of layers.
LayerAttributions: TypeAlias = (
    Tensor | tuple[Tensor, ...] | list[Tensor | tuple[Tensor, ...]]
)


def _layer_list(layer: object) -> list[nn.Module]:
    """``layer`` (a module or a non-empty list of modules) as a list, checked."""
    if isinstance(layer, nn.Module):
        return [layer]
    if (
        isinstance(layer, list)
        and layer
        and all(isinstance(m, nn.Module) for m in layer)
    ):
        return list(layer)
    raise TypeError(
        "`layer` must be an nn.Module or a non-empty list of nn.Modules, got "
        f"{type(layer).__name__}"
    )


def _layer_name(index: int, n_layers: int) -> str:
    return "`layer`" if n_layers == 1 else f"`layer[{index}]`"


@contextmanager
def _capture(
    layers: list[nn.Module], layer_input: bool, store: list[list]
) -> Iterator[None]:
    """Append what each layer takes (positional inputs) or returns to its list in
    ``store`` on every call; hooks removed after."""
    handles = []

    def output_hook(seen: list) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen.append(output)

        return hook

    def input_hook(seen: list) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            seen.append(args)

        return hook

    try:
        for layer, seen in zip(layers, store, strict=True):
            if layer_input:
                handles.append(layer.register_forward_pre_hook(input_hook(seen)))
            else:
                handles.append(layer.register_forward_hook(output_hook(seen)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _replace(
    layers: list[nn.Module],
    values: tuple[Tensor, ...],
    groups: tuple[tuple[int, bool], ...],
    layer_input: bool,
) -> Iterator[None]:
    """Make each layer take (``layer_input``) or return its slice of ``values``;
    hooks removed after."""
    handles = []

    def output_hook(part: tuple[Tensor, ...], is_tuple: bool) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            # a copy, so that in-place operations downstream never hit the leaves
            replaced = tuple(v.clone() for v in part)
            return replaced if is_tuple else replaced[0]

        return hook

    def input_hook(part: tuple[Tensor, ...]) -> Callable:
        def hook(module: nn.Module, args: Any) -> tuple[Tensor, ...]:
            return tuple(v.clone() for v in part)

        return hook

    try:
        start = 0
        for layer, (count, is_tuple) in zip(layers, groups, strict=True):
            part = values[start : start + count]
            start += count
            if layer_input:
                handles.append(layer.register_forward_pre_hook(input_hook(part)))
            else:
                handles.append(layer.register_forward_hook(output_hook(part, is_tuple)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_tensor_tuple(
    value: Any, layer_input: bool, name: str
) -> tuple[tuple[Tensor, ...], bool]:
    """What a layer takes or returns as a tuple of tensors, and whether it is
    returned as a tuple: a layer output as the layer returns it (a tensor or a
    tuple of tensors); a layer's positional inputs as a tuple when there are
    several, as in Captum."""
    if layer_input:
        if value and all(isinstance(t, Tensor) for t in value):
            return tuple(value), len(value) > 1
        raise TypeError(
            f"with attribute_to_layer_input=True, {name} must take one or more "
            "positional tensors, got "
            f"({', '.join(type(t).__name__ for t in value)})"
        )
    if isinstance(value, Tensor):
        return (value,), False
    if isinstance(value, tuple) and value and all(isinstance(t, Tensor) for t in value):
        return value, True
    raise TypeError(
        f"{name} must return a tensor or a tuple of tensors, got {type(value).__name__}"
    )


class LayerUnlearnedIntegratedGradients(
    UnlearnedIntegratedGradients, LayerIntegratedGradients
):
    r"""
    Layer UNI is :class:`UnlearnedIntegratedGradients` on the output (or the
    input) of a layer, typically the embedding layer of a text model, where token
    ids cannot be perturbed continuously. It is a drop-in for Captum's
    ``LayerIntegratedGradients``, and a subclass of it, so Captum's
    ``LLMGradientAttribution`` accepts it. Everything but where the path lives is
    UNI's: this class overrides the two hooks that place it on the layer.

    For each sample :math:`x` with class :math:`c`, let :math:`h = e(x)` be the
    layer's output and :math:`f(h)` the model's logits when the layer returns
    :math:`h`. The parameters are unlearned on the full forward,
    :math:`\hat\theta = \theta + \eta\, g / \lVert g \rVert_2` with
    :math:`g = \nabla_\theta \mathrm{CE}(f(x;\theta), c)` (one norm over all
    parameters with ``requires_grad``) and :math:`\hat p = \mathrm{softmax}
    f(x;\hat\theta)`; the perturbation lives on the layer output:

    .. math::
        \delta^{t+1} = \varepsilon \frac{\delta^t - \mu \nabla_\delta
        \mathrm{KL}(\hat p \,\Vert\, \mathrm{softmax} f(h+\delta^t;\theta))}
        {\lVert \cdot \rVert_2}, \quad \delta^0 = 0, \qquad h' = h + \delta^T

    .. math::
        \mathrm{LayerUNI}_j(x) = (h_j - h'_j) \sum_{k=1}^{B} w_k
        \frac{\partial f_c(h' + \alpha_k (h - h'))}{\partial h_j}

    with the L2 norm over the whole layer output of the sample (all tensors when
    the layer returns a tuple).

    **One log-probability per sample.** When ``forward_func`` returns one score
    per sample that is a log-probability, :math:`s = \log p \le 0` (Captum's
    ``LLMGradientAttribution`` replaces ``forward_func`` by a wrapper returning
    the log-probability of the target token), UNI unlearns the binary
    distribution :math:`(p, 1 - p)`: the direction is
    :math:`g = \nabla_\theta (-s)`, the full-softmax cross-entropy of the target
    token, and the baseline matches

    .. math::
        \mathrm{KL}\big((\hat p, 1 - \hat p) \,\Vert\, (p_\delta, 1 - p_\delta)\big)
        = \hat p \log \frac{\hat p}{p_\delta}
        + (1 - \hat p) \log \frac{1 - \hat p}{1 - p_\delta}

    with :math:`\hat p = e^{s(x;\hat\theta)}` and :math:`p_\delta = e^{s(h +
    \delta;\theta)}`; the attributions integrate :math:`s` itself, so they sum to
    :math:`s(h) - s(h')`. A positive score per sample is no log-probability and is
    refused (learning the baselines needs class scores or a log-probability). In
    Captum's pipeline the embedding layer sees the prompt followed by the target
    tokens before the current one; the learned baseline moves the prompt's
    positions only (those tokens stay as they are, as with Captum's input-space
    baselines), so each row of ``token_attr`` sums to :math:`s(h) - s(h')`.

    **A list of layers** (``layer=[l1, l2]``) is attributed in one call, as in
    Captum: the path runs on all the layers' values jointly,
    :math:`(h_1, h_2)` from :math:`(h'_1, h'_2)`, and a list with one entry per
    layer is returned. A learned baseline is one :math:`\delta` per layer, learned
    jointly: the L2 ball of radius :math:`\varepsilon` is over all layers' values
    of the sample together, as UNI treats a tuple of inputs, so the attributions
    of all layers together sum to :math:`f_c(h) - f_c(h')` (completeness). The
    layers must not depend on each other (no layer may compute another's input).

    Padding is handled by passing the attention mask through
    ``additional_forward_args``: every forward, including the per-sample
    unlearning, sees each sample with its own mask row. The model is never written
    to and runs in the mode the user left it in (see
    :class:`UnlearnedIntegratedGradients`). ``forward_func`` is read at each call,
    so a shallow copy whose ``forward_func`` is replaced uses the new one (and the
    original keeps its own); ``model`` is the module resolved at construction.
    """

    #: The inputs are not perturbed (token ids may be integers); the layer output is.
    _floating_inputs = False

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module | list[nn.Module],
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
                        modification of it, returning class scores (N, n_classes), one
                        log-probability per sample (N,), or a ``ModelOutput`` / dict
                        with ``logits``.
            layer (nn.Module or list[nn.Module]): The layer whose output (or input,
                        see ``attribute_to_layer_input``) is perturbed and attributed
                        (e.g. ``model.bert.embeddings``), or a list of layers that do
                        not depend on each other. Each must return (or take) a tensor
                        or a tuple of tensors and run once per forward.
            model (nn.Module, optional): The module whose parameters are unlearned;
                        only learning the baselines needs it.
                        Default: ``forward_func`` when it is an ``nn.Module``, else
                        None
            multiply_by_inputs (bool, optional): Whether to multiply by
                        ``(h - h')``, as Captum's LayerIntegratedGradients does.
                        Default: True
            unlearning_step (float, optional): :math:`\eta` (> 0).
                        Default: 1.0
            pgd_steps (int, optional): :math:`T` (>= 0).
                        Default: 10
            epsilon (float, optional): :math:`\varepsilon`, the L2 distance of the
                        layer baseline from the layer output per sample (> 0): one
                        radius over the sample's whole layer output (all tokens and
                        features, all tensors of a tuple, all layers of a list), in
                        the units of that output. With :math:`d` values per sample it
                        moves each by :math:`\varepsilon / \sqrt{d}` (root mean
                        square): for BERT-base embeddings of 128 tokens (:math:`d` =
                        98,304, LayerNorm-ed to about unit scale) 0.25 is 8e-4 per
                        value. The paper's 0.25 was chosen for 3x224x224 images, not
                        for embeddings; scale it with :math:`\sqrt{d}` and the output's
                        scale (see
                        :class:`~captum_faithful.UnlearnedIntegratedGradients`).
                        Unlike the input-space method, the default does not follow
                        the size: a layer's values are no [0, 1] pixels, so the
                        paper's per-pixel size says nothing about them, and the
                        paper itself used 0.25 unchanged on language models.
                        Default: 0.25
            pgd_step_size (float, optional): :math:`\mu` (> 0).
                        Default: 0.1
            unlearning_batch_size (int, optional): Samples unlearned together in one
                        vectorised chunk; None takes as many as fit ``2**26``
                        parameter values.
                        Default: None
        """
        _layer_list(layer)
        if epsilon is None:
            raise TypeError(
                "`epsilon` must be a real number for a layer's values (default "
                "0.25, the paper's value, used unchanged on layers); None, the "
                "input-size default of UnlearnedIntegratedGradients, is for input "
                "pixels"
            )
        UnlearnedIntegratedGradients.__init__(
            self,
            forward_func,
            model,
            multiply_by_inputs,
            unlearning_step,
            pgd_steps,
            epsilon,
            pgd_step_size,
            unlearning_batch_size,
        )
        # Captum's LayerIntegratedGradients.__init__ is not called: it builds an
        # IntegratedGradients of its own, which this class does not use
        # (Captum types `layer` as a TypeVar constrained to a module or to a list
        # of modules, which a union of the two does not satisfy)
        LayerAttribution.__init__(self, forward_func, layer)  # type: ignore[type-var]

    # As in Captum's LayerIntegratedGradients: the layer attributions alone, or
    # with the completeness gap when return_convergence_delta is True. They have
    # the form of the layer's value (a list for a list of layers), not of the
    # inputs, hence the incompatible override of UnlearnedIntegratedGradients's
    # overloads (Captum's layer methods are not subclasses of their input methods).
    @overload  # type: ignore[override]
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        internal_batch_size: int | None = None,
        *,
        return_convergence_delta: Literal[True],
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> tuple[LayerAttributions, Tensor]: ...

    @overload
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        internal_batch_size: int | None = None,
        return_convergence_delta: Literal[False] = False,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> LayerAttributions: ...

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        baselines: BaselineInput = None,
        target: TargetType = None,
        additional_forward_args: object = None,
        n_steps: int = 15,
        method: str = "riemann_right",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> LayerAttributions | tuple[LayerAttributions, Tensor]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): The model inputs (e.g. token
                        ids), batch on dim 0. They are not perturbed; the layer
                        output is.
            baselines (scalar, Tensor, str, Callable, or tuple, optional): None
                        learns the layer baseline :math:`h'`. Anything else is an
                        input-space baseline in any of
                        :meth:`UnlearnedIntegratedGradients.attribute`'s forms,
                        used as in Captum's LayerIntegratedGradients: :math:`h'` is
                        the layer output on it (e.g. a tensor of pad-token ids).
                        Default: None
            target (int, tuple, Tensor, or list, optional): Class explained and
                        unlearned per sample (Captum's forms); None explains the
                        predicted class, or the one score per sample.
                        Default: None
            additional_forward_args (Any, optional): Passed to ``forward_func``
                        after the inputs (e.g. the attention mask); tensors must
                        have the batch size on dim 0 (they follow their samples),
                        other values are passed to every forward as they are.
                        Captum's LLM wrapper is the exception: its target tokens,
                        of their own length, are passed as they are.
                        Default: None
            n_steps (int, optional): Points of the path integral (>= 1).
                        Default: 15
            method (str, optional): Captum's approximation method.
                        Default: ``riemann_right``
            internal_batch_size (int, optional): Maximum number of path points
                        per forward pass of the integral, as in Captum; a batch of
                        more samples is explained that many samples at a time, so
                        memory is bounded by it, not by the batch size.
                        Default: None
            return_convergence_delta (bool, optional): Also return the
                        completeness gap :math:`\sum_j \mathrm{LayerUNI}_j -
                        (f_c(h) - f_c(h'))` per sample (over all layers of a list).
                        Default: False
            attribute_to_layer_input (bool, optional): Put the path on the
                        layer's positional inputs instead of its output, as in
                        Captum (one flag for all layers of a list). The inputs
                        must be floating-point tensors.
                        Default: False
            grad_kwargs (dict, optional): Keyword arguments for
                        :func:`torch.autograd.grad` in the path integral and the
                        baseline matching (e.g. ``{"materialize_grads": True}``
                        for a layer the output does not depend on).
                        Default: None

        Returns:
            **attributions** or 2-element tuple of **attributions**, **delta**:
            - **attributions** (*Tensor*, *tuple[Tensor, ...]* or *list*):
                        Attributions with the shape of the layer output (or
                        input): a tuple when the layer returns a tuple (or takes
                        several tensors), a list with one such entry per layer
                        when ``layer`` is a list.
            - **delta** (*Tensor*, returned if return_convergence_delta=True):
                        Completeness gap per sample, shape (N,).

        Examples::

            >>> # a Hugging Face text classifier; attribute to the embeddings
            >>> def forward(input_ids, attention_mask):
            >>>     return model(input_ids=input_ids, attention_mask=attention_mask)
            >>> uni = LayerUnlearnedIntegratedGradients(
            >>>     forward, model.bert.embeddings, model=model)
            >>> attributions = uni.attribute(
            >>>     input_ids, additional_forward_args=(attention_mask,))
            >>> token_scores = attributions.sum(dim=-1)
            >>> # in Captum's LLM pipeline (log-probability of each target token)
            >>> from captum.attr import LLMGradientAttribution, TextTokenInput
            >>> llm_attr = LLMGradientAttribution(
            >>>     LayerUnlearnedIntegratedGradients(lm, lm.transformer.wte),
            >>>     tokenizer)
            >>> result = llm_attr.attribute(
            >>>     TextTokenInput("the cat sat", tokenizer), target="on the mat")
            >>> result.plot_token_attr()
        """
        context = self._layer_context(attribute_to_layer_input, grad_kwargs)
        return self._attribute_call(
            context,
            inputs,
            baselines,
            target,
            additional_forward_args,
            n_steps,
            method,
            internal_batch_size,
            return_convergence_delta,
        )

    def compute_baselines(  # type: ignore[override]
        # the layer's form (see attribute), not the inputs' as in the superclass
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: object = None,
        attribute_to_layer_input: bool = False,
    ) -> LayerAttributions:
        r"""
        The learned layer baselines :math:`h' = e(x) + \delta^T`.

        Args:

            inputs (Tensor or tuple[Tensor, ...]): As in :meth:`attribute`.
            target (int, tuple, Tensor, or list, optional): As in
                        :meth:`attribute`.
                        Default: None
            additional_forward_args (Any, optional): As in :meth:`attribute`.
                        Default: None
            attribute_to_layer_input (bool, optional): As in :meth:`attribute`.
                        Default: False

        Returns:
            *Tensor*, *tuple[Tensor, ...]* or *list* shaped like the attributions
            of :meth:`attribute`, at L2 distance ``epsilon`` from the layer values
            per sample (jointly over all layers of a list).

        Examples::

            >>> uni = LayerUnlearnedIntegratedGradients(forward, embeddings, model)
            >>> h_baseline = uni.compute_baselines(input_ids, None, (mask,))
        """
        return self._baselines_call(
            self._layer_context(attribute_to_layer_input, None),
            inputs,
            target,
            additional_forward_args,
        )

    def _layer_context(
        self, attribute_to_layer_input: bool, grad_kwargs: dict[str, Any] | None
    ) -> CallContext:
        check_bool("attribute_to_layer_input", attribute_to_layer_input)
        if grad_kwargs is not None and not isinstance(grad_kwargs, dict):
            raise TypeError(
                "`grad_kwargs` must be None or a dict of keyword arguments for "
                f"torch.autograd.grad, got {type(grad_kwargs).__name__}"
            )
        return self._context(grad_kwargs, attribute_to_layer_input)

    def _path_space(
        self,
        context: CallContext,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        is_tuple: bool,
        args: tuple | None,
    ) -> PathSpace:
        """The path lives on the layers' values; the model inputs stay fixed."""
        values, groups, logits = self._layer_eval(context, forward, inputs, args)
        layer_forward = self._layer_forward(context, forward, inputs, args, groups)
        return PathSpace(
            values, layer_forward, None, groups, logits, isinstance(self.layer, list)
        )

    def _given_starts(
        self,
        context: CallContext,
        forward: Callable[..., Tensor],
        space: PathSpace,
        given: tuple[Tensor, ...],
        args: tuple | None,
    ) -> tuple[Tensor, ...]:
        """An input-space baseline starts the path at the layers' values on it."""
        return self._layer_eval(context, forward, given, args)[0]

    def _free_values(
        self, context: CallContext, space: PathSpace, args: tuple | None
    ) -> tuple[Tensor | None, ...] | None:
        """In Captum's LLM pipeline the layer sees the prompt followed by the
        ``cur_target_idx`` previous target tokens; the learned baseline moves the
        prompt's positions only (dim 1 of each layer value whose dim 1 is the
        whole sequence), as Captum's LayerIntegratedGradients with an input-space
        baseline leaves the appended tokens at their values, and Captum drops
        their attributions."""
        appended = args[2] if context.captum_llm and args and len(args) > 2 else 0
        if (
            args is None  # never with appended tokens; for the type checker
            or not isinstance(appended, int)
            or isinstance(appended, bool)
            or appended < 1
        ):
            return None
        prompt = (
            args[0].to_model_input() if hasattr(args[0], "to_model_input") else None
        )
        if not isinstance(prompt, Tensor):
            return None
        length = prompt.shape[-1] + appended
        masks: list[Tensor | None] = []
        for value in space.points:
            if value.dim() < 2 or value.shape[1] != length:
                masks.append(None)
                continue
            mask = torch.ones(length, dtype=value.dtype, device=value.device)
            mask[-appended:] = 0
            masks.append(mask.reshape(1, -1, *([1] * (value.dim() - 2))))
        return tuple(masks)

    def _layer_eval(
        self,
        context: CallContext,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        args: tuple | None,
    ) -> tuple[tuple[Tensor, ...], tuple[tuple[int, bool], ...], Tensor]:
        """The layers' values (detached, flattened into one tuple), their groups
        (see :class:`PathSpace`) and the logits on ``inputs``."""
        layers = _layer_list(self.layer)
        store: list[list] = [[] for _ in layers]
        with torch.no_grad(), _capture(layers, context.layer_input, store):
            logits = forward(*inputs, *(args or ()))
        values: list[Tensor] = []
        groups = []
        for index, seen in enumerate(store):
            name = _layer_name(index, len(layers))
            if len(seen) != 1:
                raise ValueError(
                    f"{name} must run exactly once per forward pass, it ran "
                    f"{len(seen)} times"
                )
            tensors, is_tuple = _as_tensor_tuple(seen[0], context.layer_input, name)
            if not all(t.is_floating_point() for t in tensors):
                where = "takes" if context.layer_input else "returns"
                raise TypeError(
                    f"the path runs through what {name} {where}, which must be "
                    "floating point, got dtypes "
                    f"{[str(t.dtype) for t in tensors]}"
                    + (
                        " (attribute_to_layer_input=True on an embedding takes "
                        "its token ids; attribute to its output instead)"
                        if context.layer_input
                        else ""
                    )
                )
            values.extend(t.detach() for t in tensors)
            groups.append((len(tensors), is_tuple))
        return tuple(values), tuple(groups), logits

    def _layer_forward(
        self,
        context: CallContext,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        args: tuple | None,
        groups: tuple[tuple[int, bool], ...],
    ) -> Callable[..., Tensor]:
        """``f(h)``: the logits when the layers take or return ``h`` (k copies of
        the batch)."""
        n_examples = inputs[0].shape[0]
        layers = _layer_list(self.layer)
        layer_input = context.layer_input

        def layer_forward(*values: Tensor) -> Tensor:
            copies = values[0].shape[0] // n_examples
            model_inputs = tuple(torch.cat([x] * copies) for x in inputs)
            model_args = repeat_rows(args, copies, n_examples)
            with _replace(layers, values, groups, layer_input):
                return forward(*model_inputs, *(model_args or ()))

        return layer_forward
