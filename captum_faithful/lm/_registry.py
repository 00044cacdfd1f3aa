"""The registry of language-model adapters: user-registered first, then built-ins.

It lives apart from the adapter class and the built-in families, so that both can
be imported without the other (no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from captum_faithful._utils import check_registration, matches_module
from captum_faithful.lm._adapter import LMAdapter
from captum_faithful.lm._families import BUILT_IN, SUPPORTED_FAMILIES

AdapterFactory = Callable[[nn.Module], "LMAdapter | None"]
_REGISTRY: list[tuple[type | Callable[[nn.Module], bool], AdapterFactory]] = []

__all__ = ["SUPPORTED_FAMILIES", "get_adapter", "register_adapter"]


def register_adapter(
    matches: type | Callable[[nn.Module], bool], factory: AdapterFactory
) -> None:
    r"""Teach attribution and activation patching a new language-model family.

    Adapters registered later take precedence over earlier ones and over the
    built-in adapters. Only the model itself is matched (not its submodules): the
    adapter must run the whole model to logits.

    Args:
        matches (type or Callable): A module class (instances and subclasses match)
                    or a predicate ``module -> bool``.
        factory (Callable): ``module -> LMAdapter`` for a matching module (None
                    passes it on to the next adapter).

    Examples::

        >>> from captum_faithful.lm import LMAdapter, register_adapter
        >>> register_adapter(MyLM, lambda m: LMAdapter(
        ...     m, embedding=m.tok_emb, blocks=m.blocks, family="MyLM"))
    """
    check_registration(matches, factory, "LMAdapter")
    _REGISTRY.append((matches, factory))


def get_adapter(model: nn.Module) -> LMAdapter:
    """The adapter of ``model``: registered adapters (latest first), then built-ins.

    Raises TypeError, listing the supported families and how to register another,
    when none describes the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    for matches, factory in [*reversed(_REGISTRY), *BUILT_IN]:
        if matches_module(matches, model):
            adapter = factory(model)
            if adapter is not None:
                if not isinstance(adapter, LMAdapter):
                    raise TypeError(
                        "an adapter factory must return an LMAdapter or None, got "
                        f"{type(adapter).__name__}"
                    )
                return adapter
    raise TypeError(
        f"`model`: no language-model adapter describes {type(model).__name__}. "
        f"Supported families: {'; '.join(SUPPORTED_FAMILIES)}. For another "
        "family, describe it with captum_faithful.lm.LMAdapter (its token-embedding "
        "module, its blocks and how to run it to logits) and make it known with "
        "captum_faithful.lm.register_adapter(ModelClass, factory)."
    )
