"""Places inside a model: layer selection and recording of layer outputs.

Shared by the methods that look inside the model (FEI's ClipGrad) and the metrics
that compare activations (``activation_deviation``). Every hook is installed by a
context manager and removed on exit, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

LayerSpec = str | nn.Module | Sequence[str | nn.Module]

LAYER_PRESETS = ("conv", "early", "late")


def select_layers(model: nn.Module, layers: LayerSpec) -> list[nn.Module]:
    """The modules of ``model`` named by ``layers``, in definition order.

    ``layers`` is ``"conv"`` (every ``nn.Conv2d``), ``"early"`` / ``"late"`` (the
    first / second half of them; with an odd count both halves share the middle
    layer, as the FEI paper's VGG16 split 1-16 / 16-30 does), one module, or a list
    of modules and dotted submodule names (``"layer1.0.conv2"``). Duplicates are
    dropped; the order of a list is kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(
                f"`layers` must be one of {LAYER_PRESETS}, a module, or a list of "
                f"modules or submodule names; got the string {layers!r} (put a "
                "single submodule name in a list)"
            )
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(
                f"`layers={layers!r}` selects torch.nn.Conv2d modules, but the model "
                f"({type(model).__name__}) has none; pass `layers` as a list of "
                "modules or submodule names"
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


def layer_names(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    """Dotted names of ``modules`` inside ``model`` (for messages and reports)."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names.get(id(m), type(m).__name__) for m in modules]


@contextmanager
def record_activations(modules: Sequence[nn.Module]) -> Iterator[list[list[Tensor]]]:
    """Record the outputs of ``modules`` during the forwards run in the block.

    Yields one list per module; every call of the module appends a detached copy of
    its output (a copy, because an in-place activation such as
    ``nn.ReLU(inplace=True)`` may overwrite the output right after the layer).
    """
    records: list[list[Tensor]] = [[] for _ in modules]

    def make_hook(store: list[Tensor]):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"can only record layers whose output is a tensor; "
                    f"{type(module).__name__} returned {type(output).__name__}"
                )
            store.append(output.detach().clone())

        return hook

    handles = []
    try:
        for module, store in zip(modules, records, strict=True):
            handles.append(module.register_forward_hook(make_hook(store)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
