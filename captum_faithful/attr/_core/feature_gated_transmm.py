"""Feature-Gradient gating of TransMM with SAE features (thesis ch. 6, Algorithm 6.1)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import non_finite_rows
from captum_faithful._compat import TargetType, TensorOrTupleOfTensorsGeneric
from captum_faithful._utils import check_choice, check_float, check_int
from captum_faithful.attr._core.transmm import TransMM
from captum_faithful.sae import load_sae, sae_d_in, sae_hook_name

VARIANTS = ("combined", "activation", "gradient")
MAD_SCALE = 1.4826
EPSILON = 1e-8
SPARSE_DENSITY = 0.05


def feature_scores(
    sae: Any,
    residual: Tensor,
    gradient: Tensor,
    variant: str = "combined",
    permutation: Tensor | None = None,
) -> Tensor:
    r"""Per-token feature-gradient scores (thesis eq. 6.4–6.6).

    With :math:`f_t` = ``sae.encode(x_t)`` and :math:`\nabla f_t = W_{dec} g_t`
    (sae-lens stores :math:`W_{dec}` as ``d_sae × d_in``):

    .. math::
        s^{combined}_t = \sum_k f_{t,k} \nabla f_{t,k}, \quad
        s^{activation}_t = \sum_k f_{t,k}, \quad
        s^{gradient}_t = \sum_k |\nabla f_{t,k}|

    Args:
        sae (SAE): Anything with ``encode`` and ``W_dec``.
        residual (Tensor): Residual stream at the patch tokens ``(N, P, d_in)``.
        gradient (Tensor): Gradient of the target logit w.r.t. ``residual``.
        variant (str, optional): ``"combined"``, ``"activation"`` or ``"gradient"``.
                    Default: ``"combined"``
        permutation (Tensor, optional): Row permutation of :math:`W_{dec}` (the
                    shuffled-decoder control): :math:`\nabla f` is computed with
                    ``W_dec[permutation]``. Only ``"combined"`` depends on it (the
                    other two scores are invariant to the feature order).
                    Default: None

    Returns:
        Tensor ``(N, P)`` in float32, on the device of ``residual``.
    """
    decoder = sae.W_dec.detach()
    x = residual.detach().to(device=decoder.device, dtype=decoder.dtype)
    g = gradient.detach().to(device=decoder.device, dtype=decoder.dtype)
    if variant == "gradient":
        scores = (g @ decoder.T).abs().sum(dim=-1)
    else:
        with torch.no_grad():
            features = sae.encode(x)
        if features.is_sparse:
            features = features.to_dense()
        features = features.to(decoder.dtype)
        if variant == "activation":
            scores = features.sum(dim=-1)
        else:
            # sum_k f_k (W[perm] g)_k = g . (f @ W[perm]): one reconstruction-sized
            # product instead of the (tokens x d_sae) feature gradients.
            if permutation is not None:
                decoder = decoder[permutation.to(decoder.device)]
            scores = (_features_times_decoder(features, decoder) * g).sum(dim=-1)
    return scores.float().to(residual.device)


def _features_times_decoder(features: Tensor, decoder: Tensor) -> Tensor:
    """``features @ decoder``, as a sparse product when few features are active.

    Trained SAEs activate a few dozen to a few hundred of thousands of features per
    token; below :data:`SPARSE_DENSITY` the sparse product is several times faster.
    """
    flat = features.reshape(-1, features.shape[-1])
    sparse_ok = flat.dtype in (torch.float32, torch.float64)
    if sparse_ok and flat.count_nonzero() <= SPARSE_DENSITY * flat.numel():
        product = torch.sparse.mm(flat.to_sparse(), decoder)
    else:
        product = flat @ decoder
    return product.reshape(*features.shape[:-1], decoder.shape[-1])


def robust_normalize(scores: Tensor) -> Tensor:
    r"""Median/MAD normalisation over the last dimension (thesis eq. 6.7).

    .. math::
        \hat{s}_t = \frac{s_t - \operatorname{median}(s)}
        {1.4826 \cdot \operatorname{median}(|s - \operatorname{median}(s)|) + 10^{-8}}

    Both medians are taken as the thesis's published code takes them, with
    ``torch.median``: for an even number of values (a ViT-B/16 at 224 pixels has 196
    patch tokens) that is the *lower* of the two middle values, not their mean, so
    the gates reproduce the thesis's numbers.
    """
    median = scores.median(dim=-1, keepdim=True).values
    mad = (scores - median).abs().median(dim=-1, keepdim=True).values
    return (scores - median) / (MAD_SCALE * mad + EPSILON)


def feature_gates(scores: Tensor, kappa: float, c_max: float) -> Tensor:
    r"""Multiplicative gates in :math:`[1/c_{max}, c_{max}]` (thesis eq. 6.8).

    .. math::
        w_t = \exp\big(\log(c_{max}) \tanh(\kappa \hat{s}_t)\big)

    with :math:`\hat{s}` from :func:`robust_normalize` over the patch tokens of each
    sample. ``c_max = 1`` gives gates that are exactly 1.
    """
    return torch.exp(math.log(c_max) * torch.tanh(kappa * robust_normalize(scores)))


class FeatureGatedTransMM(TransMM):
    r"""TransMM whose attention columns are gated by SAE feature-gradient scores.

    At each block :math:`\ell` that has an SAE, the residual stream :math:`x_t` (the
    block's output at patch token :math:`t`) is decomposed into SAE features
    :math:`f_t`, and the gradient :math:`g_t = \partial y_t / \partial x_t` is
    projected onto the decoder, :math:`\nabla f_t = W_{dec} g_t`. Features that are
    both active and aligned with the target give a patch a high score; scores are
    normalised over the patches of the image with median and MAD (each median the
    lower middle value for an even number of patches, as ``torch.median`` and the
    thesis's code take it) and mapped to gates that scale the patch columns of TransMM's :math:`\bar{A}^{(\ell)}` before
    that layer's update. Everything else is TransMM: this class only overrides its
    per-layer gating step, :meth:`layer_gates`.

    .. math::
        s_t = \sum_k f_{t,k} (W_{dec} g_t)_k, \quad
        \hat{s} = \frac{s - \operatorname{med}(s)}{1.4826\,\mathrm{MAD}(s) + 10^{-8}},
        \quad w_t = \exp(\log c_{max} \tanh(\kappa \hat{s}_t))

    .. math::
        \bar{A}^{(\ell)}_{gated} = \bar{A}^{(\ell)}
        \operatorname{diag}(1_{prefix}, w), \qquad
        R \leftarrow R + \bar{A}^{(\ell)}_{gated} R

    With ``c_max=1`` every gate is 1 and the result equals :class:`TransMM`.

    The thesis chooses the gated blocks, κ, c_max and the variant per model and
    dataset on validation images, then scores held-out images once;
    :func:`captum_faithful.select_gating` runs that choice.

    Cost on top of TransMM: one ``sae.encode`` of the patch tokens per gated block
    (for large SAEs, e.g. 64× expansion on ViT-B, this dominates) and one
    reconstruction-sized product :math:`f W_{dec}`, sparse when fewer than 5% of
    the features are active; the ``"gradient"`` variant needs the dense
    :math:`W_{dec} g` instead. The forward and backward passes are TransMM's.
    """

    #: The score variants ``variant`` takes, the default first (a tuple of str):
    #: ``"combined"``, ``"activation"``, ``"gradient"``.
    VARIANTS: tuple[str, ...] = VARIANTS

    def __init__(
        self,
        forward_func: Callable,
        saes: Mapping[int, Any],
        model: nn.Module | None = None,
        kappa: float = 0.5,
        c_max: float = 10.0,
        variant: str = "combined",
        start_layer: int = 0,
        shuffle_decoder: int | None = None,
    ) -> None:
        r"""
        Args:
            forward_func (Callable): The model or a function returning logits.
            saes (Mapping[int, SAE | str | tuple[str, str]]): ``{block index (0-based):
                        SAE}``; each value is an SAE, a folder or a ``(release,
                        sae_id)``, loaded with :func:`captum_faithful.load_sae`. Each
                        SAE's ``cfg.d_in`` must equal the model's hidden size, and an
                        SAE whose ``hook_name`` names a block
                        (``blocks.{l}.hook_resid_post``) must be attached to that block.
            model (nn.Module, optional): The Vision Transformer.
                        Default: ``forward_func`` when it is a module.
            kappa (float, optional): Gate temperature :math:`\kappa > 0`. Default: 0.5
            c_max (float, optional): Largest gate, :math:`c_{max} \ge 1`; gates lie in
                        :math:`[1/c_{max}, c_{max}]`. Default: 10.0
            variant (str, optional): Score: ``"combined"`` (:math:`\sum_k f \nabla f`),
                        ``"activation"`` (:math:`\sum_k f`) or ``"gradient"``
                        (:math:`\sum_k |\nabla f|`). Default: ``"combined"``
            start_layer (int, optional): First block of the rollout. Default: 0
            shuffle_decoder (int, optional): Seed of the shuffled-decoder control: the
                        rows of each :math:`W_{dec}` (the feature order) are permuted
                        with a generator seeded with this value, breaking the pairing of
                        :math:`f` and :math:`\nabla f`. Only ``"combined"`` depends on
                        the feature order (the other variants warn that the control is
                        theirs unchanged). The SAEs themselves are not modified.
                        Default: None (no shuffling)
        """
        self.kappa = check_float("kappa", kappa, low=0.0, low_inclusive=False)
        if math.isinf(self.kappa):
            raise ValueError("`kappa` must be finite")
        self.c_max = check_float("c_max", c_max, low=1.0)
        if math.isinf(self.c_max):
            raise ValueError("`c_max` must be finite")
        self.variant = check_choice("variant", variant, VARIANTS)
        if shuffle_decoder is not None:
            check_int("shuffle_decoder", shuffle_decoder)
            if self.variant != "combined":
                warnings.warn(
                    f"`shuffle_decoder` has no effect with variant={self.variant!r}: "
                    "only the 'combined' score pairs each feature with its decoder "
                    "row, so this control computes exactly what the unshuffled "
                    "explainer computes. Run the control with variant='combined'.",
                    UserWarning,
                    stacklevel=2,
                )
        if not isinstance(saes, Mapping) or len(saes) == 0:
            raise TypeError(
                "`saes` must be a non-empty mapping {block index: SAE, folder or "
                f"(release, sae_id)}}, got {type(saes).__name__}"
            )
        for layer in saes:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise TypeError(
                    f"`saes` keys must be block indices (int), got {layer!r}"
                )
        super().__init__(forward_func, model, start_layer)
        n_layers = self.adapter.num_layers
        for layer in saes:
            if not self.start_layer <= layer < n_layers:
                raise ValueError(
                    f"`saes` block index {layer} out of range: the model has "
                    f"{n_layers} blocks (0-based) and start_layer={self.start_layer}"
                )
        self.saes = {int(layer): load_sae(source) for layer, source in saes.items()}
        for layer, sae in self.saes.items():
            self._check_sae(layer, sae)
        self.shuffle_decoder = shuffle_decoder
        self.permutations: dict[int, Tensor] = {}
        if shuffle_decoder is not None:
            generator = torch.Generator().manual_seed(int(shuffle_decoder))
            for layer in sorted(self.saes):
                d_sae = self.saes[layer].W_dec.shape[0]
                self.permutations[layer] = torch.randperm(d_sae, generator=generator)

    def _check_sae(self, layer: int, sae: Any) -> None:
        hidden = self.adapter.hidden_size
        d_in = sae_d_in(sae)
        if sae.W_dec.dim() != 2 or sae.W_dec.shape[1] != d_in:
            raise ValueError(
                f"the SAE for block {layer} must have W_dec of shape (d_sae, d_in="
                f"{d_in}), got {tuple(sae.W_dec.shape)}"
            )
        if hidden is not None and d_in != hidden:
            raise ValueError(
                f"the SAE for block {layer} has d_in={d_in}, but the model's residual "
                f"stream has width {hidden}"
            )
        tensors = (
            dict(sae.named_parameters())
            if isinstance(sae, nn.Module)
            else {
                name: getattr(sae, name)
                for name in ("W_enc", "b_enc", "W_dec", "b_dec")
                if isinstance(getattr(sae, name, None), Tensor)
            }
        )
        broken = [
            name
            for name, tensor in tensors.items()
            if tensor.numel() and bool(non_finite_rows(tensor.reshape(1, -1)).any())
        ]
        if broken:
            raise ValueError(
                f"`saes[{layer}]`: the SAE for block {layer} holds NaN or Inf in "
                f"{broken}, which would make every gate and attribution NaN; load "
                "a trained SAE (its weights are finite)"
            )
        hook_name = sae_hook_name(sae)
        if hook_name is not None:
            hooked = self.adapter.layer_of_hook(hook_name)
            if hooked is not None and hooked != layer:
                raise ValueError(
                    f"the SAE attached to block {layer} was trained on {hook_name!r} "
                    f"(the output of block {hooked}); attach it to block {hooked}"
                )

    def gated_layers(self) -> tuple[int, ...]:
        """The blocks that have an SAE."""
        return tuple(sorted(self.saes))

    def layer_gates(
        self, layer: int, residual: Tensor, residual_grad: Tensor
    ) -> Tensor:
        """Feature-gradient gates ``(N, n_patches)`` of one block."""
        prefix = self.adapter.num_prefix_tokens
        if residual.shape[-1] != sae_d_in(self.saes[layer]):
            raise ValueError(
                f"block {layer} outputs width {residual.shape[-1]}, but its SAE has "
                f"d_in={sae_d_in(self.saes[layer])}"
            )
        scores = feature_scores(
            self.saes[layer],
            residual[:, prefix:],
            residual_grad[:, prefix:],
            self.variant,
            self.permutations.get(layer),
        )
        return feature_gates(scores, self.kappa, self.c_max)

    # The attributions alone, or with the gates when return_gates is True (as
    # Captum's overloads on return_convergence_delta). The overloads are
    # undecorated: log_usage is untyped and would hide them from type checkers.
    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: object = None,
        output: str = "input",
        *,
        return_gates: Literal[True],
    ) -> tuple[TensorOrTupleOfTensorsGeneric | Tensor, dict[int, Tensor]]: ...

    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: object = None,
        output: str = "input",
        return_gates: Literal[False] = False,
    ) -> TensorOrTupleOfTensorsGeneric | Tensor: ...

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: object = None,
        output: str = "input",
        return_gates: bool = False,
    ) -> (
        TensorOrTupleOfTensorsGeneric
        | Tensor
        | tuple[TensorOrTupleOfTensorsGeneric | Tensor, dict[int, Tensor]]
    ):
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): Images ``(N, C, H, W)``; as in
                        :meth:`TransMM.attribute`.
            target (int, tuple, Tensor or list, optional): Output index per sample.
                        ``None`` explains the predicted class (argmax of the output).
                        Default: None
            additional_forward_args (Any, optional): Passed to ``forward_func`` after
                        the inputs. Default: None
            output (str, optional): ``"input"`` (the input's shape) or ``"patches"``
                        (``(N, grid_h, grid_w)``). Default: ``"input"``
            return_gates (bool, optional): Also return ``{block: gates (N,
                        n_patches)}``. Default: False

        Returns:
            **attributions** as in :meth:`TransMM.attribute`, and with
            ``return_gates=True`` the tuple ``(attributions, gates)``.

        Examples::

            >>> saes = {3: load_sae("sae_l3"), 6: load_sae("sae_l6")}
            >>> explainer = FeatureGatedTransMM(model, saes)
            >>> attributions = explainer.attribute(images)
            >>> control = FeatureGatedTransMM(model, saes, shuffle_decoder=0)
            >>> patches, gates = explainer.attribute(
            ...     images, output="patches", return_gates=True)
        """
        if not isinstance(return_gates, bool):
            raise TypeError(f"`return_gates` must be a bool, got {return_gates!r}")
        attributions, gates = self._attribute(
            inputs, target, additional_forward_args, output
        )
        return (attributions, gates) if return_gates else attributions
