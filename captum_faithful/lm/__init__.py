"""Language-model adapters: where token embeddings and residual streams live.

:func:`get_adapter` describes a decoder-only language model for activation and
attribution patching: its token-embedding module, its blocks, how to run it to
logits, and its sites (``blocks.{l}.hook_resid_pre``, ``blocks.{L-1}.hook_resid_post``
and any submodule by name). Built in: Hugging Face GPT-2, GPT-NeoX (Pythia), Llama
and TransformerLens ``HookedTransformer``; :func:`register_adapter` adds other
families.
"""

from captum_faithful.lm import _registry
from captum_faithful.lm._adapter import LMAdapter, Site
from captum_faithful.lm._registry import get_adapter, register_adapter

#: The language-model families :func:`get_adapter` describes without help, as
#: readable names (a tuple of str; the error for an unknown model lists them).
#: :func:`register_adapter` adds a family.
SUPPORTED_FAMILIES: tuple[str, ...] = _registry.SUPPORTED_FAMILIES

__all__ = [
    "SUPPORTED_FAMILIES",
    "LMAdapter",
    "Site",
    "get_adapter",
    "register_adapter",
]
