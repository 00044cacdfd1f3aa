"""The demo's gating protocol: Feature-Gated TransMM's layers, κ, c_max and variant
are chosen on the validation images, by rules fixed here in code, before any test
image is scored; the test images are then scored once with the choice.

It follows the thesis (§7.3): first every variant on every block alone, on runs of
three adjacent blocks and on all blocks together, at κ = 0.5 and c_max = 10 (the
thesis's starting point); then κ × c_max on the best (layers, variant). SaCo
decides, as in the thesis's sweeps.

That is the ``"all"`` protocol, the demo's. The ``"thesis"`` protocol restricts
stage 1 the way the thesis does: the combined score only (the thesis's method; the
activation and gradient scores are its ablations) and no SAE at the first or the
last block that has one (the thesis sweeps layers 2–10 of ViT-B's 12 and leaves
out the extreme ones, whose SAE features "often show poor reconstruction quality
and interpretability", §7.3; the last block of ViT-B, like the demo ViT's, has no
gradient at its patch tokens, so the last gated block is the one before it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from captum_faithful._utils import optional_import
from captum_faithful.attr import FeatureGatedTransMM
from captum_faithful.studies import (
    GatingConfiguration,
    GatingSelection,
    select_gating,
)

#: The metric that chooses.
METRIC = "saco"
#: Stage 1: every layer set and variant at the thesis's starting point.
STAGE_ONE_KAPPA = 0.5
STAGE_ONE_C_MAX = 10.0
#: Stage 2: the thesis's κ × c_max grid on the best layers and variant.
KAPPAS = (0.1, 0.5, 1.0)
C_MAXS = (2.0, 10.0, 50.0)
#: The protocols of :func:`choose_gating`: ``"all"`` (every variant, every block
#: with an SAE) and ``"thesis"`` (the combined score, the first and last blocks with
#: an SAE left out).
PROTOCOLS = ("all", "thesis")


def layer_sets(blocks: Sequence[int]) -> list[tuple[int, ...]]:
    """Every block alone, every run of three adjacent blocks, and all blocks."""
    blocks = sorted(blocks)
    sets: list[tuple[int, ...]] = [(block,) for block in blocks]
    sets += [
        tuple(blocks[i : i + 3])
        for i in range(len(blocks) - 2)
        if blocks[i + 2] - blocks[i] == 2
    ]
    if len(blocks) > 1 and tuple(blocks) not in sets:
        sets.append(tuple(blocks))
    return sets


def protocol_candidates(
    protocol: str, blocks: Sequence[int]
) -> tuple[list[tuple[int, ...]], list[str]]:
    """Stage 1's layer sets and variants under ``protocol``, for SAEs at ``blocks``.

    ``"all"``: :func:`layer_sets` of every block, every variant. ``"thesis"``: the
    :func:`layer_sets` of the blocks between the first and the last (both left
    out; at least three blocks are needed), the combined score only.

    Args:
        protocol (str): One of :data:`PROTOCOLS`.
        blocks (Sequence[int]): The 0-based blocks that have an SAE.

    Returns:
        tuple: ``(layer sets, variants)``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {PROTOCOLS}, got {protocol!r}")
    blocks = sorted(blocks)
    if protocol == "all":
        return layer_sets(blocks), list(FeatureGatedTransMM.VARIANTS)
    if len(blocks) < 3:
        raise ValueError(
            'the "thesis" protocol leaves out the first and the last block with an '
            f"SAE and needs at least one between them; the SAEs are at blocks {blocks}"
        )
    return layer_sets(blocks[1:-1]), ["combined"]


@dataclass(frozen=True)
class GatingChoice:
    """The configuration chosen on the validation images, and how.

    Attributes:
        configuration (GatingConfiguration): What the test images are scored with.
        stages (tuple[GatingSelection, ...]): Stage 1 (layer sets × variants) and
            stage 2 (κ × c_max), each with its whole validation table.
        n_images (int): Validation images each configuration was scored on.
    """

    configuration: GatingConfiguration
    stages: tuple[GatingSelection, ...]
    n_images: int

    @property
    def metric(self) -> str:
        return self.stages[-1].metric

    @property
    def score(self) -> float:
        """The chosen configuration's validation mean of :data:`METRIC`."""
        return self.stages[-1].score

    @property
    def baseline_score(self) -> float:
        """TransMM's validation mean of :data:`METRIC`."""
        return self.stages[-1].baseline_score

    def table(self) -> Any:
        """Both stages' tables in one DataFrame, with a ``stage`` column (1 or 2);
        TransMM's reference row appears once, from stage 1, and ``chosen`` marks
        the chosen row of the last stage (stage 1 holds the same configuration
        when κ and c_max stayed at the starting point)."""
        pd = optional_import("pandas", "demo")
        parts = []
        for number, stage in enumerate(self.stages, start=1):
            part = stage.table.copy()
            if number > 1:
                part = part[part["method"] != "transmm"]
            part.insert(0, "stage", number)
            last = number == len(self.stages)
            part["chosen"] = last & (part["method"] == self.configuration.name)
            parts.append(part)
        return pd.concat(parts, ignore_index=True)


def choose_gating(
    vit: nn.Module,
    saes: dict[int, Any],
    images: Tensor,
    out: str | os.PathLike,
    batch_size: int = 16,
    device: str | None = None,
    seed: int = 0,
    show_progress: bool = False,
    protocol: str = "all",
) -> GatingChoice:
    """Run the protocol on the validation ``images`` (two :func:`select_gating`
    runs under ``out``) and return the choice. ``protocol`` (one of
    :data:`PROTOCOLS`, default ``"all"``) decides stage 1's layer sets and
    variants (:func:`protocol_candidates`); stage 2 is the same for both."""
    layers, variants = protocol_candidates(protocol, list(saes))
    common: dict[str, Any] = dict(
        metric=METRIC,
        batch_size=batch_size,
        device=device,
        seed=seed,
        show_progress=show_progress,
    )
    first = select_gating(
        vit,
        saes,
        images,
        out=Path(out) / "stage1",
        layers=layers,
        kappas=[STAGE_ONE_KAPPA],
        c_maxs=[STAGE_ONE_C_MAX],
        variants=variants,
        **common,
    )
    second = select_gating(
        vit,
        saes,
        images,
        out=Path(out) / "stage2",
        layers=[first.configuration.layers],
        kappas=list(KAPPAS),
        c_maxs=list(C_MAXS),
        variants=[first.configuration.variant],
        **common,
    )
    return GatingChoice(second.configuration, (first, second), len(images))
