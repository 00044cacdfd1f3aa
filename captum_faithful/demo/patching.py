"""The UNI paper's Table 8 in miniature: how close attribution patching comes to
exact activation patching, from a baseline learned by UNI, a random one, the zero
embeddings and the counterfactual prompt.

For every baseline the same :math:`x'` (token embeddings) goes to both
:meth:`~captum_faithful.AttributionPatching.attribute` and
:func:`~captum_faithful.activation_patching`; the distance between the two
(layer × token) matrices is :func:`~captum_faithful.metrics.patching_distance`, per
prompt, and the order agreement :func:`~captum_faithful.metrics.patching_rank_correlation`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from captum_faithful._utils import check_choice, check_float, check_int, first_tensor

#: The baselines measured, in the report's order.
BASELINES = ("unlearned", "random", "zero", "corrupted")
#: How the report names them.
BASELINE_LABELS = {
    "unlearned": "UNI (learned)",
    "random": "random",
    "zero": "zero embeddings",
    "corrupted": "counterfactual prompt",
}


@dataclass
class PatchingMeasurement:
    """What :func:`measure_patching` measured, per prompt.

    ``exact[b]`` is activation patching from baseline ``b`` (N, n_sites, T),
    ``approx[b, n]`` attribution patching from the same baseline with ``n`` path
    points; ``distance``, ``relative_distance`` (the distance divided by the L2
    norm of the exact matrix) and ``rank_correlation`` are (N,) float64 tensors per
    ``(b, n)``; ``baseline_distance[b]`` is :math:`\\lVert x' - E(x) \\rVert_2`
    per prompt. ``seconds`` holds the wall seconds of each baseline's work.
    """

    site_names: list[str]
    n_steps: tuple[int, ...]
    baselines: tuple[str, ...]
    exact: dict[str, Tensor]
    approx: dict[tuple[str, int], Tensor]
    distance: dict[tuple[str, int], Tensor]
    relative_distance: dict[tuple[str, int], Tensor]
    rank_correlation: dict[tuple[str, int], Tensor]
    baseline_distance: dict[str, Tensor]
    settings: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return int(next(iter(self.exact.values())).shape[0])

    def welch_against_random(self, baseline: str, n_steps: int) -> tuple[float, float]:
        """Welch's t and two-sided p of ``baseline``'s distances against the random
        baseline's, at ``n_steps`` (NaN when undefined or random was not run)."""
        from captum_faithful.evaluation.results import welch_test

        if ("random", n_steps) not in self.distance or baseline == "random":
            return math.nan, math.nan
        statistic, _, pvalue = welch_test(
            self.distance[baseline, n_steps].tolist(),
            self.distance["random", n_steps].tolist(),
        )
        return statistic, pvalue

    def unlearned_below_random(self, n_steps: int) -> bool | None:
        """Whether the mean distance from UNI's baseline is below the random
        baseline's at ``n_steps`` (None when either was not measured)."""
        keys = [("unlearned", n_steps), ("random", n_steps)]
        if not all(key in self.distance for key in keys):
            return None
        unlearned, random = (float(self.distance[key].mean()) for key in keys)
        return unlearned < random

    def summary(self) -> list[dict]:
        """One row per baseline and ``n_steps``: means and standard errors over the
        prompts (NaN correlations left out) and Welch's test against random."""
        rows = []
        for baseline in self.baselines:
            for n in self.n_steps:
                key = (baseline, n)
                statistic, pvalue = self.welch_against_random(baseline, n)
                row = {"baseline": baseline, "n_steps": n}
                for name, values in (
                    ("distance", self.distance[key]),
                    ("relative_distance", self.relative_distance[key]),
                    ("rank_correlation", self.rank_correlation[key]),
                    ("baseline_distance", self.baseline_distance[baseline]),
                ):
                    row[name], row[f"{name}_sem"] = mean_sem(values)
                row["t_vs_random"], row["p_vs_random"] = statistic, pvalue
                rows.append(row)
        return rows


def mean_sem(values: Tensor) -> tuple[float, float]:
    """Mean and standard error (unbiased s / sqrt(n)) of the finite values."""
    finite = values[torch.isfinite(values)].double()
    n = finite.numel()
    if n == 0:
        return math.nan, math.nan
    mean = float(finite.mean())
    sem = float(finite.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return mean, sem


def measure_patching(
    model: nn.Module,
    input_ids: Tensor,
    corrupted_ids: Tensor | None = None,
    baselines: tuple[str, ...] = BASELINES,
    n_steps: tuple[int, ...] = (1, 16),
    unlearning_step: float = 1.0,
    pgd_steps: int = 10,
    epsilon: float = 0.25,
    pgd_step_size: float = 0.1,
    seed: int = 0,
    chunk_size: int = 256,
) -> PatchingMeasurement:
    r"""Attribution patching against exact activation patching on the residual
    stream, from each baseline, for the prompts ``input_ids``.

    For every baseline the token embeddings :math:`x'` are computed once with
    :meth:`~captum_faithful.AttributionPatching.compute_baselines` (UNI's learned
    baseline, random Gaussian embeddings drawn from a generator seeded with
    ``seed``, zero embeddings, or the embeddings of ``corrupted_ids``) and passed to
    both methods, so both start from the same point; :math:`F` is the logit of the
    clean run's top token at the last position (the paper's choice).

    Args:
        model (nn.Module): A decoder-only language model
            :func:`captum_faithful.lm.get_adapter` knows.
        input_ids (Tensor): Prompts (N, T), one length.
        corrupted_ids (Tensor, optional): Counterfactual prompts (N, T), needed
            for the ``"corrupted"`` baseline. Default: None
        baselines (tuple of str, optional): Among :data:`BASELINES`.
            Default: all four
        n_steps (tuple of int, optional): Path points of attribution patching
            (1 is plain attribution patching). Default: (1, 16)
        unlearning_step (float, optional): UNI's :math:`\eta`. Default: 1.0
        pgd_steps (int, optional): UNI's :math:`T`. Default: 10
        epsilon (float, optional): UNI's :math:`\varepsilon`. Default: 0.25
        pgd_step_size (float, optional): UNI's :math:`\mu`. Default: 0.1
        seed (int, optional): Seed of the random baseline. Default: 0
        chunk_size (int, optional): Patched rows per forward of activation
            patching. Default: 256

    Returns:
        PatchingMeasurement: the matrices and the per-prompt distances.

    Examples::

        >>> from captum_faithful.demo import load_language_demo
        >>> from captum_faithful.demo.patching import measure_patching
        >>> lm = load_language_demo(quick=True)
        >>> result = measure_patching(lm.model, lm.input_ids, lm.corrupted_ids)
        >>> result.summary()[0]["distance"]
    """
    from captum_faithful import AttributionPatching, activation_patching
    from captum_faithful.metrics import patching_distance, patching_rank_correlation

    if not isinstance(input_ids, Tensor):
        raise TypeError(
            f"`input_ids` must be a tensor (N, T), got {type(input_ids).__name__}"
        )
    if isinstance(baselines, str) or not baselines:
        raise ValueError(
            f"`baselines` must be a non-empty tuple of {BASELINES}, got {baselines!r}"
        )
    baselines = tuple(check_choice("baselines", b, BASELINES) for b in baselines)
    if isinstance(n_steps, int) or not n_steps:
        raise ValueError(
            f"`n_steps` must be a non-empty tuple of integers >= 1, got {n_steps!r}"
        )
    n_steps = tuple(check_int("n_steps", n, minimum=1) for n in n_steps)
    if "corrupted" in baselines:
        if not isinstance(corrupted_ids, Tensor):
            raise TypeError(
                "`corrupted_ids` must be a tensor (N, T) when `baselines` holds "
                f"'corrupted', got {type(corrupted_ids).__name__}"
            )
        if corrupted_ids.shape != input_ids.shape:
            raise ValueError(
                "`corrupted_ids` must have the shape of `input_ids`, got "
                f"{tuple(corrupted_ids.shape)} and {tuple(input_ids.shape)}"
            )
    seed = check_int("seed", seed, minimum=0)
    check_float("epsilon", epsilon, low=0.0, low_inclusive=False, finite=True)
    patching = AttributionPatching(
        model,
        unlearning_step=unlearning_step,
        pgd_steps=pgd_steps,
        epsilon=epsilon,
        pgd_step_size=pgd_step_size,
    )
    with torch.no_grad():
        clean = first_tensor(patching.adapter.embedding(input_ids))
    exact, approx = {}, {}
    distance, relative, rank, baseline_distance = {}, {}, {}, {}
    seconds = {}
    for baseline in baselines:
        started = time.perf_counter()
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        # corrupted_ids is a tensor when baselines holds "corrupted" (checked above)
        spec = cast(Tensor, corrupted_ids) if baseline == "corrupted" else baseline
        x_prime = patching.compute_baselines(
            input_ids, baselines=spec, generator=generator
        ).detach()
        baseline_distance[baseline] = (
            (x_prime - clean).flatten(1).double().norm(dim=1).cpu()
        )
        exact[baseline] = activation_patching(
            model, input_ids, x_prime, chunk_size=chunk_size
        ).detach()
        scale = exact[baseline].flatten(1).double().norm(dim=1).cpu()
        for n in n_steps:
            key = (baseline, n)
            approx[key] = patching.attribute(
                input_ids, baselines=x_prime, n_steps=n
            ).detach()
            distance[key] = patching_distance(approx[key], exact[baseline]).cpu()
            relative[key] = distance[key] / scale
            rank[key] = patching_rank_correlation(approx[key], exact[baseline]).cpu()
        seconds[baseline] = time.perf_counter() - started
    return PatchingMeasurement(
        site_names=patching.site_names,
        n_steps=n_steps,
        baselines=baselines,
        exact=exact,
        approx=approx,
        distance=distance,
        relative_distance=relative,
        rank_correlation=rank,
        baseline_distance=baseline_distance,
        settings={
            "unlearning_step": unlearning_step,
            "pgd_steps": pgd_steps,
            "epsilon": epsilon,
            "pgd_step_size": pgd_step_size,
            "seed": seed,
        },
        seconds=seconds,
    )
