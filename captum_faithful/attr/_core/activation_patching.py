"""Exact activation patching of a language model from a baseline in embedding space:
the reference that attribution patching approximates (UNI, Appendix A.2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_faithful._arguments import check_model_output
from captum_faithful._utils import check_int, preserve_model_state
from captum_faithful.attr._utils.patching import (
    Score,
    TargetFunction,
    baseline_embeddings,
    check_baselines,
    check_logits,
    check_prompts,
    check_target,
    embedded_run,
    explained_tokens,
    resolve_sites,
)
from captum_faithful.lm import get_adapter
from captum_faithful.lm._adapter import replace_embeddings, replace_site_values


@log_usage()
def activation_patching(
    model: nn.Module,
    input_ids: Tensor,
    baselines: str | Tensor,
    target: int | Tensor | TargetFunction | None = None,
    sites: str | list[str] = "residual",
    chunk_size: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""
    Activation patching measures how much one activation of the prompt's run
    carries: the model runs on a baseline :math:`x'`, one activation :math:`e` (one
    site, one token) is replaced by its value on the prompt :math:`x`, and the
    change of the score :math:`F` is recorded:

    .. math::
        A^{\mathrm{ACT}}_e = F(x' \mid e \leftarrow e(x)) - F(x')

    One patched forward per (site, token) and prompt, exact: the reference
    :class:`~captum_faithful.AttributionPatching` approximates from one forward and
    one backward. The patched copies of the baseline run are batched,
    ``chunk_size`` rows per forward, under ``torch.no_grad()``. Baselines replace
    the output of the token-embedding module (positional embeddings, if any, are
    still added by the model), as in :class:`~captum_faithful.AttributionPatching`,
    so both can start from the same :math:`x'`. Prompts in one call share one
    length; there is no padding or attention mask. The model comes back unchanged.

    Args:

        model (nn.Module): A decoder-only language model of a family
                    :func:`captum_faithful.lm.get_adapter` knows.
        input_ids (Tensor): Token ids (N, T) of N prompts of one length T.
        baselines (str or Tensor): The baseline :math:`x'`: a LongTensor of
                    corrupted prompts (N, T) (their token embeddings), embeddings
                    (N, T, d) (e.g. ``AttributionPatching(model)
                    .compute_baselines(input_ids)``, UNI's learned baseline),
                    ``"random"`` (i.i.d. Gaussian embeddings with the mean and
                    standard deviation of all entries of the token-embedding
                    matrix) or ``"zero"``. ``"unlearned"`` is not accepted here:
                    it depends on UNI's hyperparameters, so compute it with
                    :meth:`AttributionPatching.compute_baselines` and pass it.
        target (int, Tensor, or Callable, optional): :math:`F`, as in
                    :meth:`AttributionPatching.attribute`: None (the logit at the
                    last position of the clean run's top token), token ids (int or
                    (N,)), or a callable ``target(logits (M, T, V), prompts (M,))
                    -> (M,)`` (or ``target(logits)``).
                    Default: None
        sites (str or list[str], optional): As in
                    :class:`~captum_faithful.AttributionPatching`.
                    Default: ``"residual"``
        chunk_size (int, optional): Patched rows per forward (>= 1); memory
                    grows with it.
                    Default: 64
        generator (torch.Generator, optional): Random source of
                    ``baselines="random"``.
                    Default: None (the global generator)

    Returns:
        *Tensor* of shape (N, n_sites, T), :math:`A^{\mathrm{ACT}}_e` per prompt, site and
        token.

    Examples::

        >>> ids = tokenizer(["The capital of France is"], return_tensors="pt")
        >>> corrupted = tokenizer(["The capital of Italy is"], return_tensors="pt")
        >>> effects = activation_patching(model, ids.input_ids, corrupted.input_ids)
    """
    adapter = get_adapter(model)
    input_ids = check_prompts(adapter, input_ids)
    checked_baselines = check_baselines(
        adapter, baselines, input_ids, allow_unlearned=False
    )
    checked_target = check_target(adapter, target, input_ids.shape[0])
    site_list = resolve_sites(adapter, sites)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator, got {type(generator).__name__}"
        )
    n_prompts, n_tokens = input_ids.shape
    with preserve_model_state(model), torch.no_grad():
        clean = embedded_run(adapter, input_ids, site_list)
        check_model_output(clean.logits, "activation_patching")
        tokens = explained_tokens(checked_target, clean)
        score = Score(checked_target if callable(checked_target) else tokens)
        baseline = baseline_embeddings(
            adapter, checked_baselines, input_ids, clean, generator
        )
        base = embedded_run(adapter, input_ids, [], baseline)
        prompts = torch.arange(n_prompts, device=input_ids.device)
        base_scores = score(base.logits, prompts)
        # one row per (prompt, site, token), prompt-major
        rows = torch.cartesian_prod(
            prompts,
            torch.arange(len(site_list), device=input_ids.device),
            torch.arange(n_tokens, device=input_ids.device),
        ).view(-1, 3)
        effects = torch.empty(
            n_prompts, len(site_list), n_tokens, dtype=base_scores.dtype,
            device=base_scores.device,
        )  # fmt: skip
        for start in range(0, rows.shape[0], chunk_size):
            chunk = rows[start : start + chunk_size]
            row_prompts = chunk[:, 0]
            writers = [
                _patch(clean.activations[site.name], chunk, index)
                for index, site in enumerate(site_list)
            ]
            with (
                replace_embeddings(adapter, baseline[row_prompts]),
                replace_site_values(site_list, writers),
            ):
                logits = adapter.logits(input_ids[row_prompts])
            check_logits(logits, chunk.shape[0], n_tokens)
            patched = score(logits, row_prompts)
            effects[row_prompts, chunk[:, 1], chunk[:, 2]] = (
                patched - base_scores[row_prompts]
            )
    return effects


def _patch(clean: Tensor, chunk: Tensor, site_index: int) -> Callable[[Tensor], Tensor]:
    """The hook of one site: rows of ``chunk`` that patch this site get the clean
    activation at their token; the other rows keep theirs."""
    mine = chunk[chunk[:, 1] == site_index]
    rows = (chunk[:, 1] == site_index).nonzero().flatten()

    def write(value: Tensor) -> Tensor:
        if rows.numel() == 0:
            return value
        patched = value.clone()
        patched[rows, mine[:, 2]] = clean[mine[:, 0], mine[:, 2]].to(value.dtype)
        return patched

    return write
