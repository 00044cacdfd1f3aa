"""The registry of Vision-Transformer adapters: user-registered first, then
built-ins, then a generic search.

It lives apart from the adapter class and the built-in families, so that both can
be imported without the other (no import cycle); the language-model adapters of
:mod:`captum_faithful.lm` are registered the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from captum_faithful._utils import check_registration, matches_module
from captum_faithful.vit._adapter import ViTAdapter
from captum_faithful.vit._families import BUILT_IN, SUPPORTED_FAMILIES, generic_adapter

AdapterFactory = Callable[[nn.Module], "ViTAdapter | None"]
_REGISTRY: list[tuple[type | Callable[[nn.Module], bool], AdapterFactory]] = []

__all__ = ["SUPPORTED_FAMILIES", "get_adapter", "register_adapter"]


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
    check_registration(matches, factory, "ViTAdapter")
    _REGISTRY.append((matches, factory))


def get_adapter(model: nn.Module) -> ViTAdapter:
    """The adapter of ``model``: registered adapters, built-ins, then a generic search.

    Raises TypeError, listing the supported families and :func:`register_adapter`,
    when no transformer blocks with attention are found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    for module in model.modules():
        for matches, factory in [*reversed(_REGISTRY), *BUILT_IN]:
            if matches_module(matches, module):
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
