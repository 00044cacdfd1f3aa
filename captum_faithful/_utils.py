"""Small helpers shared by the attribution methods and the metrics.

Argument checks raise early with a message that names the argument and the expected
form; model-facing helpers never write to the user's model or tensors.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from captum_faithful._compat import _format_additional_forward_args, _run_forward


def optional_import(module: str, extra: str) -> Any:
    """Import ``module`` or raise an ImportError that names the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module!r} is needed for this feature. Install it with "
            f"`pip install captum-faithful[{extra}]`."
        ) from err


def as_logits(output: Any) -> Tensor:
    """Reduce a forward output to a tensor: the package's one reading of logits.

    A Hugging Face ``ModelOutput`` or a mapping is reduced to its ``logits`` field
    (``logits_per_image`` for CLIP-style outputs); another object with a tensor
    attribute ``logits`` (a dataclass, a named tuple) to that attribute; a tuple to
    its first element.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        for key in ("logits", "logits_per_image"):
            if key in output.keys() and output[key] is not None:
                return output[key]
        raise TypeError(
            "forward_func returned a mapping without a 'logits' field; expected a "
            f"tensor or a ModelOutput with logits, got keys {list(output.keys())}"
        )
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"forward_func must return a tensor or a ModelOutput, got {type(output).__name__}"
    )


def logits_forward(forward_func: Callable) -> Callable:
    """Wrap ``forward_func`` so that it returns a tensor (see :func:`as_logits`)."""

    def wrapped(*args: Any, **kwargs: Any) -> Tensor:
        return as_logits(forward_func(*args, **kwargs))

    return wrapped


def run_forward(
    forward_func: Callable,
    inputs: tuple[Tensor, ...],
    additional_forward_args: Any = None,
) -> Tensor:
    """Forward ``inputs`` (a tuple) and the additional arguments, return logits."""
    additional_forward_args = _format_additional_forward_args(additional_forward_args)
    return as_logits(_run_forward(forward_func, inputs, None, additional_forward_args))


def forward_runner(forward_func: Callable) -> Callable[..., Tensor]:
    """:func:`run_forward` for loops: ``forward_func``'s signature (which decides
    whether it takes the inputs at all) is read once, here, instead of at every call.

    Returns a function ``(inputs, additional_forward_args=None) -> logits``.
    """
    if not inspect.signature(forward_func).parameters:
        return lambda inputs, additional_forward_args=None: run_forward(
            forward_func, inputs, additional_forward_args
        )

    def run(inputs: tuple[Tensor, ...], additional_forward_args: Any = None) -> Tensor:
        extra = _format_additional_forward_args(additional_forward_args)
        output = forward_func(*inputs, *extra) if extra else forward_func(*inputs)
        return as_logits(output)

    return run


def first_tensor(output: Any) -> Tensor:
    """The hidden states in a module's output: the tensor itself or the first element
    of a tuple or list (transformer blocks return ``(hidden_states, ...)``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        "expected a module to return a tensor or a tuple of tensors, got "
        f"{type(output).__name__}"
    )


def check_finite(name: str, tensors: Tensor | Sequence[Tensor]) -> None:
    """Raise ValueError if any tensor in ``tensors`` holds NaN or Inf, or is on
    the meta device (no values: refused by name here, before anything reads one)."""
    if isinstance(tensors, Tensor):
        tensors = (tensors,)
    for tensor in tensors:
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"`{name}` must be a tensor or a tuple of tensors, "
                f"got {type(tensor).__name__}"
            )
        if tensor.is_meta:
            raise ValueError(
                f"`{name}` are on the meta device, which holds shapes but no values "
                "to attribute or score; create them on a real device, e.g. "
                "`.to('cpu')` of a tensor with values"
            )
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"`{name}` contains NaN or Inf values")


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` as int, raising if it is not an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    finite: bool = False,
) -> float:
    """Return ``value`` as float, raising if it is not a real number in range (and,
    with ``finite``, if it is infinite)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    value = float(value)
    if value != value:
        raise ValueError(f"`{name}` must not be NaN")
    if finite and value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"`{name}` must be {bound} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"`{name}` must be {bound} {high}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value``, raising TypeError unless it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def check_device_available(name: str, device: torch.device) -> torch.device:
    """Return ``device``, raising ValueError naming ``name`` when it is a CUDA (or
    MPS) device this machine does not have: no CUDA at all, or an index beyond the
    GPUs. Checked before any work, instead of torch's error at the first copy."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`{name}` is {str(device)!r}, but CUDA is not available here (no "
                "GPU, or a torch build without CUDA); pass 'cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"`{name}` is {str(device)!r}, but this machine has {count} CUDA "
                f"devices (cuda:0 .. cuda:{count - 1})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"`{name}` is 'mps', but MPS is not available here; pass 'cpu'"
        )
    return device


@overload
def resolve_model(
    forward_func: Callable, model: nn.Module | None, required: Literal[True] = True
) -> nn.Module: ...


@overload
def resolve_model(
    forward_func: Callable, model: nn.Module | None, required: bool
) -> nn.Module | None: ...


def resolve_model(
    forward_func: Callable, model: nn.Module | None, required: bool = True
) -> nn.Module | None:
    """The module whose parameters a method needs: ``model`` or ``forward_func``
    (a module or a bound method of one). Without either, raise TypeError when
    ``required``, else return None."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module, got {type(model).__name__}"
            )
        return model
    module = module_of(forward_func)
    if module is None and required:
        raise TypeError(
            "`forward_func` is not an nn.Module, so pass the module that owns the "
            "parameters as `model=`"
        )
    return module


@contextmanager
def preserve_model_state(model: nn.Module | None) -> Iterator[nn.Module | None]:
    """Restore ``model``'s mode, ``requires_grad`` flags and buffers on exit.

    Methods may switch the mode and flags for the duration of a call (e.g. to take
    gradients of a frozen model), and every forward pass of a module in training
    mode updates its buffers (BatchNorm's ``running_mean``, ``running_var`` and
    ``num_batches_tracked``); the user gets all of them back bit for bit, also
    when the call raises. ``None`` (a forward function that is no module) is a
    no-op.
    """
    if model is None:
        yield None
        return
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, flag in flags:
            param.requires_grad_(flag)
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)


def module_of(forward_func: Any) -> nn.Module | None:
    """The module ``forward_func`` is, or is a bound method of; else None."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def progress(iterable: Iterable, show: bool, **tqdm_kwargs: Any) -> Iterable:
    """``iterable`` wrapped in a tqdm bar when ``show`` (tqdm comes with the
    ``progress``, ``evaluate`` and ``demo`` extras)."""
    if not show:
        return iterable
    tqdm = optional_import("tqdm.auto", "progress").tqdm
    return tqdm(iterable, **tqdm_kwargs)


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], text_columns: int = 1
) -> str:
    """A Markdown table (no trailing newline): every cell as text with ``|``
    escaped, the first ``text_columns`` columns left-aligned and the rest (the
    numbers) right-aligned. The one table writer of :meth:`Results.to_markdown
    <captum_faithful.evaluation.Results.to_markdown>` and the demo report."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return "\n".join(
        [line(header), line(align[: len(header)]), *(line(cells) for cells in rows)]
    )


def check_registration(matches: Any, factory: Any, adapter: str) -> None:
    """The arguments of a ``register_adapter`` (of :mod:`captum_faithful.vit` or
    :mod:`captum_faithful.lm`): a module class or a predicate, and a factory
    ``module -> adapter`` (``adapter`` names its class in the message)."""
    if not (isinstance(matches, type) or callable(matches)):
        raise TypeError(
            "`matches` must be a module class or a predicate module -> bool"
        )
    if not callable(factory):
        raise TypeError(f"`factory` must be a callable module -> {adapter}")


def matches_module(
    matches: type | Callable[[nn.Module], bool], module: nn.Module
) -> bool:
    """Whether a registered ``matches`` (a class: instances and subclasses; or a
    predicate) describes ``module``."""
    if isinstance(matches, type):
        return isinstance(module, matches)
    return bool(matches(module))
