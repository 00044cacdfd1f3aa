"""What activation and attribution patching share: their arguments (checked before
any model call), the clean run, the baselines in embedding space and the score F.

- :func:`check_prompts`, :func:`check_target`, :func:`check_baselines` and
  :func:`resolve_sites` turn the user's arguments into canonical forms or raise a
  ValueError / TypeError that names the argument.
- :func:`embedded_run` runs the prompts once (with the token embeddings replaced
  by a baseline, or not) and records the token embeddings, the activation of
  every site and the logits.
- :class:`Score` is F: the logit of a token at the last position, or the user's
  callable on the logits.
- :func:`baseline_embeddings` turns a checked baseline into embeddings (N, T, d).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from captum_faithful.lm._adapter import (
    LMAdapter,
    Site,
    capture_sites,
    replace_embeddings,
    transform_site,
)

#: The baselines given by name.
BASELINE_NAMES = ("unlearned", "random", "zero")

#: ``target(logits (M, T, V), prompts (M,)) -> (M,)``, see :class:`Score`.
TargetFunction = Callable[[Tensor, Tensor], Tensor]


def _embedding_matrix(adapter: LMAdapter) -> Tensor | None:
    """The token-embedding matrix, or None when the embedding module has none (the
    vocabulary and the embedding width are then checked by the model itself)."""
    try:
        return adapter.embedding_matrix
    except TypeError:
        return None


def _vocab_size(adapter: LMAdapter) -> int | None:
    matrix = _embedding_matrix(adapter)
    return None if matrix is None else matrix.shape[0]


def check_prompts(
    adapter: LMAdapter, input_ids: Any, name: str = "input_ids"
) -> Tensor:
    """Token ids (N, T) with N, T >= 1, integer, inside the vocabulary."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(
            f"`{name}` must be a LongTensor of token ids (N, T), got "
            f"{type(input_ids).__name__}"
        )
    if (
        input_ids.dtype == torch.bool
        or input_ids.is_floating_point()
        or input_ids.is_complex()
    ):
        raise TypeError(
            f"`{name}` must hold integer token ids, got dtype {input_ids.dtype}"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"`{name}` must have shape (N, T) (prompts of one length, no padding), "
            f"got shape {tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`{name}` must hold at least one prompt of at least one token, got "
            f"shape {tuple(input_ids.shape)}"
        )
    vocab = _vocab_size(adapter)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(
            f"`{name}` holds token ids outside the vocabulary [0, {vocab or 'V'}): "
            f"min {low}, max {high}"
        )
    return input_ids.long()


def check_target(
    adapter: LMAdapter, target: Any, n_prompts: int
) -> Tensor | TargetFunction | None:
    """None, token ids as a LongTensor (N,), or a callable ``(logits, prompts)``
    (a callable of one positional argument takes the logits alone)."""
    if target is None:
        return None
    if callable(target) and not isinstance(target, Tensor):
        if _takes_logits_only(target):
            return lambda logits, prompts: target(logits)
        return target
    if isinstance(target, bool) or (
        isinstance(target, Tensor)
        and (target.dtype == torch.bool or target.is_floating_point())
    ):
        raise TypeError(
            "`target` must be None, token ids (an int or an integer tensor of "
            f"shape (N,)) or a callable, got {target!r}"
        )
    if isinstance(target, numbers.Integral):
        tokens = torch.full((n_prompts,), int(target), dtype=torch.long)
    elif isinstance(target, Tensor) and not target.is_complex():
        if target.dim() == 0:
            tokens = target.long().expand(n_prompts).clone()
        elif target.shape == (n_prompts,):
            tokens = target.long()
        else:
            raise ValueError(
                f"`target` as a tensor must hold one token id or one per prompt "
                f"({n_prompts},), got shape {tuple(target.shape)}"
            )
    else:
        raise TypeError(
            "`target` must be None, token ids (an int or an integer tensor of "
            f"shape (N,)) or a callable, got {type(target).__name__}"
        )
    vocab = _vocab_size(adapter)
    if int(tokens.min()) < 0 or (vocab is not None and int(tokens.max()) >= vocab):
        raise ValueError(
            f"`target` holds token ids outside the vocabulary [0, {vocab or 'V'}): "
            f"{tokens.tolist()}"
        )
    return tokens


def _takes_logits_only(function: Callable) -> bool:
    """Whether ``function`` takes one positional argument (no second, no ``*args``)."""
    try:
        kinds = [p.kind for p in inspect.signature(function).parameters.values()]
    except (TypeError, ValueError):
        return False
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    return (
        inspect.Parameter.VAR_POSITIONAL not in kinds
        and sum(kind in positional for kind in kinds) == 1
    )


def check_baselines(
    adapter: LMAdapter, baselines: Any, input_ids: Tensor, allow_unlearned: bool
) -> str | Tensor:
    """A name of :data:`BASELINE_NAMES`, corrupted token ids (N, T), or embeddings
    (N, T, d) free of NaN/Inf."""
    if isinstance(baselines, str):
        if baselines not in BASELINE_NAMES:
            raise ValueError(
                f"`baselines` must be one of {BASELINE_NAMES}, token ids (N, T) or "
                f"embeddings (N, T, d), got {baselines!r}"
            )
        if baselines == "unlearned" and not allow_unlearned:
            raise ValueError(
                "`baselines='unlearned'` depends on UNI's hyperparameters: compute "
                "it with AttributionPatching(model, ...).compute_baselines("
                "input_ids) and pass that tensor, so that both methods start from "
                "the same baseline"
            )
        if baselines == "random" and _embedding_matrix(adapter) is None:
            raise TypeError(
                "`baselines='random'` draws from the statistics of the "
                "token-embedding matrix, but the embedding module "
                f"{type(adapter.embedding).__name__} has no 2-D `weight` or `W_E`; "
                "pass baseline embeddings (N, T, d) instead"
            )
        return baselines
    if not isinstance(baselines, Tensor):
        raise TypeError(
            f"`baselines` must be one of {BASELINE_NAMES}, a LongTensor of token ids "
            f"(N, T) or a float tensor of embeddings (N, T, d), got "
            f"{type(baselines).__name__}"
        )
    if not baselines.is_floating_point():
        if baselines.shape != input_ids.shape:
            raise ValueError(
                "`baselines` as token ids (a corrupted prompt) must have the shape "
                f"of `input_ids` {tuple(input_ids.shape)}, got "
                f"{tuple(baselines.shape)}"
            )
        return check_prompts(adapter, baselines, name="baselines")
    matrix = _embedding_matrix(adapter)
    width = "d" if matrix is None else matrix.shape[1]
    expected = (*input_ids.shape, width)
    if (
        baselines.dim() != 3
        or baselines.shape[:2] != input_ids.shape
        or (matrix is not None and baselines.shape[2] != width)
    ):
        raise ValueError(
            f"`baselines` as embeddings must have shape (N, T, d) = {expected}, got "
            f"{tuple(baselines.shape)}"
        )
    if not bool(torch.isfinite(baselines).all()):
        raise ValueError("`baselines` contains NaN or Inf values")
    return baselines.detach()


def resolve_sites(adapter: LMAdapter, sites: Any) -> list[Site]:
    """``"residual"`` (the adapter's residual sites), one site name, or a sequence
    of distinct names."""
    if isinstance(sites, str):
        if sites == "residual":
            return list(adapter.residual_sites.values())
        names = [sites]
    elif isinstance(sites, Sequence) and sites:
        names = list(sites)
    else:
        raise TypeError(
            "`sites` must be 'residual', a site name or a non-empty list of site "
            f"names, got {sites!r}"
        )
    if len(set(map(str, names))) != len(names):
        raise ValueError(f"`sites` must not repeat a name, got {names}")
    return [adapter.site(name) for name in names]


@dataclass(frozen=True)
class Run:
    """One run of the prompts: token embeddings (N, T, d), activations by site name and
    logits (N, T, V), all detached."""

    embeddings: Tensor
    activations: dict[str, Tensor]
    logits: Tensor


def embedded_run(
    adapter: LMAdapter,
    input_ids: Tensor,
    sites: Sequence[Site],
    embeddings: Tensor | None = None,
) -> Run:
    """One forward without gradients; ``embeddings`` (when given) replace the token
    embeddings. Site activations must be (N, T, ...)."""
    store: list[Tensor] = []

    def keep(value: Tensor) -> None:
        store.append(value)

    embedding_site = Site("embedding", adapter.embedding, "output")
    # hooks run in registration order: the embeddings are read, then replaced, and
    # only then seen by the sites (the embedding module may be a site itself)
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(transform_site(embedding_site, keep))
        if embeddings is not None:
            stack.enter_context(replace_embeddings(adapter, embeddings))
        activations = stack.enter_context(capture_sites(sites))
        logits = adapter.logits(input_ids)
    n_prompts, n_tokens = input_ids.shape
    if len(store) != 1:
        raise RuntimeError(
            f"the embedding module ran {len(store)} times in one forward pass; "
            "patching needs it to run once"
        )
    for site in sites:
        value = activations.get(site.name)
        if value is None or value.dim() < 2 or value.shape[:2] != (n_prompts, n_tokens):
            raise RuntimeError(
                f"site {site.name!r} must give an activation (N, T, ...) = "
                f"({n_prompts}, {n_tokens}, ...) once per forward, got "
                f"{None if value is None else tuple(value.shape)}"
            )
    check_logits(logits, n_prompts, n_tokens)
    return Run(
        store[-1].detach() if embeddings is None else embeddings,
        {name: value.detach() for name, value in activations.items()},
        logits.detach(),
    )


def check_logits(logits: Tensor, n_rows: int, n_tokens: int) -> None:
    if logits.dim() != 3 or logits.shape[:2] != (n_rows, n_tokens):
        raise RuntimeError(
            f"the model must return logits (N, T, V) = ({n_rows}, {n_tokens}, V), "
            f"got {tuple(logits.shape)}"
        )


class Score:
    r"""F: what patching measures on the logits (M, T, V) of M rows.

    Each row belongs to one prompt (``prompts[r]`` its index in ``input_ids``).
    With token ids (N,): the logit of prompt ``i``'s token at the last position.
    With a callable: ``target(logits, prompts)`` (M,) (see :func:`check_target`).
    """

    def __init__(self, target: Tensor | TargetFunction) -> None:
        self.target = target

    def __call__(self, logits: Tensor, prompts: Tensor) -> Tensor:
        if isinstance(self.target, Tensor):
            tokens = self.target.to(logits.device)[prompts]
            return logits[:, -1].gather(1, tokens.unsqueeze(1)).squeeze(1)
        scores = self.target(logits, prompts)
        if not isinstance(scores, Tensor) or scores.shape != (logits.shape[0],):
            raise ValueError(
                "`target` as a callable must return one score per row, shape "
                f"({logits.shape[0]},), got "
                f"{tuple(scores.shape) if isinstance(scores, Tensor) else scores!r}"
            )
        return scores


def explained_tokens(target: Tensor | TargetFunction | None, clean: Run) -> Tensor:
    """The token each prompt explains: ``target``'s ids, else the clean run's top
    token at the last position."""
    if isinstance(target, Tensor):
        return target.to(clean.logits.device)
    return clean.logits[:, -1].argmax(dim=1)


def random_embeddings(
    adapter: LMAdapter, shape: torch.Size, generator: torch.Generator | None
) -> Tensor:
    """I.i.d. Gaussian values with the mean and standard deviation of all entries
    of the token-embedding matrix."""
    matrix = adapter.embedding_matrix.detach()
    mean, std = matrix.float().mean(), matrix.float().std()
    device = generator.device if generator is not None else matrix.device
    noise = torch.randn(shape, generator=generator, device=device)
    return (mean.to(device) + std.to(device) * noise).to(matrix.device, matrix.dtype)


def baseline_embeddings(
    adapter: LMAdapter,
    baselines: str | Tensor,
    input_ids: Tensor,
    clean: Run,
    generator: torch.Generator | None,
    unlearned: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The baseline x' in embedding space (N, T, d), detached, on the prompts'
    device. ``unlearned`` computes the learned baseline from the explained tokens."""
    reference = clean.embeddings
    if isinstance(baselines, Tensor):
        if baselines.is_floating_point():
            return baselines.to(reference.device, reference.dtype)
        return embedded_run(adapter, baselines.to(input_ids.device), []).embeddings
    if baselines == "zero":
        return torch.zeros_like(reference)
    if baselines == "random":
        noise = random_embeddings(adapter, reference.shape, generator)
        return noise.to(reference.device, reference.dtype)
    # "unlearned": check_baselines allowed it only where the caller passes
    # ``unlearned``
    learned = cast(Callable[[Tensor], Tensor], unlearned)
    return learned(input_ids).detach().to(reference.device, reference.dtype)
