"""Context managers that change a model for one call and always change it back.

:func:`eager_attention` switches fused attention kernels (PyTorch SDPA, flash
attention, timm ``fused_attn``) to the eager path, which materialises the attention
probabilities. :func:`capture` records attention probabilities and block outputs
with forward hooks. Both restore the model on exit, also when the call raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from captum_faithful.vit._adapter import ViTAdapter

_ATTN_KEYS = ("_attn_implementation_internal", "_attn_implementation")


def _hf_configs(model: nn.Module) -> list[Any]:
    """Every Hugging Face config reachable from the model, sub-configs included."""
    found: dict[int, Any] = {}
    pending = [
        module.config
        for module in model.modules()
        if hasattr(getattr(module, "config", None), "to_dict")
    ]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                pending.append(sub)
    return list(found.values())


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with eager attention inside the block, restore it afterwards.

    Sets every Hugging Face config's attention implementation to ``"eager"`` (the
    raw attribute, so no sub-config is rewritten as a side effect) and every
    ``fused_attn`` flag (timm) to False; the previous values come back on exit.
    """
    saved: list[tuple[Any, str, Any]] = []
    try:
        for module in model.modules():
            if isinstance(getattr(module, "fused_attn", None), bool):
                saved.append((module, "fused_attn", module.fused_attn))
                # a timm flag; nn.Module.__setattr__ is typed for tensors and
                # modules only
                module.fused_attn = False  # type: ignore[assignment]
        for config in _hf_configs(model):
            for key in _ATTN_KEYS:
                if key in vars(config):
                    saved.append((config, key, vars(config)[key]))
                    vars(config)[key] = "eager"
                    break
        yield model
    finally:
        for owner, key, value in reversed(saved):
            if isinstance(owner, nn.Module):
                setattr(owner, key, value)
            else:
                vars(owner)[key] = value


@dataclass
class Captured:
    """Tensors recorded during one forward pass, keyed by block index.

    Both keep the tensors with their autograd graph.

    Attributes:
        attention (dict[int, Tensor]): ``{0-based block index: (N, heads, T, T)}``,
                    the post-softmax attention probabilities of the blocks asked
                    for (``blocks.{l}.attn.hook_pattern``).
        residual (dict[int, Tensor]): ``{0-based block index: (N, T, d)}``, the
                    outputs of the blocks asked for (``blocks.{l}.hook_resid_post``).
    """

    attention: dict[int, Tensor] = field(default_factory=dict)
    residual: dict[int, Tensor] = field(default_factory=dict)


@contextmanager
def capture(
    adapter: ViTAdapter,
    attention_layers: Iterable[int],
    residual_layers: Iterable[int] = (),
) -> Iterator[Captured]:
    """Record attention probabilities and block outputs (with their graph).

    Yields a :class:`Captured` that the forward pass fills:
    ``attention[l]`` is ``blocks.{l}.attn.hook_pattern`` ``(N, heads, T, T)`` and
    ``residual[l]`` is ``blocks.{l}.hook_resid_post`` ``(N, T, d)``. The hooks are
    removed on exit, also when the forward pass raises.
    """
    store = Captured()
    handles = []

    def keep(kind: str, layer: int, value: Tensor | None) -> None:
        target = getattr(store, kind)
        if layer in target:
            raise RuntimeError(
                f"block {layer} ran twice in one forward pass; TransMM needs each "
                "transformer block to run once per call"
            )
        if value is None:
            raise RuntimeError(
                f"the attention module of block {layer} "
                f"({type(adapter.attention_modules[layer]).__name__}) returned no "
                "attention probabilities; make it return them (transformers 4.x: "
                "a forward_func that calls the model with output_attentions=True) "
                "or register an adapter whose `probabilities` finds them"
            )
        target[layer] = value

    def attention_hook(layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            keep("attention", layer, adapter.probabilities(output))

        return hook

    def residual_hook(layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            keep("residual", layer, adapter.residual(output))

        return hook

    try:
        for layer in attention_layers:
            handles.append(
                adapter.attention_modules[layer].register_forward_hook(
                    attention_hook(layer)
                )
            )
        for layer in residual_layers:
            handles.append(
                adapter.blocks[layer].register_forward_hook(residual_hook(layer))
            )
        yield store
    finally:
        for handle in handles:
            handle.remove()
