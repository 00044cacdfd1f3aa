"""What a Vision Transformer looks like to TransMM.

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
