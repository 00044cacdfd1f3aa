"""Dataset-scale evaluation: many methods × many metrics over a dataset, resumable
and sharded over torch.distributed ranks.

``evaluate`` runs it and returns ``Results``; pandas and pyarrow are imported only
when a run writes or reads its tables.
"""

from captum_faithful.evaluation._core import evaluate
from captum_faithful.evaluation.results import Results, WelchTest

__all__ = ["Results", "WelchTest", "evaluate"]
