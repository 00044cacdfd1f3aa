"""Dataset-scale evaluation: many methods × many metrics over a dataset, resumable
and sharded over torch.distributed ranks.

``evaluate`` runs it and returns ``Results``. The runner knows no attribution method
or metric: it calls the ones it is given (choosing one method's settings with it is
a study, :func:`captum_faithful.studies.select_gating`). pandas
(the ``evaluate`` extra) and pyarrow (optional: Parquet instead of CSV) are
imported only when a run writes or reads its tables.
"""

from captum_faithful.evaluation._core import evaluate
from captum_faithful.evaluation.results import Results, WelchTest

__all__ = [
    "Results",
    "WelchTest",
    "evaluate",
]
