"""The demo's gating protocol: Feature-Gated TransMM's layers, κ, c_max and variant
are chosen on the validation images, by rules fixed here in code, before any test
image is scored; the test images are then scored once with the choice.

It follows the thesis (§7.3): first every variant on every block alone, on runs of
three adjacent blocks and on all blocks together, at κ = 0.5 and c_max = 10 (the
thesis's starting point); then κ × c_max on the best (layers, variant). SaCo
decides, as in the thesis's sweeps.
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
) -> GatingChoice:
    """Run the protocol on the validation ``images`` (two :func:`select_gating`
    runs under ``out``) and return the choice."""
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
        layers=layer_sets(list(saes)),
        kappas=[STAGE_ONE_KAPPA],
        c_maxs=[STAGE_ONE_C_MAX],
        variants=list(FeatureGatedTransMM.VARIANTS),
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
