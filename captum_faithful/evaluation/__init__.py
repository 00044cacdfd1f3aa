"""Dataset-scale evaluation: many methods × many metrics over a dataset, resumable
and sharded over torch.distributed ranks.

``evaluate`` runs it and returns ``Results``; ``select_gating`` runs one to choose
Feature-Gated TransMM's layers, κ, c_max and variant on validation images. pandas
(the ``evaluate`` extra) and pyarrow (optional: Parquet instead of CSV) are
imported only when a run writes or reads its tables.
"""

from captum_faithful.evaluation._core import evaluate
from captum_faithful.evaluation._selection import (
    GatingConfiguration,
    GatingSelection,
    select_gating,
)
from captum_faithful.evaluation.results import Results, WelchTest

__all__ = [
    "GatingConfiguration",
    "GatingSelection",
    "Results",
    "WelchTest",
    "evaluate",
    "select_gating",
]
