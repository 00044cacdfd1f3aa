"""Places inside a model: layer selection and recording of layer outputs.

Shared by the methods that look inside the model (FEI's ClipGrad) and the metrics
that compare activations (``activation_deviation``). A *place* is a module and the
tensor of its output that matters: the output itself for a convolution, the attention
probabilities for a Vision Transformer's attention module, the residual stream for a
transformer block. Every hook is installed by a context manager and removed on exit,
also when the forward raises; the Vision-Transformer presets run the model with eager
attention for the duration (see :func:`model_places`).

It sits above :mod:`captum_faithful.vit` (the Vision-Transformer presets ask its
adapters where the attention probabilities and the blocks are) and below the
metrics and the methods that use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from captum_faithful.vit import eager_attention, get_adapter

LayerSpec = str | nn.Module | Sequence[str | nn.Module]

CONV_PRESETS = ("conv", "early", "late")
VIT_PRESETS = ("attention", "blocks")
LAYER_PRESETS = CONV_PRESETS + VIT_PRESETS


def output_tensor(module: nn.Module, output: Any) -> Tensor:
    """A layer's output, which must be a tensor."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"can only use layers whose output is a tensor; {type(module).__name__} "
            f"returned {type(output).__name__} (for a Vision Transformer use "
            "layers='attention' or 'blocks')"
        )
    return output


@dataclass(frozen=True)
class Place:
    """A module and how to read the tensor that matters from its output.

    Attributes:
        module (nn.Module): the module whose forward hook sees the output.
        select (Callable): ``(module, output) -> Tensor``; the tensor must be the one
            the model goes on computing with (hooks on its gradient then act on the
            model's own computation).
    """

    module: nn.Module
    select: Callable[[nn.Module, Any], Tensor] = output_tensor


def select_layers(model: nn.Module, layers: LayerSpec) -> list[nn.Module]:
    """The modules of ``model`` named by ``layers``, in definition order.

    ``layers`` is ``"conv"`` (every ``nn.Conv2d``), ``"early"`` / ``"late"`` (the
    first / second half of them; with an odd count both halves share the middle
    layer, as the FEI paper's VGG16 split 1-16 / 16-30 does), one module, or a list
    of modules and dotted submodule names (``"layer1.0.conv2"``). Duplicates are
    dropped; the order of a list is kept. (For ``"attention"`` and ``"blocks"`` see
    :func:`select_places`.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    if isinstance(layers, str):
        if layers not in CONV_PRESETS:
            raise ValueError(
                f"`layers` must be one of {LAYER_PRESETS}, a module, or a list of "
                f"modules or submodule names; got the string {layers!r} (put a "
                "single submodule name in a list)"
            )
        convs: list[nn.Module] = [
            m for m in model.modules() if isinstance(m, nn.Conv2d)
        ]
        if not convs:
            raise ValueError(
                f"`layers={layers!r}` selects torch.nn.Conv2d modules, but the model "
                f"({type(model).__name__}) has none; pass `layers` as a list of "
                "modules or submodule names (or 'attention' / 'blocks' for a Vision "
                "Transformer)"
            )
        n = len(convs)
        if layers == "early":
            return convs[: (n + 1) // 2]
        if layers == "late":
            return convs[n // 2 :]
        return convs
    items = [layers] if isinstance(layers, nn.Module) else layers
    if not isinstance(items, Sequence) or len(items) == 0:
        raise ValueError(
            f"`layers` must be one of {LAYER_PRESETS}, a module, or a non-empty list "
            f"of modules or submodule names, got {layers!r}"
        )
    owned = {id(m) for m in model.modules()}
    selected: list[nn.Module] = []
    for item in items:
        if isinstance(item, str):
            try:
                module = model.get_submodule(item)
            except AttributeError as err:
                raise ValueError(
                    f"`layers`: the model has no submodule named {item!r}"
                ) from err
        elif isinstance(item, nn.Module):
            if id(item) not in owned:
                raise ValueError(
                    f"`layers`: {type(item).__name__} module is not part of the model"
                )
            module = item
        else:
            raise TypeError(
                "`layers` entries must be modules or submodule names, got "
                f"{type(item).__name__}"
            )
        if all(module is not m for m in selected):
            selected.append(module)
    return selected


def select_places(model: nn.Module, layers: LayerSpec) -> list[Place]:
    """The places named by ``layers``: those of :func:`select_layers`, or for a
    Vision Transformer (any model :func:`captum_faithful.vit.get_adapter` describes):

    - ``"attention"``: the post-softmax attention probabilities ``(N, heads, T, T)``
      of every block (``blocks.{l}.attn.hook_pattern``), the tensor the block
      multiplies with the values (run the model with eager attention, see
      :func:`model_places`);
    - ``"blocks"``: the residual stream at every block output ``(N, T, d)``
      (``blocks.{l}.hook_resid_post``).
    """
    if isinstance(layers, str) and layers in VIT_PRESETS:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module, got {type(model).__name__}"
            )
        try:
            adapter = get_adapter(model)
        except TypeError as err:
            raise ValueError(
                f"`layers={layers!r}` needs a Vision Transformer: {err}"
            ) from err
        if layers == "attention":

            def probabilities(module: nn.Module, output: Any) -> Tensor:
                found = adapter.probabilities(output)
                if found is None:
                    raise RuntimeError(
                        f"the attention module {type(module).__name__} returned no "
                        "attention probabilities; register a ViT adapter whose "
                        "`probabilities` finds them"
                    )
                return found

            return [Place(m, probabilities) for m in adapter.attention_modules]
        return [
            Place(block, lambda module, output: adapter.residual(output))
            for block in adapter.blocks
        ]
    return [Place(module) for module in select_layers(model, layers)]


def needs_eager_attention(layers: LayerSpec) -> bool:
    """Whether ``layers`` reads attention probabilities (fused kernels do not make
    them)."""
    return isinstance(layers, str) and layers == "attention"


@contextmanager
def model_places(model: nn.Module, layers: LayerSpec) -> Iterator[list[Place]]:
    """:func:`select_places`, with the model switched to eager attention inside the
    block when ``layers="attention"`` (restored on exit, also after an exception)."""
    places = select_places(model, layers)
    with ExitStack() as stack:
        if needs_eager_attention(layers):
            stack.enter_context(eager_attention(model))
        yield places


def as_places(layers: Sequence[nn.Module | Place]) -> list[Place]:
    """Modules (their output) and places, as places."""
    return [item if isinstance(item, Place) else Place(item) for item in layers]


def layer_names(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    """Dotted names of ``modules`` inside ``model`` (for messages and reports)."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names.get(id(m), type(m).__name__) for m in modules]


@contextmanager
def record_activations(
    layers: Sequence[nn.Module | Place],
) -> Iterator[list[list[Tensor]]]:
    """Record the outputs of ``layers`` (modules or places) during the forwards run in
    the block.

    Yields one list per layer; every call of the module appends a detached copy of
    the selected tensor (a copy, because an in-place activation such as
    ``nn.ReLU(inplace=True)`` may overwrite the output right after the layer).
    """
    places = as_places(layers)
    records: list[list[Tensor]] = [[] for _ in places]

    def make_hook(place: Place, store: list[Tensor]):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            store.append(place.select(module, output).detach().clone())

        return hook

    handles = []
    try:
        for place, store in zip(places, records, strict=True):
            handles.append(place.module.register_forward_hook(make_hook(place, store)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
