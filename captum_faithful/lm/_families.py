"""Built-in language-model adapters: Hugging Face GPT-2, GPT-NeoX (Pythia), Llama,
and TransformerLens ``HookedTransformer``.

A family is recognised by the class name of the model (or of a base class) and the
library the class comes from; neither transformers nor transformer_lens is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import nn

from captum_faithful.lm._adapter import (
    RESID_POST,
    RESID_PRE,
    LMAdapter,
    Site,
    hf_logits,
    plain_logits,
)

#: Hugging Face causal LMs: class name -> (family, embedding path, blocks path).
HF_FAMILIES = {
    "GPT2LMHeadModel": ("Hugging Face GPT-2", "transformer.wte", "transformer.h"),
    "GPTNeoXForCausalLM": (
        "Hugging Face GPT-NeoX (Pythia)",
        "gpt_neox.embed_in",
        "gpt_neox.layers",
    ),
    "LlamaForCausalLM": ("Hugging Face Llama", "model.embed_tokens", "model.layers"),
}
TRANSFORMER_LENS_FAMILY = "TransformerLens HookedTransformer"


def _class_names(module: nn.Module) -> list[str]:
    return [cls.__name__ for cls in type(module).__mro__]


def _from_library(module: nn.Module, library: str) -> bool:
    return any(cls.__module__.split(".")[0] == library for cls in type(module).__mro__)


def hf_adapter(model: nn.Module) -> LMAdapter | None:
    """Adapter for the Hugging Face causal LMs in :data:`HF_FAMILIES`.

    ``blocks.{l}.hook_resid_pre`` is the hidden-states argument of block ``l``
    (positional or keyword), ``blocks.{L-1}.hook_resid_post`` the last block's
    output (before the final norm).
    """
    if not _from_library(model, "transformers"):
        return None
    for name in _class_names(model):
        if name in HF_FAMILIES:
            family, embedding_path, blocks_path = HF_FAMILIES[name]
            return LMAdapter(
                model,
                embedding=model.get_submodule(embedding_path),
                # the blocks' container (an nn.ModuleList in every family above)
                blocks=list(cast(nn.ModuleList, model.get_submodule(blocks_path))),
                family=family,
                logits=hf_logits,
            )
    return None


def hooked_transformer_adapter(model: nn.Module) -> LMAdapter | None:
    """Adapter for TransformerLens ``HookedTransformer``.

    The token embeddings are the output of ``embed`` (positional embeddings are
    added by ``pos_embed`` afterwards); the residual sites are the HookPoints of the
    same names, whose outputs are the residual stream.
    """
    if not (
        _from_library(model, "transformer_lens")
        and "HookedTransformer" in _class_names(model)
    ):
        return None
    blocks = list(cast(nn.ModuleList, model.blocks))
    last = len(blocks) - 1
    sites = {
        RESID_PRE.format(layer): Site(
            RESID_PRE.format(layer), cast(nn.Module, block.hook_resid_pre), "output"
        )
        for layer, block in enumerate(blocks)
    }
    sites[RESID_POST.format(last)] = Site(
        RESID_POST.format(last), cast(nn.Module, blocks[last].hook_resid_post), "output"
    )
    return LMAdapter(
        model,
        embedding=cast(nn.Module, model.embed),
        blocks=blocks,
        family=TRANSFORMER_LENS_FAMILY,
        logits=plain_logits,
        residual_sites=sites,
    )


BUILT_IN: list[tuple[Callable[[nn.Module], bool], Callable]] = [
    (lambda module: True, hf_adapter),
    (lambda module: True, hooked_transformer_adapter),
]

SUPPORTED_FAMILIES = (
    *(family for family, _, _ in HF_FAMILIES.values()),
    TRANSFORMER_LENS_FAMILY,
)
