"""TransMM (Chefer et al. 2021, "Generic Attention-model Explainability"), thesis §3.4."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import (
    check_model_output,
    explained_dtype_errors,
    format_additional_forward_args,
    format_inputs,
    format_target,
    resolve_target,
)
from captum_faithful._compat import TargetType, TensorOrTupleOfTensorsGeneric
from captum_faithful._utils import check_choice, check_int, resolve_model, run_forward
from captum_faithful.vit import capture, eager_attention, get_adapter

OUTPUTS = ("input", "patches")


def gradient_weighted_attention(attention: Tensor, gradient: Tensor) -> Tensor:
    r"""TransMM's head-averaged attention :math:`\bar{A} = E_h[(\nabla A \odot A)^+]`.

    Args:
        attention (Tensor): Post-softmax probabilities ``(N, heads, T, T)``.
        gradient (Tensor): Gradient of the target logit w.r.t. ``attention``.

    Returns:
        Tensor ``(N, T, T)`` in float32 (the clamp comes before the head mean).
    """
    return (gradient.float() * attention.float()).clamp(min=0).mean(dim=1)


def cls_relevance(attentions: list[Tensor]) -> Tensor:
    r"""CLS row of :math:`R = \prod_\ell (I + \bar{A}_\ell)`, layers in forward order.

    Equals row 0 of the relevancy matrix after ``R <- R + Ā_ℓ R`` for each layer
    starting from ``R = I``; computed as a row vector from the last layer down,
    which costs ``O(T^2)`` per layer instead of ``O(T^3)``.

    Args:
        attentions (list[Tensor]): :math:`\bar{A}_\ell` ``(N, T, T)`` in forward order.

    Returns:
        Tensor ``(N, T)``: relevance of every token for the CLS token.
    """
    first = attentions[0]
    row = torch.zeros(first.shape[:2], dtype=first.dtype, device=first.device)
    row[:, 0] = 1.0
    for attention in reversed(attentions):
        row = row + torch.bmm(row.unsqueeze(1), attention).squeeze(1)
    return row


def patches_to_pixels(
    patch_map: Tensor, patch_size: tuple[int, int], shape: torch.Size
) -> Tensor:
    """Spread each patch value over its pixels and channels (nearest, no rescale).

    Pixels outside the patch grid (an image size that is not a multiple of the patch
    size, cropped by the patch embedding) get 0.
    """
    ph, pw = patch_size
    height, width = shape[-2:]
    pixels = patch_map.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)
    pixels = pixels[:, :height, :width]
    pixels = F.pad(pixels, (0, width - pixels.shape[2], 0, height - pixels.shape[1]))
    return pixels.unsqueeze(1).expand(shape).contiguous()


class TransMM(GradientAttribution):
    r"""TransMM: attention weighted by its gradient, rolled out over the layers.

    For a Vision Transformer, every layer's post-softmax attention :math:`A^{(\ell)}`
    is weighted by the gradient of the target logit :math:`y_t` with respect to it;
    the positive part, averaged over heads, is propagated from the first layer to the
    last. The explanation is the CLS token's row over the patch tokens: how much
    each patch contributed, through attention, to the class token that is
    classified. One forward and one backward pass serve the whole batch.

    .. math::
        \bar{A}^{(\ell)} = \mathbb{E}_h\big[(\nabla_{A^{(\ell)}} y_t \odot
        A^{(\ell)})^+\big], \qquad
        R \leftarrow R + \bar{A}^{(\ell)} R \quad (R = I), \qquad
        \text{attribution}_i = R_{0,\,i}, \; i \in \text{patches}

    The model's blocks, attention probabilities, prefix tokens (CLS, distillation,
    registers) and patch grid are found by :func:`captum_faithful.vit.get_adapter`
    (Hugging Face ViT, DeiT, CLIP, Dinov2; timm VisionTransformer; others via
    :func:`captum_faithful.vit.register_adapter`). Fused attention (SDPA, flash,
    timm ``fused_attn``) is switched to the eager path for the call and back
    afterwards.
    """

    def __init__(
        self,
        forward_func: Callable,
        model: nn.Module | None = None,
        start_layer: int = 0,
    ) -> None:
        """
        Args:
            forward_func (Callable): The model or a function returning logits
                        ``(N, n_classes)`` (a Hugging Face ``ModelOutput`` is reduced to
                        ``logits``, or ``logits_per_image`` for ``CLIPModel``).
            model (nn.Module, optional): The Vision Transformer that ``forward_func``
                        runs. Default: ``forward_func`` when it is a module.
            start_layer (int, optional): First block (0-based) whose attention
                        enters the rollout. Default: 0
        """
        GradientAttribution.__init__(self, forward_func)
        self.model = resolve_model(forward_func, model)
        self.adapter = get_adapter(self.model)
        self.start_layer = check_int("start_layer", start_layer, 0)
        if self.start_layer >= self.adapter.num_layers:
            raise ValueError(
                f"`start_layer` must be < the number of blocks "
                f"({self.adapter.num_layers}), got {start_layer}"
            )

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: object = None,
        output: str = "input",
    ) -> TensorOrTupleOfTensorsGeneric | Tensor:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): Images ``(N, C, H, W)``. In a tuple,
                        exactly one tensor must be 4-D (the image); the other tensors
                        are passed to the model too and get zero attribution.
            target (int, tuple, Tensor or list, optional): Output index per sample,
                        as in Captum. ``None`` explains the predicted class (argmax of
                        the output). For ``CLIPModel`` it indexes the texts.
                        Default: None
            additional_forward_args (Any, optional): Passed to ``forward_func`` after
                        the inputs, as in Captum. The batch is forwarded once,
                        whole, so tensors need not have its batch size (e.g. the
                        token ids of ``CLIPModel``'s texts). Default: None
            output (str, optional): ``"input"`` spreads each patch value over its
                        pixels and channels (nearest, no rescale; pixels cropped by
                        the patch embedding get 0), so the attribution has the
                        input's shape; ``"patches"`` returns ``(N, grid_h, grid_w)``.
                        Default: ``"input"``

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**: with
            ``output="input"``, the shape of ``inputs`` (a tuple mirrors a tuple);
            with ``output="patches"``, one tensor ``(N, grid_h, grid_w)``.

        Examples::

            >>> model = ViTForImageClassification.from_pretrained(name).eval()
            >>> transmm = TransMM(model)
            >>> attributions = transmm.attribute(images)            # (N, 3, H, W)
            >>> patches = transmm.attribute(images, target=3, output="patches")
            >>> # CLIPModel: image-text logits, the target indexes the texts
            >>> clip = CLIPModel.from_pretrained(name).eval()
            >>> ids = tokenizer(["a dog", "a cat"], padding=True,
            ...                 return_tensors="pt").input_ids
            >>> transmm = TransMM(
            ...     lambda px, ids: clip(input_ids=ids, pixel_values=px), model=clip)
            >>> attributions = transmm.attribute(
            ...     images, target=0, additional_forward_args=(ids,))
        """
        attributions, _ = self._attribute(
            inputs, target, additional_forward_args, output
        )
        return attributions

    def gated_layers(self) -> tuple[int, ...]:
        """Blocks whose residual stream :meth:`layer_gates` reads (none for TransMM)."""
        return ()

    def layer_gates(
        self, layer: int, residual: Tensor, residual_grad: Tensor
    ) -> Tensor:
        r"""Per-layer gating step: the weights of the patch columns of :math:`\bar{A}`.

        Called for each block in :meth:`gated_layers` with that block's output
        ``(N, T, d)`` and the gradient of the target logit w.r.t. it; returns gates
        ``(N, n_patches)`` that multiply the patch columns of :math:`\bar{A}^{(\ell)}`
        before the layer's update. TransMM's gates are all 1 (and it asks for
        none: :meth:`gated_layers` is empty); subclasses override this one step
        (see :class:`FeatureGatedTransMM`).
        """
        prefix = self.adapter.num_prefix_tokens
        return residual.new_ones(residual.shape[0], residual.shape[1] - prefix)

    def _attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: object,
        output: str,
    ) -> tuple[Any, dict[int, Tensor]]:
        """The attributions (the form of ``inputs``, a tensor or a tuple, or the
        patch map) and the gates of the gated blocks."""
        check_choice("output", output, OUTPUTS)
        inputs, is_tuple = format_inputs(inputs)
        n_examples = inputs[0].shape[0]
        target = format_target(target, n_examples)
        # one forward pass of the whole batch: the arguments are not split by sample
        args = format_additional_forward_args(additional_forward_args, None)
        images = [i for i, x in enumerate(inputs) if x.dim() == 4]
        if len(images) != 1:
            raise ValueError(
                "`inputs` must hold exactly one image tensor of shape (N, C, H, W), "
                f"got shapes {[tuple(x.shape) for x in inputs]}"
            )
        index = images[0]
        image = inputs[index]
        if not image.is_floating_point():
            raise TypeError(
                "`inputs`: the image tensor must be floating point (TransMM takes "
                f"gradients through the model), got dtype {image.dtype}"
            )
        adapter = self.adapter
        grid = adapter.patch_grid(image.shape[-2], image.shape[-1])
        n_patches = grid[0] * grid[1]
        prefix = adapter.num_prefix_tokens
        if prefix < 1 or n_patches < 1:
            raise ValueError(
                f"TransMM needs a CLS token and at least one patch; the model has "
                f"{prefix} prefix tokens and the image gives a {grid} patch grid"
            )
        layers = list(range(self.start_layer, adapter.num_layers))
        gated = list(self.gated_layers())

        forward_inputs = list(inputs)
        forward_inputs[index] = image.detach().requires_grad_(True)
        with (
            torch.enable_grad(),
            eager_attention(self.model),
            capture(adapter, layers, gated) as captured,
            explained_dtype_errors(inputs, self.model),
        ):
            logits = run_forward(self.forward_func, tuple(forward_inputs), args)
        targets = resolve_target(
            check_model_output(logits, type(self).__name__), target
        )
        missing = [layer for layer in layers if layer not in captured.attention]
        if missing:
            raise RuntimeError(
                f"blocks {missing} did not run in the forward pass of forward_func"
            )
        tokens = captured.attention[layers[0]].shape[-1]
        if tokens != prefix + n_patches:
            raise ValueError(
                f"the attention has {tokens} tokens, but {prefix} prefix tokens and a "
                f"{grid[0]}x{grid[1]} patch grid (patch size {adapter.patch_size}) "
                f"make {prefix + n_patches}; check the image size or the adapter"
            )

        attention = [captured.attention[layer] for layer in layers]
        residual = [captured.residual[layer] for layer in gated]
        grads = self.gradient_func(lambda *_: logits, (*attention, *residual), targets)
        attention_grads, residual_grads = grads[: len(layers)], grads[len(layers) :]

        gates = {
            layer: self.layer_gates(layer, res.detach(), grad)
            for layer, res, grad in zip(gated, residual, residual_grads, strict=True)
        }
        weighted = []
        for layer, probs, grad in zip(layers, attention, attention_grads, strict=True):
            bar = gradient_weighted_attention(probs.detach(), grad)
            if layer in gates:
                bar[:, :, prefix:] *= gates[layer].to(bar).unsqueeze(1)
            weighted.append(bar)
        patch_map = cls_relevance(weighted)[:, prefix:].reshape(-1, *grid)
        patch_map = patch_map.to(image.dtype)

        if output == "patches":
            return patch_map, gates
        pixels = patches_to_pixels(patch_map, adapter.patch_size, image.shape)
        result = tuple(
            pixels if i == index else torch.zeros_like(x) for i, x in enumerate(inputs)
        )
        return (result if is_tuple else result[0]), gates
