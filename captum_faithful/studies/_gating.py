"""Choosing Feature-Gated TransMM's layers, κ, c_max and variant on validation
images, as the thesis does (§7.3), on top of :func:`captum_faithful.evaluate`.

The search runs the method (:class:`~captum_faithful.attr.FeatureGatedTransMM`,
with its SAEs and the ViT adapter for the patch size) through the generic runner and
scores it with the metrics; it lives with the studies, above all of them, so that
the runner stays free of any one method.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from captum_faithful._utils import check_float, optional_import
from captum_faithful.attr import FeatureGatedTransMM, TransMM
from captum_faithful.evaluation import _settings
from captum_faithful.evaluation._core import evaluate
from captum_faithful.evaluation.results import Results
from captum_faithful.metrics import (
    deletion_auc,
    faithfulness_correlation,
    insertion_auc,
    patch_mask,
    saco,
)
from captum_faithful.metrics._utils import metric_reading
from captum_faithful.sae import load_sae
from captum_faithful.vit import get_adapter

#: Metrics ``select_gating`` knows by name; each carries its direction
#: (``higher_is_better``).
METRICS: dict[str, Callable] = {
    metric.__name__: metric
    for metric in (saco, faithfulness_correlation, insertion_auc, deletion_auc)
}
#: The method name of the ungated TransMM row of every selection table.
BASELINE = "transmm"


@dataclass(frozen=True)
class GatingConfiguration:
    """One point of the grid: the gated blocks, κ, c_max and the score variant.

    Attributes:
        layers (tuple[int, ...]): The 0-based blocks that are gated, sorted.
        kappa (float): Gate temperature κ.
        c_max (float): Largest gate.
        variant (str): ``"combined"``, ``"activation"`` or ``"gradient"``.
    """

    layers: tuple[int, ...]
    kappa: float
    c_max: float
    variant: str

    @property
    def name(self) -> str:
        """The method name of this configuration in the evaluation table."""
        blocks = "+".join(str(layer) for layer in self.layers)
        return (
            f"layers={blocks} kappa={self.kappa!r} c_max={self.c_max!r} "
            f"variant={self.variant}"
        )

    def explainer(
        self,
        model: nn.Module,
        saes: Mapping[int, Any],
        shuffle_decoder: int | None = None,
        start_layer: int = 0,
    ) -> FeatureGatedTransMM:
        """A :class:`FeatureGatedTransMM` with this configuration.

        Args:
            model (nn.Module): The Vision Transformer.
            saes (Mapping[int, SAE | str | tuple[str, str]]): SAEs by block; only
                        the blocks of :attr:`layers` are used.
            shuffle_decoder (int, optional): Seed of the shuffled-decoder control.
                        Default: None
            start_layer (int, optional): First block of the rollout. Default: 0
        """
        missing = [layer for layer in self.layers if layer not in saes]
        if missing:
            raise ValueError(
                f"`saes` has no SAE for blocks {missing} of the configuration "
                f"{self.name!r}; it has blocks {sorted(saes)}"
            )
        return FeatureGatedTransMM(
            model,
            {layer: saes[layer] for layer in self.layers},
            kappa=self.kappa,
            c_max=self.c_max,
            variant=self.variant,
            start_layer=start_layer,
            shuffle_decoder=shuffle_decoder,
        )


@dataclass(frozen=True)
class GatingSelection:
    """What :func:`select_gating` chose, and the validation table it chose from.

    Attributes:
        configuration (GatingConfiguration): The chosen configuration: the best
                    mean of ``metric`` over the validation images among the gated
                    rows (ties go to the first in grid order).
        metric (str): The metric's name.
        higher_is_better (bool): The metric's direction.
        score (float): The chosen configuration's validation mean.
        baseline_score (float): TransMM's validation mean on the same images.
        table (pandas.DataFrame): One row per method, TransMM first, then the grid
                    in order (layers, variant, κ, c_max): ``method``, ``layers``,
                    ``kappa``, ``c_max``, ``variant`` (empty/NaN for TransMM),
                    ``n`` (non-NaN values), ``mean``, ``sem``, ``improvement`` (in
                    % of TransMM's mean, positive = better in the metric's
                    direction), ``seconds`` (explanation time per image) and
                    ``chosen``.
        results (Results): The per-image rows of the run, e.g. for
                    ``results.compare(selection.configuration.name, "transmm",
                    metric)``.
    """

    configuration: GatingConfiguration
    metric: str
    higher_is_better: bool
    score: float
    baseline_score: float
    table: Any
    results: Results

    @property
    def improvement(self) -> float:
        """The chosen configuration's improvement over TransMM, in %."""
        return _improvement(self.score, self.baseline_score, self.higher_is_better)

    def explainer(
        self,
        model: nn.Module,
        saes: Mapping[int, Any],
        shuffle_decoder: int | None = None,
        start_layer: int = 0,
    ) -> FeatureGatedTransMM:
        """The chosen configuration as a :class:`FeatureGatedTransMM` (see
        :meth:`GatingConfiguration.explainer`)."""
        return self.configuration.explainer(
            model, saes, shuffle_decoder=shuffle_decoder, start_layer=start_layer
        )


class _PatchMetric:
    """A metric of :mod:`captum_faithful.metrics` with one feature per ViT patch
    (the thesis scores patch-level attributions on patches, §7.2)."""

    def __init__(self, metric: Callable, patch_size: tuple[int, int]) -> None:
        self.metric = metric
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))

    def __call__(
        self,
        forward_func: Callable,
        inputs: Tensor,
        attributions: Tensor,
        target: Any = None,
    ) -> Tensor:
        return self.metric(
            forward_func,
            inputs,
            attributions,
            target=target,
            feature_mask=patch_mask(inputs, self.patch_size),
        )


class _Candidate:
    """One explainer of the grid for :func:`evaluate`. Its description (the run's
    fingerprint) holds the configuration and a digest of the SAEs' weights, so a
    resumed run with other SAEs is refused instead of mixed."""

    def __init__(self, explainer: TransMM, sae_sha256: str) -> None:
        self.explainer = explainer
        self.sae_sha256 = sae_sha256

    def attribute(self, inputs: Tensor, target: Any = None) -> Tensor:
        return self.explainer.attribute(inputs, target=target)


def select_gating(
    model: nn.Module,
    saes: Mapping[int, Any],
    data: DataLoader | Tensor,
    out: str | os.PathLike,
    metric: str | Callable = "saco",
    layers: Sequence[int | Sequence[int]] | None = None,
    kappas: Sequence[float] = (0.1, 0.5, 1.0),
    c_maxs: Sequence[float] = (2.0, 10.0, 50.0),
    variants: Sequence[str] = ("combined",),
    higher_is_better: bool | None = None,
    start_layer: int = 0,
    batch_size: int = 16,
    target: str = "predicted",
    resume: bool = True,
    show_progress: bool = False,
    device: str | torch.device | None = None,
    seed: int | None = 0,
) -> GatingSelection:
    r"""Choose the gated layers, κ, c_max and variant of Feature-Gated TransMM on
    validation images, by the mean of one faithfulness metric.

    The thesis does not fix these hyperparameters: it sweeps them per dataset on a
    validation split and scores the held-out test images once, with the chosen
    configuration (§7.3–7.4). This function is that sweep. Every configuration of
    the grid ``layers × variants × kappas × c_maxs`` explains every validation
    image; the metric scores each explanation; the configuration with the best
    mean wins. The ungated :class:`TransMM` is scored on the same images as the
    reference row of the table (it is never chosen: compare ``score`` with
    ``baseline_score``).

    The work is one :func:`captum_faithful.evaluate` run under ``out``: it is
    resumable (a killed sweep continues where it stopped, with the same settings),
    and under ``torchrun`` every rank takes a disjoint share of the batches and
    every rank returns the same selection. Afterwards, score the test images once
    with ``selection.explainer(model, saes)`` and, as the thesis's control, the
    combined score at the same blocks, κ and c_max with shuffled decoders
    (``dataclasses.replace(selection.configuration, variant="combined")
    .explainer(model, saes, shuffle_decoder=0)``; the other two scores do not
    depend on the decoder's feature order); choosing on the test images
    themselves would overstate the gain.

    .. math::
        (\mathcal{L}, \kappa, c_{max}, v)^\star = \arg\max_{\text{grid}}
        \frac{1}{|V|} \sum_{x \in V} m\big(x, \text{FG-TransMM}_{\mathcal{L},
        \kappa, c_{max}, v}(x)\big)

    (arg min for a metric where lower is better).

    Args:
        model (nn.Module): The Vision Transformer (e.g. a Hugging Face
                    ``ViTForImageClassification``), also the forward function of
                    the metrics; call ``model.eval()`` first.
        saes (Mapping[int, SAE | str | tuple[str, str]]): ``{0-based block: SAE}``
                    as for :class:`FeatureGatedTransMM`; folders and
                    ``(release, sae_id)`` pairs are loaded once with
                    :func:`captum_faithful.load_sae`.
        data (DataLoader or Tensor): The validation images: a loader as for
                    :func:`captum_faithful.evaluate` (map-style, in order), or a
                    tensor ``(N, C, H, W)`` batched by ``batch_size``.
        out (str or os.PathLike): The folder of the run (see ``evaluate``).
        metric (str or Callable, optional): ``"saco"``,
                    ``"faithfulness_correlation"``, ``"insertion_auc"`` or
                    ``"deletion_auc"`` — scored with one feature per patch of the
                    model, as in the thesis — or any callable ``(forward_func,
                    inputs, attributions, target=...) -> (N,)`` values, with
                    ``higher_is_better``. Default: ``"saco"``
        layers (Sequence[int or Sequence[int]], optional): The block sets to try;
                    an int is a single block. Every block must have an SAE.
                    Default: None (each block of ``saes`` alone, and all of them
                    together)
        kappas (Sequence[float], optional): Gate temperatures, each > 0.
                    Default: (0.1, 0.5, 1.0)
        c_maxs (Sequence[float], optional): Largest gates, each >= 1 (1 makes
                    every gate 1, i.e. TransMM). Default: (2.0, 10.0, 50.0)
        variants (Sequence[str], optional): Scores among ``"combined"``,
                    ``"activation"``, ``"gradient"``. Default: ("combined",)
        higher_is_better (bool, optional): The direction of a callable
                    ``metric`` (required then); for a named metric it must be
                    None or agree. Default: None
        start_layer (int, optional): First block of the rollout. Default: 0
        batch_size (int, optional): Images per batch when ``data`` is a tensor.
                    Default: 16
        target (str, optional): ``"predicted"`` or ``"label"`` (see
                    ``evaluate``). Default: ``"predicted"``
        resume (bool, optional): Continue a run recorded under ``out``.
                    Default: True
        show_progress (bool, optional): A progress bar over the batches.
                    Default: False
        device (str or torch.device, optional): Where the inputs go (see
                    ``evaluate``). Default: None
        seed (int, optional): Base seed of the per-batch generators (see
                    ``evaluate``). Default: 0

    Returns:
        GatingSelection: ``configuration`` (the choice), ``score``,
        ``baseline_score``, ``improvement``, ``table`` (the whole validation
        table, one row per configuration), ``results`` (per-image rows) and
        ``explainer(model, saes)``.

    Examples::

        >>> from transformers import ViTForImageClassification
        >>> from captum_faithful import load_sae, select_gating
        >>> model = ViTForImageClassification.from_pretrained(name).eval()
        >>> saes = {l: load_sae((release, f"blocks.{l}.hook_resid_post"))
        ...         for l in (4, 6, 8)}
        >>> selection = select_gating(
        ...     model, saes, validation_pixel_values, out="runs/gating",
        ...     layers=[4, 6, 8, (4, 6, 8)], variants=["combined", "activation"])
        >>> selection.configuration, selection.improvement
        >>> print(selection.table.to_string())
        >>> explainer = selection.explainer(model, saes)   # for the test images
        >>> # the thesis's control: the combined score, shuffled decoders
        >>> combined = dataclasses.replace(selection.configuration, variant="combined")
        >>> control = combined.explainer(model, saes, shuffle_decoder=0)
    """
    metric_name, metric_function, higher = _check_metric(metric, higher_is_better)
    kappas = _check_grid("kappas", kappas, _check_kappa)
    c_maxs = _check_grid("c_maxs", c_maxs, _check_c_max)
    variants = _check_grid("variants", variants, _check_variant)
    blocks = _check_sae_blocks(saes)
    layer_sets = _check_layers(layers, blocks)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be the Vision Transformer (an nn.Module), got "
            f"{type(model).__name__}"
        )
    loader = _as_loader(data, batch_size)
    used = sorted({block for layer_set in layer_sets for block in layer_set})
    loaded = {block: load_sae(saes[block]) for block in used}

    if metric_function is None:
        patch_size = get_adapter(model).patch_size
        metric_function = _PatchMetric(METRICS[metric_name], patch_size)
    digest = _settings.tensor_digest(
        {
            f"{layer}.{key}": value
            for layer, sae in loaded.items()
            for key, value in sae.state_dict().items()
        }
    )
    grid = [
        GatingConfiguration(layer_set, kappa, c_max, variant)
        for layer_set, variant, kappa, c_max in product(
            layer_sets, variants, kappas, c_maxs
        )
    ]
    explainers: dict[str, Any] = {
        BASELINE: _Candidate(TransMM(model, start_layer=start_layer), digest)
    }
    for configuration in grid:
        explainers[configuration.name] = _Candidate(
            configuration.explainer(model, loaded, start_layer=start_layer), digest
        )
    results = evaluate(
        model,
        loader,
        explainers=explainers,
        metrics={metric_name: metric_function},
        out=out,
        target=target,
        resume=resume,
        show_progress=show_progress,
        device=device,
        seed=seed,
    )
    return _selection(results, grid, metric_name, higher)


def _selection(
    results: Results,
    grid: list[GatingConfiguration],
    metric: str,
    higher_is_better: bool,
) -> GatingSelection:
    pd = optional_import("pandas", "evaluate")
    summary = results.summary()
    baseline = summary.loc[(BASELINE, metric)]
    records = [
        {
            "method": BASELINE,
            "layers": (),
            "kappa": math.nan,
            "c_max": math.nan,
            "variant": "",
            "n": int(baseline["n"]),
            "mean": float(baseline["mean"]),
            "sem": float(baseline["sem"]),
            "improvement": 0.0,
            "seconds": float(baseline["seconds"]),
        }
    ]
    best: GatingConfiguration | None = None
    best_mean = math.nan
    for configuration in grid:
        row = summary.loc[(configuration.name, metric)]
        mean = float(row["mean"])
        records.append(
            {
                "method": configuration.name,
                "layers": configuration.layers,
                "kappa": configuration.kappa,
                "c_max": configuration.c_max,
                "variant": configuration.variant,
                "n": int(row["n"]),
                "mean": mean,
                "sem": float(row["sem"]),
                "improvement": _improvement(
                    mean, float(baseline["mean"]), higher_is_better
                ),
                "seconds": float(row["seconds"]),
            }
        )
        if math.isnan(mean):
            continue
        better = mean > best_mean if higher_is_better else mean < best_mean
        if best is None or better:
            best, best_mean = configuration, mean
    if best is None:
        raise ValueError(
            f"the metric {metric!r} is NaN on every validation image for every "
            "configuration; nothing can be chosen"
        )
    table = pd.DataFrame.from_records(records)
    table["chosen"] = table["method"] == best.name
    return GatingSelection(
        configuration=best,
        metric=metric,
        higher_is_better=higher_is_better,
        score=best_mean,
        baseline_score=float(baseline["mean"]),
        table=table,
        results=results,
    )


def _improvement(score: float, baseline: float, higher_is_better: bool) -> float:
    if baseline == 0 or math.isnan(baseline) or math.isnan(score):
        return math.nan
    change = (score - baseline) if higher_is_better else (baseline - score)
    return 100.0 * change / abs(baseline)


def _check_metric(
    metric: Any, higher_is_better: Any
) -> tuple[str, Callable | None, bool]:
    if higher_is_better is not None and not isinstance(higher_is_better, bool):
        raise TypeError(
            f"`higher_is_better` must be a bool or None, got {higher_is_better!r}"
        )
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(
                f"`metric` must be one of {tuple(METRICS)} or a callable, got "
                f"{metric!r}"
            )
        direction = metric_reading(METRICS[metric])[1]
        if higher_is_better is not None and higher_is_better != direction:
            raise ValueError(
                f"`higher_is_better={higher_is_better}` contradicts the metric "
                f"{metric!r}, for which {'higher' if direction else 'lower'} is "
                "better; leave it None"
            )
        return metric, None, direction
    if callable(metric):
        if higher_is_better is None:
            raise ValueError(
                "a callable `metric` needs `higher_is_better` (True or False) to "
                "know which configuration is best"
            )
        name = getattr(metric, "__name__", None) or type(metric).__name__
        return name, metric, higher_is_better
    raise TypeError(
        f"`metric` must be one of {tuple(METRICS)} or a callable, got "
        f"{type(metric).__name__}"
    )


def _check_sae_blocks(saes: Any) -> list[int]:
    if not isinstance(saes, Mapping) or not saes:
        raise TypeError(
            "`saes` must be a non-empty mapping {block index: SAE, folder or "
            f"(release, sae_id)}}, got {type(saes).__name__}"
        )
    for layer in saes:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"`saes` keys must be block indices (int), got {layer!r}")
    return sorted(saes)


def _check_layers(layers: Any, blocks: list[int]) -> list[tuple[int, ...]]:
    if layers is None:
        singles: list[tuple[int, ...]] = [(block,) for block in blocks]
        return singles + [tuple(blocks)] if len(blocks) > 1 else singles

    def as_set(label: str, entry: Any) -> tuple[int, ...]:
        items = [entry] if isinstance(entry, numbers.Integral) else entry
        if (
            isinstance(entry, (bool, str))
            or not isinstance(items, Sequence)
            or not items
            or any(
                isinstance(b, bool) or not isinstance(b, numbers.Integral)
                for b in items
            )
        ):
            raise TypeError(
                f"`{label}` must be a block index or a non-empty sequence of block "
                f"indices, got {entry!r}"
            )
        chosen = tuple(sorted({int(b) for b in items}))
        missing = [b for b in chosen if b not in blocks]
        if missing:
            raise ValueError(
                f"`{label}` = {entry!r} names blocks {missing} without an SAE; "
                f"`saes` has blocks {blocks}"
            )
        return chosen

    return _check_grid("layers", layers, as_set)


def _check_kappa(label: str, value: Any) -> float:
    value = check_float(label, value, low=0.0, low_inclusive=False)
    if math.isinf(value):
        raise ValueError(f"`{label}` must be finite, got {value}")
    return value


def _check_c_max(label: str, value: Any) -> float:
    value = check_float(label, value, low=1.0)
    if math.isinf(value):
        raise ValueError(f"`{label}` must be finite, got {value}")
    return value


def _check_variant(label: str, value: Any) -> str:
    if value not in FeatureGatedTransMM.VARIANTS:
        raise ValueError(
            f"`{label}` must be one of {FeatureGatedTransMM.VARIANTS}, got {value!r}"
        )
    return value


def _check_grid(name: str, values: Any, check: Callable[[str, Any], Any]) -> list[Any]:
    """``values`` checked one by one (``check(label, value)``); non-empty, no
    value twice."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"`{name}` must be a list of values to try, got {type(values).__name__}"
        )
    if len(values) == 0:
        raise ValueError(f"`{name}` must not be empty: give at least one value")
    checked: list[Any] = []
    for i, value in enumerate(values):
        value = check(f"{name}[{i}]", value)
        if value in checked:
            raise ValueError(f"`{name}` holds {values[i]!r} twice")
        checked.append(value)
    return checked


def _as_loader(data: Any, batch_size: Any) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Tensor):
        if data.dim() != 4:
            raise ValueError(
                "`data` as a tensor must hold images (N, C, H, W), got shape "
                f"{tuple(data.shape)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"`batch_size` must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        return DataLoader(TensorDataset(data.detach()), batch_size=batch_size)
    raise TypeError(
        "`data` must be a DataLoader over the validation images or a tensor "
        f"(N, C, H, W), got {type(data).__name__}"
    )
