"""Built-in adapters: Hugging Face ViT, DeiT, CLIP, Dinov2; timm; a generic search.

Module paths are discovered, not hard-coded: Hugging Face models name their block
and attention classes in ``_can_record_outputs`` (transformers 5.x); older versions
are found by class names. Neither transformers nor timm is imported here: a model's
family is recognised from its class's module and attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from captum_faithful.vit._adapter import ViTAdapter

HF_FAMILIES = {
    "vit": "Hugging Face ViT",
    "deit": "Hugging Face DeiT",
    "clip": "Hugging Face CLIP",
    "clip_vision_model": "Hugging Face CLIP vision",
    "dinov2": "Hugging Face Dinov2",
    "dinov2_with_registers": "Hugging Face Dinov2 with registers",
}
_ATTENTION_NAMES = ("attn", "attention", "self_attn", "self_attention")


def _from_library(module: nn.Module, library: str) -> bool:
    return type(module).__module__.split(".")[0] == library


def _recorded_class(model: nn.Module, key: str) -> type | None:
    """A class named in ``_can_record_outputs`` (a class or an OutputRecorder)."""
    recorded = (getattr(type(model), "_can_record_outputs", None) or {}).get(key)
    recorded = getattr(recorded, "target_class", recorded)
    return recorded if isinstance(recorded, type) else None


def _attention_by_class(
    block: nn.Module, attention_class: type | None
) -> nn.Module | None:
    submodules = list(block.modules())[1:]
    if attention_class is not None:
        for module in submodules:
            if isinstance(module, attention_class):
                return module
    for suffix in ("SelfAttention", "Attention"):
        for module in submodules:
            if type(module).__name__.endswith(suffix):
                return module
    return None


def _block_lists(root: nn.Module) -> list[list[nn.Module]]:
    """Candidate block lists: ModuleLists/Sequentials of one repeated class."""
    found = []
    for module in root.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            children = list(module)
            if len({type(child) for child in children}) == 1:
                found.append(children)
    return found


def _hf_prefix_tokens(tower: nn.Module) -> int:
    """CLS (``cls_token``/``class_embedding``), distillation and register tokens."""
    embeddings = next(
        (
            module
            for module in tower.modules()
            if any(hasattr(module, n) for n in ("cls_token", "class_embedding"))
        ),
        None,
    )
    if embeddings is None:
        return 1
    count = 0
    for name in ("cls_token", "class_embedding"):
        if isinstance(getattr(embeddings, name, None), Tensor):
            count += 1
            break
    if isinstance(getattr(embeddings, "distillation_token", None), Tensor):
        count += 1
    registers = getattr(embeddings, "register_tokens", None)
    if isinstance(registers, Tensor):
        count += registers.shape[1]
    return count


def hf_adapter(model: nn.Module) -> ViTAdapter | None:
    """Adapter for the Hugging Face families in :data:`HF_FAMILIES`."""
    if not _from_library(model, "transformers"):
        return None
    # a Hugging Face config: an untyped attribute bag
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = HF_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        return None
    tower = getattr(model, "vision_model", model)
    vision_config: Any = getattr(config, "vision_config", config)
    layer_class = _recorded_class(model, "hidden_states")
    attention_class = _recorded_class(model, "attentions")
    blocks = None
    for children in _block_lists(tower):
        if layer_class is None or isinstance(children[0], layer_class):
            found = [_attention_by_class(b, attention_class) for b in children]
            attentions = [a for a in found if a is not None]
            if len(attentions) == len(found):
                blocks = children
                break
    if blocks is None:
        return None
    return ViTAdapter(
        model,
        blocks=blocks,
        attention_modules=attentions,
        num_prefix_tokens=_hf_prefix_tokens(tower),
        patch_size=vision_config.patch_size,
        hidden_size=vision_config.hidden_size,
        family=family,
    )


def timm_adapter(model: nn.Module) -> ViTAdapter | None:
    """Adapter for timm ``VisionTransformer`` (and models built like it).

    The probabilities are the output of each block's ``attn.attn_drop``, the tensor
    the eager path multiplies with the values.
    """
    if not _from_library(model, "timm") or not all(
        hasattr(model, name) for name in ("blocks", "patch_embed", "num_prefix_tokens")
    ):
        return None
    # a timm model: its attributes (checked above) are untyped for nn.Module
    timm_model: Any = model
    blocks = list(timm_model.blocks)
    found = [getattr(getattr(b, "attn", None), "attn_drop", None) for b in blocks]
    dropouts = [d for d in found if d is not None]
    if not blocks or len(dropouts) < len(found):
        return None
    return ViTAdapter(
        model,
        blocks=blocks,
        attention_modules=dropouts,
        num_prefix_tokens=timm_model.num_prefix_tokens,
        patch_size=tuple(timm_model.patch_embed.patch_size),
        hidden_size=getattr(model, "embed_dim", None),
        family="timm VisionTransformer",
        pads_image=bool(getattr(timm_model.patch_embed, "dynamic_img_pad", False)),
    )


def _named_attention(block: nn.Module) -> nn.Module | None:
    for name in _ATTENTION_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    return _attention_by_class(block, None)


def generic_adapter(model: nn.Module) -> ViTAdapter | None:
    """Fallback: the longest list of identical blocks that each hold an attention.

    The attention module must return its probabilities (a square 4-D tensor) in its
    output; the patch size is the stride of the first ``Conv2d``, the prefix length
    ``model.num_prefix_tokens`` or the number of class/distillation/register token
    parameters, the hidden size the width of the blocks' first LayerNorm.
    """
    best: tuple[list[nn.Module], list[nn.Module]] | None = None
    for children in _block_lists(model):
        found = [_named_attention(child) for child in children]
        attentions = [a for a in found if a is not None]
        if len(attentions) == len(found) and (
            best is None or len(children) > len(best[0])
        ):
            best = (children, attentions)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if best is None or not convs:
        return None
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(prefix, int):
        prefix = 0
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in (
                "cls_token",
                "class_embedding",
                "dist_token",
                "distillation_token",
            ):
                prefix += 1
            elif leaf in ("reg_token", "register_tokens") and param.dim() >= 2:
                prefix += param.shape[-2]
    norms = [m for m in best[0][0].modules() if isinstance(m, nn.LayerNorm)]
    return ViTAdapter(
        model,
        blocks=best[0],
        attention_modules=best[1],
        num_prefix_tokens=prefix,
        patch_size=(convs[0].stride[0], convs[0].stride[1]),  # Conv2d: a pair
        hidden_size=norms[0].normalized_shape[-1] if norms else None,
        family="generic",
    )


BUILT_IN: list[
    tuple[Callable[[nn.Module], bool], Callable[[nn.Module], ViTAdapter | None]]
] = [
    (lambda m: _from_library(m, "transformers"), hf_adapter),
    (lambda m: _from_library(m, "timm"), timm_adapter),
]

#: The families the built-in adapters describe, as readable names.
SUPPORTED_FAMILIES = (
    "Hugging Face ViT (ViTModel, ViTForImageClassification)",
    "Hugging Face DeiT (incl. the distillation token)",
    "Hugging Face CLIP (CLIPVisionModel, CLIPModel image-text logits)",
    "Hugging Face Dinov2 (incl. Dinov2 with registers)",
    "timm VisionTransformer",
)
