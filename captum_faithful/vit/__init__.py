"""Vision-Transformer adapters: where attention and residual streams live.

:func:`get_adapter` describes a model for TransMM: its transformer blocks, the
modules that yield post-softmax attention probabilities, the number of prefix tokens
and the patch grid. Built in: Hugging Face ViT, DeiT, CLIP (vision tower and
``CLIPModel``), Dinov2 (with or without registers), timm ``VisionTransformer``, and a
generic search; :func:`register_adapter` adds other families. :func:`eager_attention`
and :func:`capture` are the context managers TransMM runs the model in.
"""

from captum_faithful.vit import _registry
from captum_faithful.vit._adapter import ViTAdapter
from captum_faithful.vit._hooks import Captured, capture, eager_attention
from captum_faithful.vit._registry import get_adapter, register_adapter

#: The model families :func:`get_adapter` describes without help, as readable
#: names (a tuple of str; the error for an unknown model lists them). Models outside
#: them are tried with a generic search for blocks holding an attention module that
#: returns its probabilities; :func:`register_adapter` adds a family.
SUPPORTED_FAMILIES: tuple[str, ...] = _registry.SUPPORTED_FAMILIES

__all__ = [
    "SUPPORTED_FAMILIES",
    "Captured",
    "ViTAdapter",
    "capture",
    "eager_attention",
    "get_adapter",
    "register_adapter",
]
