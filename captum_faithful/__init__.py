"""captum-faithful: faithful attribution methods and faithfulness metrics for Captum.

Every public class and function is re-exported here, so ``from captum_faithful
import X`` works for all of them; metrics also live in ``captum_faithful.metrics``
and attribution classes in ``captum_faithful.attr``.
"""

from captum_faithful.attr import *  # noqa: F401,F403
from captum_faithful.attr import __all__ as _attr_all
from captum_faithful.evaluation import (
    GatingConfiguration,
    GatingSelection,
    Results,
    evaluate,
    select_gating,
)
from captum_faithful.metrics import *  # noqa: F401,F403
from captum_faithful.metrics import __all__ as _metrics_all
from captum_faithful.sae import load_sae

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "GatingConfiguration",
    "GatingSelection",
    "Results",
    "evaluate",
    "load_sae",
    "select_gating",
    *_attr_all,
    *_metrics_all,
]
