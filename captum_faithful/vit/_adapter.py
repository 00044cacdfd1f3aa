"""What a Vision Transformer looks like to TransMM, and the registry of adapters.

A :class:`ViTAdapter` says where the transformer blocks of a model are, which module
of each block yields the post-softmax attention probabilities, how many prefix tokens
(CLS, distillation, registers) precede the patch tokens, and the patch size. Places in
the model are named like TransformerLens / SAELens (``blocks.{l}.hook_resid_post``,
``blocks.{l}.attn.hook_pattern``), so that an SAE's ``hook_name`` can be matched to a
block.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from captum_faithful._utils import first_tensor

SUPPORTED_FAMILIES = (
    "Hugging Face ViT (ViTModel, ViTForImageClassification)",
    "Hugging Face DeiT (incl. the distillation token)",
    "Hugging Face CLIP (CLIPVisionModel, CLIPModel image-text logits)",
    "Hugging Face Dinov2 (incl. Dinov2 with registers)",
    "timm VisionTransformer",
)

_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def first_attention_probabilities(output: Any) -> Tensor | None:
    """The first 4-D tensor ``(N, heads, T, T)`` in an attention module's output."""
    candidates = output if isinstance(output, (tuple, list)) else (output,)
    for item in candidates:
        if (
            isinstance(item, Tensor)
            and item.dim() == 4
            and item.shape[-1] == item.shape[-2]
        ):
            return item
    return None


class ViTAdapter:
    r"""Where attention probabilities and residual streams live in one ViT.

    Built-in adapters are found by :func:`get_adapter`; for another model family build
    one by hand and make it discoverable with :func:`register_adapter`.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        attention_modules: Sequence[nn.Module],
        num_prefix_tokens: int,
        patch_size: int | tuple[int, int],
        hidden_size: int | None = None,
        family: str = "custom",
        probabilities: Callable[[Any], Tensor | None] = first_attention_probabilities,
        residual: Callable[[Any], Tensor] = first_tensor,
        pads_image: bool = False,
    ) -> None:
        """
        Args:
            model (nn.Module): The model the adapter describes.
            blocks (Sequence[nn.Module]): The transformer blocks in forward order. The
                        output of block ``l`` at the patch tokens is the residual stream
                        ``blocks.{l}.hook_resid_post``.
            attention_modules (Sequence[nn.Module]): One module per block whose forward
                        output holds the post-softmax attention probabilities
                        ``(N, heads, T, T)`` that the block multiplies with the values.
            num_prefix_tokens (int): Tokens before the patch tokens (CLS first, then
                        distillation or register tokens). TransMM reads the CLS row.
            patch_size (int or tuple[int, int]): Patch height and width in pixels.
            hidden_size (int, optional): Width of the residual stream (checked
                        against an SAE's ``d_in``). Default: None (not checked).
            family (str, optional): Human-readable name of the model family.
                        Default: ``"custom"``
            probabilities (Callable, optional): Extracts the probabilities from an
                        attention module's output. Default: the first square 4-D tensor.
            residual (Callable, optional): Extracts the hidden states from a block's
                        output. Default: the output, or its first element for tuples.
            pads_image (bool, optional): Whether the patch embedding pads images whose
                        size is not a multiple of the patch size (grid rounds up)
                        instead of cropping them (grid rounds down). Default: False
        """
        if len(blocks) == 0 or len(blocks) != len(attention_modules):
            raise ValueError(
                "`blocks` and `attention_modules` must be non-empty and of equal "
                f"length, got {len(blocks)} and {len(attention_modules)}"
            )
        if isinstance(patch_size, int):
            patch_size = (patch_size, patch_size)
        self.model = model
        self.blocks = list(blocks)
        self.attention_modules = list(attention_modules)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.hidden_size = None if hidden_size is None else int(hidden_size)
        self.family = family
        self.probabilities = probabilities
        self.residual = residual
        self.pads_image = pads_image

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(grid_h, grid_w)`` of an image of ``height`` × ``width``."""
        ph, pw = self.patch_size
        if self.pads_image:
            return math.ceil(height / ph), math.ceil(width / pw)
        return height // ph, width // pw

    def hook_name(self, layer: int, site: str = "hook_resid_post") -> str:
        """TransformerLens-style name of a place, e.g. ``blocks.3.hook_resid_post``."""
        return f"blocks.{layer}.{site}"

    def layer_of_hook(self, hook_name: str) -> int | None:
        """Block whose output is the residual stream named by ``hook_name``.

        ``blocks.{l}.hook_resid_post`` is the output of block ``l`` and
        ``blocks.{l}.hook_resid_pre`` the output of block ``l - 1``. Returns None for
        names that do not follow the TransformerLens scheme; raises ValueError for a
        TransformerLens name of another place (an SAE trained there does not read
        the residual stream between blocks).
        """
        match = _HOOK_NAME.match(hook_name)
        if match is None:
            return None
        layer, site = int(match.group(1)), match.group(2)
        if site == "hook_resid_post":
            return layer
        if site == "hook_resid_pre":
            return layer - 1
        raise ValueError(
            f"hook_name {hook_name!r} is not a residual stream between blocks; "
            "FeatureGatedTransMM needs SAEs trained on 'blocks.{l}.hook_resid_post' "
            "(the output of block l)"
        )

    def __repr__(self) -> str:
        return (
            f"ViTAdapter(family={self.family!r}, num_layers={self.num_layers}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, patch_size={self.patch_size}, "
            f"hidden_size={self.hidden_size})"
        )


AdapterFactory = Callable[[nn.Module], "ViTAdapter | None"]
_REGISTRY: list[tuple[type | Callable[[nn.Module], bool], AdapterFactory]] = []


def register_adapter(
    matches: type | Callable[[nn.Module], bool], factory: AdapterFactory
) -> None:
    r"""Teach TransMM a new model family.

    Args:
        matches (type or Callable): A module class (instances and subclasses match)
                    or a predicate ``module -> bool``.
        factory (Callable): ``module -> ViTAdapter`` for a matching module.

    Adapters registered later take precedence over earlier ones and over the
    built-in adapters. The model given to TransMM and each of its submodules (in
    ``modules()`` order) are tried, so a registered family is also found inside a
    wrapper (e.g. ``nn.Sequential(normalize, vit)``).

    Examples::

        >>> from captum_faithful.vit import ViTAdapter, register_adapter
        >>> register_adapter(MyViT, lambda m: ViTAdapter(
        ...     m, blocks=m.blocks, attention_modules=[b.attn for b in m.blocks],
        ...     num_prefix_tokens=1, patch_size=16, hidden_size=m.dim))
    """
    if not (isinstance(matches, type) or callable(matches)):
        raise TypeError(
            "`matches` must be a module class or a predicate module -> bool"
        )
    if not callable(factory):
        raise TypeError("`factory` must be a callable module -> ViTAdapter")
    _REGISTRY.append((matches, factory))


def _matches(matches: type | Callable[[nn.Module], bool], module: nn.Module) -> bool:
    if isinstance(matches, type):
        return isinstance(module, matches)
    return bool(matches(module))


def get_adapter(model: nn.Module) -> ViTAdapter:
    """The adapter of ``model``: registered adapters, built-ins, then a generic search.

    Raises TypeError, listing the supported families and :func:`register_adapter`,
    when no transformer blocks with attention are found.
    """
    from captum_faithful.vit._families import BUILT_IN, generic_adapter

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    for module in model.modules():
        for matches, factory in [*reversed(_REGISTRY), *BUILT_IN]:
            if _matches(matches, module):
                adapter = factory(module)
                if adapter is not None:
                    return adapter
    adapter = generic_adapter(model)
    if adapter is not None:
        return adapter
    raise TypeError(
        f"TransMM cannot find the transformer blocks of {type(model).__name__}. "
        f"Supported families: {'; '.join(SUPPORTED_FAMILIES)}; and models whose "
        "blocks hold an attention module returning its probabilities. For another "
        "family, describe it with captum_faithful.vit.ViTAdapter and "
        "captum_faithful.vit.register_adapter."
    )
