"""Vision-Transformer adapters: where attention and residual streams live.

:func:`get_adapter` describes a model for TransMM: its transformer blocks, the
modules that yield post-softmax attention probabilities, the number of prefix tokens
and the patch grid. Built in: Hugging Face ViT, DeiT, CLIP (vision tower and
``CLIPModel``), Dinov2 (with or without registers), timm ``VisionTransformer``, and a
generic search; :func:`register_adapter` adds other families. :func:`eager_attention`
and :func:`capture` are the context managers TransMM runs the model in.
"""

from captum_faithful.vit._adapter import (
    SUPPORTED_FAMILIES,
    ViTAdapter,
    get_adapter,
    register_adapter,
)
from captum_faithful.vit._hooks import Captured, capture, eager_attention

__all__ = [
    "SUPPORTED_FAMILIES",
    "Captured",
    "ViTAdapter",
    "capture",
    "eager_attention",
    "get_adapter",
    "register_adapter",
]
