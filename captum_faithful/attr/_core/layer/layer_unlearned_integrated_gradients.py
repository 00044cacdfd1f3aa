"""Layer UNI: the learned perturbation lives on a layer's output (e.g. embeddings)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from captum.attr import LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import repeat_rows
from captum_faithful._compat import TargetType, TensorOrTupleOfTensorsGeneric
from captum_faithful.attr._core.unlearned_integrated_gradients import (
    PathSpace,
    UnlearnedIntegratedGradients,
)


@contextmanager
def _capture_output(layer: nn.Module, store: list) -> Iterator[None]:
    """Append the output of ``layer`` to ``store`` on every call; hook removed after."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store.append(output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _replace_output(
    layer: nn.Module, values: tuple[Tensor, ...], is_tuple: bool
) -> Iterator[None]:
    """Make ``layer`` return ``values`` instead of its output; hook removed after."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        # a copy, so that in-place operations downstream never hit the leaves
        replaced = tuple(v.clone() for v in values)
        return replaced if is_tuple else replaced[0]

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _as_tensor_tuple(output: Any) -> tuple[tuple[Tensor, ...], bool]:
    if isinstance(output, Tensor):
        return (output,), False
    if (
        isinstance(output, tuple)
        and output
        and all(isinstance(t, Tensor) for t in output)
    ):
        return output, True
    raise TypeError(
        "the layer must return a tensor or a tuple of tensors, got "
        f"{type(output).__name__}"
    )


class LayerUnlearnedIntegratedGradients(UnlearnedIntegratedGradients, LayerAttribution):
    r"""
    Layer UNI is :class:`UnlearnedIntegratedGradients` on the output of a layer,
    typically the embedding layer of a text model, where token ids cannot be
    perturbed continuously. It is a drop-in for Captum's
    ``LayerIntegratedGradients``. Everything but where the path lives is UNI's:
    this class overrides the two hooks that place it on the layer's output.

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
    the layer returns a tuple). Padding is handled by passing the attention mask
    through ``additional_forward_args``: every forward, including the per-sample
    unlearning, sees each sample with its own mask row. The model is never written
    to and runs in the mode the user left it in (see
    :class:`UnlearnedIntegratedGradients`). One layer per instance.

    Args:

        forward_func (Callable): The forward function of the model or any
                    modification of it, returning class logits (N, n_classes) or a
                    ``ModelOutput`` / dict with ``logits``.
        layer (nn.Module): The layer whose output is perturbed and attributed
                    (e.g. ``model.bert.embeddings``). It must return a tensor or a
                    tuple of tensors and run once per forward.
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
                    features, all tensors of a tuple), in the units of that output.
                    With :math:`d` values per sample it moves each by
                    :math:`\varepsilon / \sqrt{d}` (root mean square): for BERT-base
                    embeddings of 128 tokens (:math:`d` = 98,304, LayerNorm-ed to
                    about unit scale) 0.25 is 8e-4 per value. The paper's 0.25 was
                    chosen for 3x224x224 images, not for embeddings; scale it with
                    :math:`\sqrt{d}` and the output's scale (see
                    :class:`~captum_faithful.UnlearnedIntegratedGradients`).
                    Default: 0.25
        pgd_step_size (float, optional): :math:`\mu` (> 0).
                    Default: 0.1
        unlearning_batch_size (int, optional): Samples unlearned together in one
                    vectorised chunk; None takes as many as fit ``2**26``
                    parameter values.
                    Default: None
    """

    #: The inputs are not perturbed (token ids may be integers); the layer output is.
    _floating_inputs = False

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        model: nn.Module | None = None,
        multiply_by_inputs: bool = True,
        unlearning_step: float = 1.0,
        pgd_steps: int = 10,
        epsilon: float = 0.25,
        pgd_step_size: float = 0.1,
        unlearning_batch_size: int | None = None,
    ) -> None:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"`layer` must be an nn.Module, got {type(layer).__name__}")
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
        LayerAttribution.__init__(self, forward_func, layer)

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
    ) -> Tensor | tuple[Tensor, ...] | tuple[Any, Tensor]:
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
                        predicted class.
                        Default: None
            additional_forward_args (Any, optional): Passed to ``forward_func``
                        after the inputs (e.g. the attention mask); tensors must
                        have the batch size on dim 0.
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
                        (f_c(h) - f_c(h'))` per sample.
                        Default: False

        Returns:
            **attributions** or 2-element tuple of **attributions**, **delta**:
            - **attributions** (*Tensor* or *tuple[Tensor, ...]*): Attributions
                        with the shape of the layer output (a tuple when the layer
                        returns one).
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
        """
        return UnlearnedIntegratedGradients.attribute.__wrapped__(
            self,
            inputs,
            baselines,
            target,
            additional_forward_args,
            n_steps,
            method,
            internal_batch_size,
            return_convergence_delta,
        )

    def compute_baselines(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""
        The learned layer baselines :math:`h' = e(x) + \delta^T`.

        Args:

            inputs (Tensor or tuple[Tensor, ...]): As in :meth:`attribute`.
            target (int, tuple, Tensor, or list, optional): As in
                        :meth:`attribute`.
                        Default: None
            additional_forward_args (Any, optional): As in :meth:`attribute`.
                        Default: None

        Returns:
            *Tensor* or *tuple[Tensor, ...]* shaped like the layer output, at L2
            distance ``epsilon`` from it per sample.

        Examples::

            >>> uni = LayerUnlearnedIntegratedGradients(forward, embeddings, model)
            >>> h_baseline = uni.compute_baselines(input_ids, None, (mask,))
        """
        return super().compute_baselines(inputs, target, additional_forward_args)

    def _path_space(
        self,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        is_tuple: bool,
        args: tuple | None,
    ) -> PathSpace:
        """The path lives on the layer's output; the model inputs stay fixed."""
        layer_out, is_layer_tuple, logits = self._layer_eval(forward, inputs, args)
        layer_forward = self._layer_forward(forward, inputs, args, is_layer_tuple)
        return PathSpace(layer_out, layer_forward, None, is_layer_tuple, logits)

    def _given_starts(
        self,
        forward: Callable[..., Tensor],
        space: PathSpace,
        given: tuple[Tensor, ...],
        args: tuple | None,
    ) -> tuple[Tensor, ...]:
        """An input-space baseline starts the path at the layer's output on it."""
        return self._layer_eval(forward, given, args)[0]

    def _layer_eval(
        self,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        args: tuple | None,
    ) -> tuple[tuple[Tensor, ...], bool, Tensor]:
        """The layer output (detached, as a tuple) and the logits on ``inputs``."""
        store: list = []
        with torch.no_grad(), _capture_output(self.layer, store):
            logits = forward(*inputs, *(args or ()))
        if len(store) != 1:
            raise ValueError(
                "`layer` must run exactly once per forward pass, it ran "
                f"{len(store)} times"
            )
        layer_out, is_tuple = _as_tensor_tuple(store[0])
        return tuple(t.detach() for t in layer_out), is_tuple, logits

    def _layer_forward(
        self,
        forward: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        args: tuple | None,
        is_layer_tuple: bool,
    ) -> Callable[..., Tensor]:
        """``f(h)``: the logits when the layer returns ``h`` (k copies of the batch)."""
        n_examples = inputs[0].shape[0]

        def layer_forward(*values: Tensor) -> Tensor:
            copies = values[0].shape[0] // n_examples
            model_inputs = tuple(torch.cat([x] * copies) for x in inputs)
            model_args = repeat_rows(args, copies, n_examples)
            with _replace_output(self.layer, values, is_layer_tuple):
                return forward(*model_inputs, *(model_args or ()))

        return layer_forward
