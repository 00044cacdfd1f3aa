"""The math of UNI (unlearning-based neural interpretations), one function per step.

1. :func:`unlearned_log_probs` — per sample, the unlearning direction
   ``g_i = ∇_θ CE(f(x_i; θ), c_i)`` (computed as the gradient of the log-odds
   against ``c_i``, same direction, see :func:`log_odds_against`), the unlearned
   parameters
   ``θ̂_i = θ + η g_i / ‖g_i‖`` (one global L2 norm over all parameters) and the target
   distribution ``log softmax f(x_i; θ̂_i)``; vectorised with ``torch.func.vmap`` in
   chunks, with a per-sample loop for models vmap cannot run.
2. :func:`match_baselines` — projected gradient descent on
   ``KL(p̂_i ‖ softmax f(x_i + δ; θ))`` with ``δ`` rescaled to norm ``ε`` per sample.
3. :func:`integrated_gradients` — the Riemann / Gauss-Legendre path integral from the
   baseline to the input with the original parameters.

A forward that returns one score per sample which is a log-probability
``s = log p`` (as Captum's ``LLMGradientAttribution`` wrapper returns, the
log-probability of the target token) is read as the binary distribution
``(p, 1 − p)`` by :func:`distribution_logits`: the unlearning direction is
``∇_θ (−s)`` (:func:`unlearning_loss`) and the baselines match the KL divergence
between binary distributions.

The user's model is never written to: unlearned parameters and copies of the buffers
are substituted with :func:`torch.func.functional_call` for the duration of a call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from captum_faithful._arguments import class_scores, is_batched, repeat_rows
from captum_faithful._compat import (
    TargetType,
    _reshape_and_sum,
    _run_forward,
    approximation_parameters,
)
from captum_faithful._utils import as_logits

#: With ``unlearning_batch_size=None`` a chunk holds at most this many parameter
#: values (chunk size x number of unlearned parameters), i.e. 256 MB per copy at
#: float32: the vectorised step materialises the per-sample gradients and the
#: per-sample unlearned parameters of one chunk at a time.
DEFAULT_UNLEARNING_BUDGET = 2**26

_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented"


class SharedArgument:
    """An additional forward argument shared by all samples (not split by row).

    UNI passes a tensor of ``additional_forward_args`` whose first dimension is not
    the batch size to every forward call as it is (e.g. the target tokens that
    Captum's ``LLMGradientAttribution`` passes); it travels wrapped in this class so
    that the row selection, which splits batched tensors by sample, leaves it
    alone, and :class:`ParametrizedForward` unwraps it.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def share_unbatched_args(additional_forward_args: Any, n_examples: int) -> Any:
    """``additional_forward_args`` with every tensor whose first dimension is not
    ``n_examples`` wrapped in :class:`SharedArgument` (other values unchanged)."""

    def wrap(arg: Any) -> Any:
        if is_batched(arg) and arg.shape[0] != n_examples:
            return SharedArgument(arg)
        return arg

    if isinstance(additional_forward_args, tuple):
        return tuple(wrap(arg) for arg in additional_forward_args)
    return wrap(additional_forward_args)


class ParametrizedForward(nn.Module):
    """``forward_func`` as a module that owns ``model``'s parameters and buffers.

    :func:`torch.func.functional_call` on this module substitutes tensors for the
    parameters and buffers of ``model`` (names prefixed ``"model."``) while
    ``forward_func`` runs, which lets any callable that closes over ``model`` be
    evaluated with unlearned parameters. The output is reduced to class scores
    (N, n_classes); an output of one score per sample is one class.
    ``model=None`` (a forward function without a module) substitutes nothing.
    Arguments wrapped in :class:`SharedArgument` are unwrapped.
    """

    _forward_func: Callable[..., Any]

    def __init__(self, forward_func: Callable, model: nn.Module | None) -> None:
        super().__init__()
        self.model = model if model is not None else nn.Module()
        # a plain attribute, not a submodule, so the parameters are listed once
        object.__setattr__(self, "_forward_func", forward_func)

    def forward(self, *args: Any) -> Tensor:
        args = tuple(a.value if isinstance(a, SharedArgument) else a for a in args)
        return class_scores(as_logits(self._forward_func(*args)))


def unlearned_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters UNI unlearns, detached, keyed for :class:`ParametrizedForward`.

    Every floating-point parameter with ``requires_grad``; when none requires grad
    (a model frozen for inference) every floating-point parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    trainable = [(n, p) for n, p in named if p.requires_grad]
    return {f"model.{n}": p.detach() for n, p in (trainable or named)}


def buffer_copies(model: nn.Module | None) -> dict[str, Tensor]:
    """Copies of the buffers of ``model`` (keyed for :class:`ParametrizedForward`).

    Passed to :func:`torch.func.functional_call`, they take the in-place updates a
    module in training mode makes (BatchNorm running statistics), so the user's
    buffers are never written to. None (no module) has none.
    """
    if model is None:
        return {}
    return {f"model.{n}": b.detach().clone() for n, b in model.named_buffers()}


def protected_forward(
    wrapper: ParametrizedForward, buffers: dict[str, Tensor]
) -> Callable[..., Tensor]:
    """The model's forward with the original parameters and the buffer copies."""
    if not buffers:
        return wrapper

    def forward(*args: Any) -> Tensor:
        return functional_call(wrapper, buffers, args)

    return forward


def kl_divergence(log_target: Tensor, logits: Tensor) -> Tensor:
    """``KL(p̂ ‖ softmax(logits))`` per sample, summed over classes.

    ``log_target`` holds ``log p̂`` (N, C); returns shape (N,).
    """
    log_probs = torch.log_softmax(logits, dim=1)
    return F.kl_div(log_probs, log_target, reduction="none", log_target=True).sum(1)


def log_odds_against(logits: Tensor, target: Tensor) -> Tensor:
    r"""``L = log Σ_{k≠c} exp(z_k − z_c)`` per row: the log-odds against class c.

    The cross-entropy is :math:`\mathrm{CE} = \log(1 + e^L) = \mathrm{softplus}(L)`,
    so :math:`\nabla \mathrm{CE} = \sigma(L) \nabla L` with :math:`\sigma(L) > 0`:
    both have the same direction, which is all the unlearning step uses. ``L``'s
    gradient has no cancellation and cannot underflow: in float32 the softmax
    probability of a class ahead by a logit margin of ~17 rounds to 1, so the
    cross-entropy gradient loses its target component (``p_c − 1 = 0``), and past
    a margin of ~50 its norm underflows to 0, which left the parameters, hence the
    baseline, unchanged.
    """
    target = target.view(-1, 1)
    margins = logits - logits.gather(1, target)
    classes = torch.arange(logits.shape[1], device=logits.device)
    return torch.logsumexp(margins.masked_fill(classes == target, -torch.inf), dim=1)


def log1mexp(log_p: Tensor) -> Tensor:
    r"""``log(1 − exp(s))`` elementwise for log-probabilities ``s <= 0``.

    .. math::
        \log(1 - e^s) = \begin{cases} \log(-\mathrm{expm1}(s)) & s > -\log 2 \\
        \mathrm{log1p}(-e^s) & s \le -\log 2 \end{cases}

    (Mächler's split: neither branch cancels). ``s`` is clamped to at most the
    negative of the smallest normal number of its dtype, so ``s = 0`` (``p = 1``
    in floating point) gives a finite value (about -87 in float32) and every
    gradient is finite; each branch is evaluated on values where it is finite.
    """
    log_p = log_p.clamp(max=-torch.finfo(log_p.dtype).tiny)
    near_zero = log_p > -math.log(2.0)
    small = torch.log(-torch.expm1(torch.where(near_zero, log_p, -1.0)))
    large = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, log_p)))
    return torch.where(near_zero, small, large)


def binary_log_probs(log_p: Tensor) -> Tensor:
    r"""The binary distribution :math:`(p, 1 - p)` of log-probabilities
    :math:`s = \log p` of shape (N,), as log-probabilities of shape (N, 2):
    ``[s, log(1 − e^s)]`` (see :func:`log1mexp`)."""
    return torch.stack([log_p, log1mexp(log_p)], dim=-1)


def distribution_logits(scores: Tensor) -> Tensor:
    """The logits of the distribution UNI unlearns and matches, from class scores
    (N, C): the scores themselves for C >= 2; for one score per sample (a
    log-probability) the binary log-probabilities :func:`binary_log_probs`, whose
    log-softmax is themselves."""
    if scores.shape[-1] == 1:
        return binary_log_probs(scores[..., 0])
    return scores


def unlearning_loss(scores: Tensor, target: Tensor) -> Tensor:
    r"""The loss whose gradient gives the unlearning direction, per row.

    For C >= 2 classes the log-odds against the target (:func:`log_odds_against`,
    the direction of the cross-entropy's gradient). For one score per sample,
    :math:`s = \log p`, it is :math:`-s`: the cross-entropy of the binary
    distribution :math:`(p, 1 - p)` on its first class, which is the full-softmax
    cross-entropy of the token whose log-probability ``s`` is.
    """
    if scores.shape[-1] == 1:
        return -scores[:, 0]
    return log_odds_against(scores, target)


def split_per_sample(
    additional_forward_args: tuple | None,
) -> tuple[list[int], tuple[Tensor, ...], tuple]:
    """Separate the batched tensors of ``additional_forward_args`` (formatted by
    the front door, so they have the batch size on dim 0).

    Returns their positions, those tensors, and the full argument tuple (used as a
    template).
    """
    args = additional_forward_args or ()
    positions = [i for i, arg in enumerate(args) if is_batched(arg)]
    return positions, tuple(args[i] for i in positions), tuple(args)


def _sample_args(
    sample: tuple[Tensor, ...],
    extra: tuple[Tensor, ...],
    positions: Sequence[int],
    template: tuple,
) -> tuple:
    """The forward arguments of one sample, each with a batch dimension of 1."""
    args = list(template)
    for position, tensor in zip(positions, extra, strict=True):
        args[position] = tensor.unsqueeze(0)
    return (*(t.unsqueeze(0) for t in sample), *args)


def _unlearn_one(
    wrapper: ParametrizedForward,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    unlearning_step: float,
    positions: Sequence[int],
    template: tuple,
    sample: tuple[Tensor, ...],
    target: Tensor,
    extra: tuple[Tensor, ...],
) -> Tensor:
    """Algorithm 1, lines 4 and the target of line 5, for one (unbatched) sample.

    Buffers are copied inside the transformed function: torch.func forbids in-place
    updates (BatchNorm running statistics in training mode) of captured tensors.
    """
    args = _sample_args(sample, extra, positions, template)

    def loss(theta: dict[str, Tensor]) -> Tensor:
        # the direction of the cross-entropy's gradient (see unlearning_loss)
        copies = {name: b.clone() for name, b in buffers.items()}
        logits = functional_call(wrapper, {**theta, **copies}, args)
        return unlearning_loss(logits, target.reshape(1)).sum()

    direction = grad(loss)(params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in direction.values()))
    # a zero gradient (a saturated prediction) leaves θ unchanged
    scale = torch.where(
        norm > 0, unlearning_step / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0
    )
    theta_hat = {name: params[name] + scale * direction[name] for name in params}
    copies = {name: b.clone() for name, b in buffers.items()}
    logits = functional_call(wrapper, {**theta_hat, **copies}, args)
    return torch.log_softmax(distribution_logits(logits), dim=1)[0]


def unlearning_chunk_size(
    unlearning_batch_size: int | None, params: dict[str, Tensor], n_examples: int
) -> int:
    """Samples per vectorised unlearning chunk (see :data:`DEFAULT_UNLEARNING_BUDGET`)."""
    if unlearning_batch_size is not None:
        return max(1, min(unlearning_batch_size, n_examples))
    n_params = sum(p.numel() for p in params.values())
    return max(1, min(n_examples, DEFAULT_UNLEARNING_BUDGET // max(n_params, 1)))


def unlearned_log_probs(
    wrapper: ParametrizedForward,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    inputs: tuple[Tensor, ...],
    targets: Tensor,
    additional_forward_args: tuple | None,
    unlearning_step: float,
    chunk_size: int,
    mode: str = "auto",
) -> Tensor:
    """``log softmax f(x_i; θ̂_i)`` for every sample, shape (N, C), detached (for
    one score per sample the binary log-probabilities, shape (N, 2), see
    :func:`distribution_logits`).

    ``θ̂_i = θ + η ∇_θ CE(f(x_i; θ), c_i) / ‖∇_θ CE(f(x_i; θ), c_i)‖`` with one L2
    norm over all tensors in ``params``. Every sample is run alone (batch of one).
    ``mode="vmap"`` vectorises ``chunk_size`` samples at a time with
    ``torch.func.vmap``; ``"loop"`` runs them one by one; ``"auto"`` tries vmap and
    falls back to the loop when vmap cannot run the model (data-dependent control
    flow, in-place updates of unbatched tensors, ...). Both compute the same
    function.
    """
    n_examples = inputs[0].shape[0]
    positions, extra, template = split_per_sample(additional_forward_args)

    def one(sample: tuple, target: Tensor, extra_i: tuple) -> Tensor:
        return _unlearn_one(
            wrapper, params, buffers, unlearning_step, positions, template,
            sample, target, extra_i,
        )  # fmt: skip

    inputs = tuple(t.detach() for t in inputs)
    extra = tuple(t.detach() for t in extra)
    if mode in ("auto", "vmap"):
        batched = vmap(one, in_dims=(0, 0, 0), randomness="different")
        try:
            with warnings.catch_warnings():
                # ops without a batching rule (e.g. fused attention kernels) still
                # run under vmap, one sample at a time; that is no user error
                warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
                chunks = [
                    batched(
                        tuple(t[start : start + chunk_size] for t in inputs),
                        targets[start : start + chunk_size],
                        tuple(t[start : start + chunk_size] for t in extra),
                    )
                    for start in range(0, n_examples, chunk_size)
                ]
            return torch.cat(chunks).detach()
        except Exception:
            if mode == "vmap":
                raise
    rows = [
        one(tuple(t[i] for t in inputs), targets[i], tuple(t[i] for t in extra))
        for i in range(n_examples)
    ]
    return torch.stack(rows).detach()


def project_to_sphere(deltas: tuple[Tensor, ...], epsilon: float) -> tuple[Tensor, ...]:
    """Rescale ``δ`` to L2 norm ``epsilon`` per sample, jointly over all tensors.

    A sample whose ``δ`` is zero is left at zero.
    """
    # scaled by the largest magnitude first, so that the first step of a saturated
    # prediction (a tiny gradient) is not lost to an underflowing sum of squares
    flat = [d.reshape(d.shape[0], -1) for d in deltas]
    peak = torch.stack([f.abs().amax(dim=1) for f in flat]).amax(dim=0)
    peak = torch.where(peak > 0, peak, 1.0).unsqueeze(1)
    squares = cast(Tensor, sum((f / peak).pow(2).sum(dim=1) for f in flat))
    norm = peak[:, 0] * torch.sqrt(squares)
    scale = torch.where(
        norm > 0, epsilon / norm.clamp_min(torch.finfo(norm.dtype).tiny), 1.0
    )
    return tuple(d * scale.reshape(-1, *([1] * (d.dim() - 1))) for d in deltas)


def match_baselines(
    gradient_func: Callable,
    forward_fn: Callable[..., Tensor],
    starts: tuple[Tensor, ...],
    log_target: Tensor,
    additional_forward_args: tuple | None,
    pgd_steps: int,
    epsilon: float,
    pgd_step_size: float,
    free: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, ...]:
    """Algorithm 1, lines 5-7: the baselines ``x' = x + δ^T``.

    ``log_target`` holds ``log p̂`` per sample, of the distribution
    :func:`distribution_logits` gives for ``forward_fn``'s scores.
    ``δ⁰ = 0``; for ``t < T``: ``δ ← δ − μ ∇_δ KL(p̂ ‖ softmax f(x + δ))`` followed by
    :func:`project_to_sphere`. The KL of every sample only depends on its own ``δ``,
    so one batched gradient of the summed KL gives all per-sample gradients.
    ``free`` holds, per start, None or a 0/1 mask broadcastable to it: the step
    is masked, so ``δ`` stays 0 where the mask is 0 (and the sphere is the one of
    the free values).
    """
    starts = tuple(s.detach() for s in starts)
    n_inputs = len(starts)

    def objective(*args: Any) -> Tensor:
        moved = tuple(s + d for s, d in zip(starts, args[:n_inputs], strict=True))
        scores = forward_fn(*moved, *args[n_inputs:])
        return kl_divergence(log_target, distribution_logits(scores))

    deltas = tuple(torch.zeros_like(s) for s in starts)
    for _ in range(pgd_steps):
        deltas = tuple(d.requires_grad_() for d in deltas)
        grads = gradient_func(
            forward_fn=objective,
            inputs=deltas,
            target_ind=None,
            additional_forward_args=additional_forward_args,
        )
        if free is not None:
            grads = tuple(
                g if m is None else g * m for g, m in zip(grads, free, strict=True)
            )
        deltas = project_to_sphere(
            tuple(
                (d - pgd_step_size * g).detach()
                for d, g in zip(deltas, grads, strict=True)
            ),
            epsilon,
        )
    if pgd_steps > 0:
        _warn_if_unmoved(deltas)
    return tuple(s + d for s, d in zip(starts, deltas, strict=True))


def _warn_if_unmoved(deltas: tuple[Tensor, ...]) -> None:
    """Warn about samples whose baseline equals the input (their attribution is 0)."""
    moved = torch.stack([d.reshape(d.shape[0], -1).ne(0).any(dim=1) for d in deltas])
    unmoved = (~moved.any(dim=0)).nonzero().flatten().tolist()
    if unmoved:
        warnings.warn(
            f"UNI: the learned baseline of samples {unmoved} equals the input, so "
            "their attributions are zero: the gradient of the KL divergence "
            "vanished (the unlearned and the original predictions agree to the "
            "floating-point precision, e.g. a saturated prediction with a small "
            "`unlearning_step`, or a model whose output does not depend on the "
            "input there). Increase `unlearning_step`, or pass `baselines`.",
            stacklevel=4,
        )


#: A single point of each Riemann rule (Captum's rules need two or more).
_SINGLE_POINT = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}


def path_points(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """Captum's step sizes and path points for ``method``; one Riemann point too.

    ``n_steps=1`` with ``riemann_right`` is one gradient at the input, with weight 1.
    """
    if n_steps == 1 and method in _SINGLE_POINT:
        return [1.0], [_SINGLE_POINT[method]]
    step_sizes_func, alphas_func = approximation_parameters(method)
    return step_sizes_func(n_steps), alphas_func(n_steps)


def integrated_gradients(
    gradient_func: Callable,
    forward_fn: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    baselines: tuple[Tensor, ...],
    target: Tensor,
    additional_forward_args: tuple | None,
    n_steps: int,
    method: str,
    multiply_by_inputs: bool,
    step_sizes_and_alphas: tuple[list[float], list[float]] | None = None,
) -> tuple[Tensor, ...]:
    """Path integral of the target gradient from ``baselines`` to ``inputs``.

    ``Σ_k w_k ∇f_c(x' + α_k (x − x'))`` with Captum's step sizes ``w_k`` and points
    ``α_k`` for ``method``, times ``(x − x')`` when ``multiply_by_inputs``. All steps
    of all samples are evaluated in one batch (step-major, as in Captum).
    """
    step_sizes, alphas = step_sizes_and_alphas or path_points(method, n_steps)
    scaled = tuple(
        torch.cat([b + alpha * (x - b) for alpha in alphas], dim=0).requires_grad_()
        for x, b in zip(inputs, baselines, strict=True)
    )
    grads = gradient_func(
        forward_fn=forward_fn,
        inputs=scaled,
        target_ind=target.repeat(n_steps),
        additional_forward_args=repeat_rows(
            additional_forward_args, n_steps, target.shape[0]
        ),
    )
    totals = []
    for g in grads:
        weights = torch.tensor(step_sizes, dtype=g.dtype, device=g.device)
        weighted = g.contiguous().view(n_steps, -1) * weights.view(n_steps, 1)
        totals.append(
            _reshape_and_sum(weighted, n_steps, g.shape[0] // n_steps, g.shape[1:])
        )
    if not multiply_by_inputs:
        return tuple(t.detach() for t in totals)
    return tuple(
        (t * (x - b)).detach()
        for t, x, b in zip(totals, inputs, baselines, strict=True)
    )


def completeness_gap(
    forward_fn: Callable[..., Tensor],
    attributions: tuple[Tensor, ...],
    inputs: tuple[Tensor, ...],
    baselines: tuple[Tensor, ...],
    target: Tensor,
    additional_forward_args: tuple | None,
) -> Tensor:
    """``Σ attributions − (f_c(x) − f_c(x'))`` per sample (Captum's delta)."""
    args = additional_forward_args or ()
    with torch.no_grad():
        rows = torch.arange(target.shape[0], device=target.device)
        end = forward_fn(*inputs, *args)[rows, target]
        start = forward_fn(*baselines, *args)[rows, target]
        total = sum(a.reshape(a.shape[0], -1).sum(dim=1) for a in attributions)
    return total - (end - start)


def gradient_function(grad_kwargs: dict[str, Any]) -> Callable:
    """A gradient function with Captum's ``compute_gradients`` signature that
    passes ``grad_kwargs`` to :func:`torch.autograd.grad` (e.g.
    ``{"materialize_grads": True}`` for a layer the output does not depend on)."""
    kwargs = dict(grad_kwargs)

    def gradients(
        forward_fn: Callable[..., Tensor],
        inputs: tuple[Tensor, ...],
        target_ind: TargetType = None,
        additional_forward_args: object = None,
    ) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            # a tensor: forward_fn is synchronous (no torch.futures.Future)
            outputs = cast(
                Tensor,
                _run_forward(forward_fn, inputs, target_ind, additional_forward_args),
            )
            return torch.autograd.grad(torch.unbind(outputs), inputs, **kwargs)

    return gradients
