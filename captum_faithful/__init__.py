"""captum-faithful: faithful attribution methods and faithfulness metrics for Captum.

What a Captum user reaches for is importable from here (``from captum_faithful
import X``): every attribution method of :mod:`captum_faithful.attr`, every metric of
:mod:`captum_faithful.metrics`, the dataset-scale :func:`evaluate` with its
:class:`Results`, the studies :func:`select_gating` (with :class:`GatingConfiguration`
and :class:`GatingSelection`) and :func:`blank_image_diagnostic`, and
:func:`load_sae`. The rest lives in its subpackage:

- :mod:`captum_faithful.attr` and :mod:`captum_faithful.metrics`: the same methods
  and metrics, grouped as ``captum.attr`` and ``captum.metrics`` are;
- :mod:`captum_faithful.evaluation`: also ``WelchTest`` (what
  ``Results.compare`` returns);
- :mod:`captum_faithful.studies`: the same studies of one method;
- :mod:`captum_faithful.sae`: also ``sae_d_in`` and ``sae_hook_name``;
- :mod:`captum_faithful.vit`: Vision-Transformer adapters (``get_adapter``,
  ``register_adapter``, ``ViTAdapter``, ``SUPPORTED_FAMILIES``) and the context
  managers ``eager_attention`` and ``capture`` (which yields a ``Captured``);
- :mod:`captum_faithful.lm`: language-model adapters (``get_adapter``,
  ``register_adapter``, ``LMAdapter``, ``Site``, ``SUPPORTED_FAMILIES``);
- :mod:`captum_faithful.demo`: the embedded demo's data and trained models
  (``load_demo``, ``load_language_demo``, ``make_blocks`` and what they return:
  ``Demo``, ``LanguageDemo``, ``DigitBlocks``).

``vit`` and ``lm`` each have a ``get_adapter``, so their names stay in their
subpackages.
"""

from captum_faithful.attr import *  # noqa: F401,F403
from captum_faithful.attr import __all__ as _attr_all
from captum_faithful.evaluation import Results, evaluate
from captum_faithful.metrics import *  # noqa: F401,F403
from captum_faithful.metrics import __all__ as _metrics_all
from captum_faithful.sae import load_sae
from captum_faithful.studies import (
    GatingConfiguration,
    GatingSelection,
    blank_image_diagnostic,
    select_gating,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "GatingConfiguration",
    "GatingSelection",
    "Results",
    "blank_image_diagnostic",
    "evaluate",
    "load_sae",
    "select_gating",
    *_attr_all,
    *_metrics_all,
]
