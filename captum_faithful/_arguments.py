"""Captum's argument set, in one place: every method and metric starts here.

Captum's attribution methods and metrics share four arguments, and each means the
same thing in every function of this package because each is turned into its
canonical form here, by one function, before any model call:

- ``inputs``: a tensor or a tuple of tensors with the batch on dim 0 →
  :func:`format_inputs` returns the tuple and whether the user passed one (the
  result mirrors it, as in Captum).
- ``baselines``: a number, a tensor broadcastable to the input, a preset name
  (``"zero"``, ``"mean"``, ``"blur"``), a callable ``input -> tensor``, or a tuple
  of these with one entry per input → :func:`format_baselines` returns one tensor
  per input, expanded to its shape. What ``baselines=None`` means is the method's
  own choice (UNI learns them, FEI draws a reference), so None is not a form here.
- ``target``: None, an int, a tuple indexing the output dimensions after the batch
  (``(c,)`` for an output (N, n_classes)), a list with one int or one-element
  tuple per sample, or a tensor with one or N integers → :func:`format_target`
  checks the form before the forward pass, :func:`resolve_target` gives the class
  of every sample, shape (N,), once the output is known (None: the predicted
  class, the argmax of the unperturbed output). An output of shape (N,) counts as
  one class.
- ``additional_forward_args``: anything passed to the model after the inputs →
  :func:`format_additional_forward_args` returns a tuple (Captum's helper) and
  checks that every tensor with dimensions has the batch size on dim 0, since
  Captum repeats such tensors with their samples; :func:`select_rows` gives the
  arguments of any rows built from the samples (path points, perturbed copies,
  chunks, one sample alone).

The model's side of the first forward is read here too: :func:`check_model_output`
stops an attribution method whose model returns NaN or Inf on the unperturbed
inputs (the metrics give such a sample NaN and warn instead), and
:func:`explained_dtype_errors` turns the forward's error on inputs of another
dtype than the model's parameters into a TypeError naming both. Tensors on the
meta device hold no values and are refused by name with the other argument
checks (no value is ever read from them).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from captum_faithful._baselines import BASELINE_PRESETS
from captum_faithful._compat import (
    SUPPORTED_METHODS,
    _format_additional_forward_args,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum_faithful._utils import check_choice, check_finite, check_int


def format_inputs(
    inputs: Any, floating: bool = False
) -> tuple[tuple[Tensor, ...], bool]:
    """``(inputs as a tuple, whether they were one)`` after checking them.

    Every input must be a non-empty tensor with a leading batch dimension of the
    same size N >= 1, free of NaN/Inf, and of a floating-point dtype when
    ``floating`` (methods that take gradients with respect to the inputs).
    """
    is_tuple = _is_tuple(inputs)
    if not (is_tuple or isinstance(inputs, Tensor)) or (
        is_tuple and (not inputs or not all(isinstance(x, Tensor) for x in inputs))
    ):
        raise TypeError(
            "`inputs` must be a tensor or a non-empty tuple of tensors (as in "
            f"Captum), got {_describe(inputs)}"
        )
    formatted = _format_tensor_into_tuples(inputs)
    for x in formatted:
        if x.dim() == 0:
            raise ValueError(
                "`inputs` need a leading batch dimension: shape (N, ...), got a "
                "0-d tensor"
            )
    n_examples = formatted[0].shape[0]
    if any(x.shape[0] != n_examples for x in formatted):
        raise ValueError(
            "every tensor in `inputs` must have the same batch size on dim 0, got "
            f"shapes {[tuple(x.shape) for x in formatted]}"
        )
    if n_examples == 0:
        raise ValueError(
            "`inputs` hold an empty batch (shape "
            f"{tuple(formatted[0].shape)}); pass at least one sample"
        )
    if any(x.numel() == 0 for x in formatted):
        raise ValueError(
            "`inputs` must not be empty tensors, got shapes "
            f"{[tuple(x.shape) for x in formatted]}"
        )
    if floating and not all(x.is_floating_point() for x in formatted):
        raise TypeError(
            "`inputs` must be floating-point tensors (gradients are taken with "
            f"respect to them), got dtypes {[str(x.dtype) for x in formatted]}"
        )
    check_finite("inputs", formatted)
    return formatted, is_tuple


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value)
        return f"{type(value).__name__}({kinds})"
    return type(value).__name__


def broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (and no further)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def per_input(name: str, value: Any, inputs: tuple[Tensor, ...]) -> tuple:
    """``value`` with one entry per input: a tuple must have one per input; any
    other value is shared by all inputs."""
    if not _is_tuple(value):
        return (value,) * len(inputs)
    if len(value) != len(inputs):
        raise ValueError(
            f"`{name}` as a tuple must hold one entry per input tensor "
            f"({len(inputs)}), got {len(value)}"
        )
    return value


def check_integer_mask(mask: Any, ids: str = "feature ids") -> Tensor:
    """``mask`` itself if it is an integer tensor; a ``TypeError`` naming
    ``feature_mask`` otherwise (``ids`` says what its entries are)."""
    if not isinstance(mask, Tensor):
        raise TypeError(
            "`feature_mask` must be an integer tensor or a tuple of them, got "
            f"{type(mask).__name__}"
        )
    if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
        raise TypeError(
            f"`feature_mask` must hold integer {ids}, got dtype {mask.dtype}"
        )
    return mask


def format_baselines(baselines: Any, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """One baseline tensor per input, expanded to the input's shape.

    ``baselines`` is a number, a tensor broadcastable to the input (a batch of 1 or
    N, e.g. (1, C, 1, 1) for one colour), a preset name of
    :data:`~captum_faithful._baselines.BASELINE_PRESETS`, a callable
    ``input -> tensor`` applied to each input tensor, or a tuple of these with one
    entry per input (any other value is shared by all inputs). The results are
    detached, finite, on the input's device and dtype, and computed without
    modifying the inputs. ``"zero"`` and numbers stay one broadcast scalar.
    """
    resolved = []
    for baseline, x in zip(
        per_input("baselines", baselines, inputs), inputs, strict=True
    ):
        with torch.no_grad():
            baseline = _baseline_tensor(baseline, x)
        if baseline.dim() > x.dim() or not broadcasts_to(baseline.shape, x.shape):
            raise ValueError(
                "`baselines` must broadcast to the input shape "
                f"{tuple(x.shape)}, got shape {tuple(baseline.shape)}"
            )
        check_finite("baselines", baseline)
        baseline = baseline.detach().to(device=x.device, dtype=x.dtype)
        resolved.append(baseline.expand_as(x))
    return tuple(resolved)


def _baseline_tensor(baseline: Any, x: Tensor) -> Tensor:
    if isinstance(baseline, str):
        if baseline not in BASELINE_PRESETS:
            raise ValueError(
                f"`baselines` must be one of {tuple(BASELINE_PRESETS)}, a number, a "
                f"tensor or a callable, got {baseline!r}"
            )
        return x.new_zeros(()) if baseline == "zero" else BASELINE_PRESETS[baseline](x)
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return torch.full((), float(baseline), dtype=x.dtype, device=x.device)
    if callable(baseline) and not isinstance(baseline, Tensor):
        baseline = baseline(x)
    if not isinstance(baseline, Tensor):
        raise TypeError(
            "`baselines` must be a number, a tensor, a preset name "
            f"{tuple(BASELINE_PRESETS)}, a callable returning a tensor, or a tuple "
            f"of these, got {type(baseline).__name__}"
        )
    return baseline


def format_target(target: Any, n_examples: int) -> Tensor | None:
    """``target`` as an int64 tensor of shape (N,), or None for the predicted class.

    Captum's forms, checked before any forward pass: an int (every sample); a
    tuple indexing the output dimensions after the batch, which for class scores
    (N, n_classes) is ``(c,)``; a list with one int or one ``(c,)`` per sample; a
    tensor with one integer (every sample) or a 1-D tensor of N, of an integer
    dtype (a floating-point tensor is refused, as by Captum, even of whole
    numbers: ``target.long()`` converts it). Class indices must be >= 0; the
    upper bound is checked by :func:`resolve_target` against the output.
    """
    if target is None:
        return None
    if isinstance(target, bool) or (
        isinstance(target, Tensor) and target.dtype == torch.bool
    ):
        raise TypeError(f"`target` must hold class indices, got {target!r}")
    if isinstance(target, numbers.Integral):
        classes = torch.full((n_examples,), int(target), dtype=torch.int64)
    elif isinstance(target, tuple):
        classes = torch.full((n_examples,), _class_of_index(target), dtype=torch.int64)
    elif isinstance(target, list):
        if len(target) != n_examples:
            raise ValueError(
                f"`target` as a list must hold one class per sample ({n_examples}), "
                f"got {len(target)}"
            )
        classes = torch.tensor(
            [_class_of_entry(entry) for entry in target], dtype=torch.int64
        )
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            # Captum indexes the output with `target`, which a float tensor cannot
            raise TypeError(
                "`target` must hold integer class indices (an int64 tensor, as in "
                f"Captum), got a tensor of dtype {target.dtype}; convert whole "
                "numbers with `target.long()`"
            )
        if target.numel() != 1 and (target.dim() != 1 or len(target) != n_examples):
            raise ValueError(
                "`target` as a tensor must hold one class (for every sample) or, in "
                f"one dimension, one class per sample ({n_examples}), got shape "
                f"{tuple(target.shape)}"
            )
        classes = target.detach().reshape(-1).to(torch.int64).expand(n_examples)
    else:
        raise TypeError(
            "`target` must be None, an int, a tuple (class,), a list or a tensor of "
            f"class indices, got {type(target).__name__}"
        )
    if classes.numel() and int(classes.min()) < 0:
        raise ValueError(
            f"`target` out of range: class indices must be >= 0, got "
            f"{int(classes.min())}"
        )
    return classes


def _class_of_entry(entry: Any) -> int:
    """The class of one sample's entry in a list target: an int or ``(c,)``."""
    if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
        return int(entry)
    if not isinstance(entry, tuple):
        raise TypeError(
            "`target` as a list must hold an int or a tuple (class,) per sample, got "
            f"an entry of type {type(entry).__name__}"
        )
    return _class_of_index(entry)


def _class_of_index(index: Any) -> int:
    """The class of Captum's tuple target ``(c,)`` (an index of the dimensions
    after the batch, of which class scores have one)."""
    if not (
        isinstance(index, tuple)
        and len(index) == 1
        and isinstance(index[0], numbers.Integral)
        and not isinstance(index[0], bool)
    ):
        raise ValueError(
            "`target` as a tuple indexes the output dimensions after the batch; "
            "class scores (N, n_classes) have one, so expected (class,), got "
            f"{index!r} (for one class per sample pass a list or a tensor)"
        )
    return int(index[0])


def class_scores(output: Tensor) -> Tensor:
    """The forward output as class scores (N, n_classes); (N,) is one class."""
    if output.dim() == 1:
        return output.unsqueeze(1)
    if output.dim() != 2:
        raise ValueError(
            "expected forward_func to return class scores of shape (N, n_classes) "
            f"or one score per sample (N,), got shape {tuple(output.shape)}"
        )
    return output


def resolve_target(output: Tensor, target: Any) -> Tensor:
    """The class of every sample, int64 of shape (N,) on the output's device.

    ``output`` is the forward output on the unperturbed inputs (see
    :func:`class_scores`); ``target`` any form of :func:`format_target`. None takes
    the predicted class (argmax). Raises ValueError for a class outside
    ``[0, n_classes)``.
    """
    scores = class_scores(output)
    n_examples, n_classes = scores.shape
    classes = format_target(target, n_examples)
    if classes is None:
        return scores.detach().argmax(dim=1)
    classes = classes.to(scores.device)
    if n_examples and int(classes.max()) >= n_classes:
        raise ValueError(
            f"`target` out of range: the output has {n_classes} classes, got class "
            f"{int(classes.max())}"
        )
    return classes


def non_finite_rows(values: Tensor) -> Tensor:
    """Per row of ``values`` (N, ...), whether it holds NaN or Inf: bool (N,).

    Integer and boolean tensors have none; a tensor on the meta device holds no
    values, so none are reported (nothing is read from it)."""
    if values.is_meta or not (values.is_floating_point() or values.is_complex()):
        return torch.zeros(values.shape[:1], dtype=torch.bool, device="cpu")
    return ~torch.isfinite(values.detach().reshape(values.shape[0], -1)).all(dim=1)


def check_model_output(output: Tensor, method: str) -> Tensor:
    """``output`` (the forward output on the unperturbed inputs, batch first) when
    it is finite; a ValueError naming ``method`` and the samples otherwise.

    An attribution computed from NaN or Inf scores is NaN or meaningless, and the
    cause (NaN weights, NaN ``additional_forward_args``, an overflow) lies in the
    model, so the method stops at the first forward instead of returning it."""
    if output.dim() == 0:
        return output  # no batch: resolve_target names the expected shape
    bad = non_finite_rows(output)
    if bool(bad.any()):
        samples = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{method}: the model returned non-finite values (NaN or Inf) on the "
            f"unperturbed `inputs` for samples {samples}, so nothing can be "
            "attributed; check the model's parameters and `additional_forward_args` "
            "for NaN/Inf, and the forward for overflow"
        )
    return output


def parameter_dtype(model: Any) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (None without a
    module or such a parameter)."""
    if not isinstance(model, nn.Module):
        return None
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@contextmanager
def explained_dtype_errors(inputs: tuple[Tensor, ...], model: Any) -> Iterator[None]:
    """Turn the RuntimeError of a forward on floating-point ``inputs`` of another
    dtype than ``model``'s parameters into a TypeError naming both dtypes.

    The forward's own error (a bias or matrix dtype) does not say which argument
    to convert. Inputs are not refused before the forward: a model that casts
    them itself (Hugging Face image models cast the pixel values to their
    weights' dtype) runs on any floating dtype, so only a forward that fails is
    explained; any other error passes through unchanged."""
    try:
        yield
    except RuntimeError as err:
        expected = parameter_dtype(model)
        other = next(
            (
                x.dtype
                for x in inputs
                if x.is_floating_point()
                and expected is not None
                and x.dtype != expected
            ),
            None,
        )
        if other is None:
            raise
        raise TypeError(
            f"`inputs` have dtype {other}, the model's parameters {expected}, and "
            f"the forward failed on the mismatch ({err}); convert the inputs with "
            f"`inputs.to({expected})` or the model with `model.to({other})`"
        ) from err


def format_additional_forward_args(
    additional_forward_args: Any, n_examples: int | None
) -> tuple | None:
    """``additional_forward_args`` as a tuple (None stays None), checked.

    Captum's convention for methods that build rows from the samples (path points,
    perturbed copies, chunks): tensors with dimensions are batch-first and follow
    their samples (Captum repeats them), so each must have the batch size
    ``n_examples`` on dim 0; anything else (numbers, lists, 0-d tensors) is passed
    to every forward call as is. A method that forwards the batch once, whole,
    passes ``n_examples=None``: its arguments are not split, so they are not
    checked (e.g. the texts of a CLIP model, of their own batch size).
    """
    formatted = _format_additional_forward_args(additional_forward_args)
    if n_examples is None:
        return formatted
    for position, arg in enumerate(formatted or ()):
        if is_batched(arg) and arg.shape[0] != n_examples:
            name = (
                f"additional_forward_args[{position}]"
                if isinstance(additional_forward_args, tuple)
                else "additional_forward_args"
            )
            raise ValueError(
                f"`{name}` must have the batch size {n_examples} of the inputs on "
                f"dim 0 (its rows follow their samples, as in Captum), got shape "
                f"{tuple(arg.shape)}; pass an argument shared by all samples through "
                "a closure or functools.partial of forward_func"
            )
    return formatted


def is_batched(arg: Any) -> bool:
    """Whether an additional forward argument follows its samples (a tensor with
    dimensions, see :func:`format_additional_forward_args`)."""
    return isinstance(arg, Tensor) and arg.dim() > 0


def select_rows(additional_forward_args: tuple | None, rows: Tensor) -> tuple | None:
    """The additional forward arguments of rows built from the samples ``rows``
    (shape (R,)): batched tensors are indexed by sample, the rest is kept."""
    if additional_forward_args is None:
        return None
    return tuple(
        arg.index_select(0, rows.to(arg.device)) if is_batched(arg) else arg
        for arg in additional_forward_args
    )


def repeat_rows(
    additional_forward_args: tuple | None, n_copies: int, n_examples: int
) -> tuple | None:
    """The arguments of ``n_copies`` copies of the batch laid out copy-major
    (Captum's layout of path points: all samples at point 1, then at point 2...)."""
    if additional_forward_args is None or n_copies == 1:
        return additional_forward_args
    return select_rows(
        additional_forward_args, torch.arange(n_examples).repeat(n_copies)
    )


def check_integration_arguments(
    n_steps: Any, method: Any, internal_batch_size: Any
) -> tuple[int, str, int | None]:
    """Captum's path-integral arguments, validated: ``n_steps`` >= 1 (>= 2 for the
    trapezoid rule), ``method`` one of Captum's approximation methods, and
    ``internal_batch_size`` None or >= 1."""
    n_steps = check_int("n_steps", n_steps, minimum=1)
    method = check_choice("method", method, SUPPORTED_METHODS)
    if method == "riemann_trapezoid" and n_steps < 2:
        raise ValueError("`n_steps` must be >= 2 with method='riemann_trapezoid'")
    if internal_batch_size is not None:
        internal_batch_size = check_int(
            "internal_batch_size", internal_batch_size, minimum=1
        )
    return n_steps, method, internal_batch_size
