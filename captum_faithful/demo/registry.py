"""What the demo job runs: its options, the methods (each bound to the CNN or the
ViT), the metrics that score them and the comparisons the report tests.

Adding a method to the demo means adding one :class:`Method` to :data:`METHODS`;
the job (:mod:`captum_faithful.demo.job`) and the report
(:mod:`captum_faithful.demo.report`) both read this registry and do not import each
other's internals.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captum_faithful import metrics as metrics_module
from captum_faithful.attr import (
    FaithfulnessEnsemble,
    FeatureGatedTransMM,
    TransMM,
    UnlearnedIntegratedGradients,
)
from captum_faithful.demo.gating import GatingChoice
from captum_faithful.metrics._utils import metric_reading

#: How many images of the first batch each method's maps are kept for, for the figure.
FIGURE_IMAGES = 6


@dataclass(frozen=True)
class Settings:
    """The job's options (see ``captum-faithful demo --help``)."""

    out: Path
    quick: bool = False
    n_images: int | None = None
    methods: tuple[str, ...] = ()
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 16
    show_progress: bool = True
    n_validation: int | None = None
    threads: int = 1
    distractor: str = "shuffled"

    def resolved_n_images(self) -> int:
        """Test images every method explains."""
        if self.n_images is not None:
            return self.n_images
        return 8 if self.quick else 100

    def resolved_n_validation(self, available: int) -> int:
        """Validation images the gating configurations are chosen on: all
        ``available`` unless ``n_validation`` asks for fewer."""
        if self.n_validation is not None:
            return min(self.n_validation, available)
        return available

    def fei_iterations(self) -> int:
        """FEI's Adam iterations in the demo. Fewer than the library's default of 100:
        its smooth maps have converged by then. On the full recipe's 100 test
        images (seed 0), 50 against 100 iterations gave FEI (vm) evidence precision
        0.850 / 0.843, insertion 0.876 / 0.875, activation deviation 0.1147 / 0.1152
        (vm below none: Welch p = 0.003 / 0.004), and on the ViT (vm, attention)
        precision 0.702 / 0.713, in half the time."""
        return 30 if self.quick else 50


class Explainer:
    """A method bound to a model: ``(inputs, target) -> attributions``.

    It keeps the attributions of the first ``FIGURE_IMAGES`` images it explains (for
    the figure) and, for path methods, the baselines of the last batch (for path
    monotonicity, so a learned baseline is not computed twice). ``identity``, when
    given, names what it computes: two explainers with the same identity give the
    same attributions, so the job evaluates only the first.
    """

    def __init__(
        self,
        # (inputs, target), or (inputs, target, baselines) when `baselines` is given
        attribute: Callable[..., Tensor],
        baselines: Callable[[Tensor, Tensor], Tensor] | None = None,
        identity: Hashable | None = None,
    ) -> None:
        self._attribute = attribute
        self._baselines = baselines
        self.identity = identity
        self.figure_maps: Tensor | None = None
        self._last: tuple[Tensor, Tensor] | None = None

    @property
    def is_path_method(self) -> bool:
        return self._baselines is not None

    def __call__(self, inputs: Tensor, target: Tensor) -> Tensor:
        if self._baselines is not None:
            baselines = self._baselines(inputs, target).detach()
            self._last = (inputs, baselines)
            attributions = self._attribute(inputs, target, baselines)
        else:
            attributions = self._attribute(inputs, target)
        attributions = attributions.detach()
        if self.figure_maps is None:
            self.figure_maps = attributions[:FIGURE_IMAGES].cpu()
        return attributions

    def path_baselines(self, inputs: Tensor, target: Tensor) -> Tensor:
        """The baselines used for ``inputs`` (recorded by the last call)."""
        if self._last is not None and self._last[0] is inputs:
            return self._last[1]
        if self._baselines is None:
            raise TypeError("path_baselines: this explainer has no baselines")
        return self._baselines(inputs, target).detach()


#: How a method's explainer is built: from the demo's models and data, the job's
#: settings, and the gating configuration chosen on the validation images (None
#: when no gated method runs).
Builder = Callable[[Any, Settings, GatingChoice | None], Explainer]


@dataclass(frozen=True)
class Method:
    """One row of the report: a method bound to the CNN or the ViT.

    ``gated`` methods need the gating configuration, which the job chooses on the
    validation images before it builds them.
    """

    key: str
    label: str
    model: str
    build: Builder
    path: bool = False
    gated: bool = False


def _unlearned_integrated_gradients(
    demo: Any, settings: Settings, gating: GatingChoice | None
) -> Explainer:

    # epsilon: the default, the paper's 0.25 scaled to the 3x32x32 images (0.25 / 7);
    # against 0.25 no metric of the report differs by Welch's test (paired: evidence
    # localisation about 1% lower, precision 1% higher; benchmarks/bench_uni_epsilon.py,
    # docs/hyperparameters.md)
    uni = UnlearnedIntegratedGradients(demo.cnn)
    # The learned baselines are computed once and handed to ``attribute`` (which then
    # integrates from them, exactly what ``attribute`` does internally), so that path
    # monotonicity can be measured along the same path.
    return Explainer(
        lambda x, t, b: uni.attribute(x, baselines=b, target=t),
        baselines=lambda x, t: uni.compute_baselines(x, target=t),
    )


def _integrated_gradients(baseline: str) -> Builder:
    def build(demo: Any, settings: Settings, gating: GatingChoice | None) -> Explainer:
        from captum.attr import IntegratedGradients

        # Any: Captum decorates the overloads of its attribute with the untyped
        # log_usage, which leaves mypy unable to type the method
        ig: Any = IntegratedGradients(demo.cnn)
        make = torch.zeros_like if baseline == "black" else metrics_module.blur_baseline
        return Explainer(
            lambda x, t, b: ig.attribute(x, baselines=b, target=t, n_steps=50),
            baselines=lambda x, t: make(x),
        )

    return build


def _saliency(demo: Any, settings: Settings, gating: GatingChoice | None) -> Explainer:
    from captum.attr import Saliency

    saliency = Saliency(demo.cnn)
    # a copy that requires grad, so Captum need not warn that it set the flag
    return Explainer(
        lambda x, t: saliency.attribute(
            x.detach().clone().requires_grad_(), target=t, abs=True
        )
    )


def _faithfulness_ensemble(
    clip: str, model: str = "cnn", layers: str = "conv"
) -> Builder:
    """FEI with its default maps (smooth, stride 4) on the CNN or the ViT; each
    batch's random monochrome references come from a generator seeded by the run's
    seed (a sample's reference does not depend on the rest of its batch)."""

    def build(demo: Any, settings: Settings, gating: GatingChoice | None) -> Explainer:

        fei = FaithfulnessEnsemble(
            demo.cnn if model == "cnn" else demo.vit,
            clip=clip,
            layers=layers,
            n_iter=settings.fei_iterations(),
        )
        return Explainer(
            lambda x, t: fei.attribute(
                x, target=t, generator=torch.Generator().manual_seed(settings.seed)
            )
        )

    return build


def _transmm(demo: Any, settings: Settings, gating: GatingChoice | None) -> Explainer:

    transmm = TransMM(demo.vit)
    return Explainer(lambda x, t: transmm.attribute(x, target=t))


def _feature_gated_transmm(variant: str | None) -> Builder:
    """FG-TransMM with the configuration chosen on the validation images; with
    ``variant``, that configuration's layers, κ and c_max with this variant."""

    def build(demo: Any, settings: Settings, gating: GatingChoice | None) -> Explainer:
        key = "fg-transmm" if variant is None else f"fg-transmm-{variant}"
        configuration = gated_configuration(key, gating)
        gated = configuration.explainer(demo.vit, demo.saes)
        return Explainer(
            lambda x, t: gated.attribute(x, target=t),
            identity=("fg-transmm", configuration, None),
        )

    return build


#: The variant the shuffled-decoder control runs: the only score that pairs each
#: feature's activation with its own decoder row. The activation score never reads
#: the decoder and the gradient score sums over all rows, so permuting the rows
#: leaves both unchanged: their "control" would be FG-TransMM itself.
SHUFFLED_VARIANT = "combined"


def _shuffled_decoder(
    demo: Any, settings: Settings, gating: GatingChoice | None
) -> Explainer:
    """The thesis's shuffled-decoder control: the combined score at the chosen
    layers, κ and c_max, with the rows of every decoder permuted (seeded by the
    demo's seed); compared with FG-TransMM combined at the same configuration."""
    configuration = dataclasses.replace(_chosen(gating), variant=SHUFFLED_VARIANT)
    gated = configuration.explainer(demo.vit, demo.saes, shuffle_decoder=settings.seed)
    return Explainer(
        lambda x, t: gated.attribute(x, target=t),
        identity=("fg-transmm", configuration, ("shuffled decoder", settings.seed)),
    )


def _chosen(gating: GatingChoice | None) -> Any:
    if gating is None:
        raise ValueError("FG-TransMM needs the gating chosen on validation images")
    return gating.configuration


METHODS: dict[str, Method] = {
    method.key: method
    for method in (
        Method("uni", "UNI", "cnn", _unlearned_integrated_gradients, path=True),
        Method(
            "ig-black", "IG (black)", "cnn", _integrated_gradients("black"), path=True
        ),
        Method("ig-blur", "IG (blur)", "cnn", _integrated_gradients("blur"), path=True),
        Method("saliency", "Saliency", "cnn", _saliency),
        Method("fei-none", "FEI (none)", "cnn", _faithfulness_ensemble("none")),
        Method("fei-vm", "FEI (vm)", "cnn", _faithfulness_ensemble("vm")),
        Method("fei-ibm", "FEI (ibm)", "cnn", _faithfulness_ensemble("ibm")),
        Method("transmm", "TransMM", "vit", _transmm),
        Method(
            "fei-none-vit",
            "FEI (none, ViT)",
            "vit",
            _faithfulness_ensemble("none", "vit"),
        ),
        Method(
            "fei-vm-attention",
            "FEI (vm, attention)",
            "vit",
            _faithfulness_ensemble("vm", "vit", "attention"),
        ),
        Method(
            "fg-transmm",
            "FG-TransMM",
            "vit",
            _feature_gated_transmm(None),
            gated=True,
        ),
        Method(
            "fg-transmm-shuffled",
            f"FG-TransMM {SHUFFLED_VARIANT} (shuffled)",
            "vit",
            _shuffled_decoder,
            gated=True,
        ),
        *(
            Method(
                f"fg-transmm-{variant}",
                f"FG-TransMM {variant}",
                "vit",
                _feature_gated_transmm(variant),
                gated=True,
            )
            for variant in FeatureGatedTransMM.VARIANTS
        ),
    )
}

#: The gated rows scored with the configuration chosen on the validation images:
#: key → the score variant that replaces the chosen one (None: the chosen
#: configuration as it is). The shuffled-decoder control is not among them: its
#: decoders differ.
GATED_VARIANTS: dict[str, str | None] = {
    "fg-transmm": None,
    **{f"fg-transmm-{variant}": variant for variant in FeatureGatedTransMM.VARIANTS},
}


def gated_configuration(key: str, gating: GatingChoice | None) -> Any:
    """The configuration the gated row ``key`` (of :data:`GATED_VARIANTS`) is
    scored with."""
    if key not in GATED_VARIANTS:
        raise ValueError(f"key: expected one of {list(GATED_VARIANTS)}, got {key!r}")
    configuration = _chosen(gating)
    variant = GATED_VARIANTS[key]
    if variant is None:
        return configuration
    return dataclasses.replace(configuration, variant=variant)


def duplicate_rows(
    methods: tuple[str, ...], gating: GatingChoice | None
) -> dict[str, str]:
    """Rows of ``methods`` that are scored with the same configuration as an
    earlier row, and so compute exactly its attributions: {duplicate: the earlier
    row}. With every method, FG-TransMM's chosen configuration is one of the three
    variants' rows at that configuration, and the variant's row is the duplicate."""
    if gating is None:
        return {}
    first: dict[Any, str] = {}
    duplicates = {}
    for key in methods:
        if key not in GATED_VARIANTS:
            continue
        configuration = gated_configuration(key, gating)
        if configuration in first:
            duplicates[key] = first[configuration]
        else:
            first[configuration] = key
    return duplicates


#: The curve metrics' rows, each under two references: row → (its ``baselines``
#: argument, the reference's name in the row's label). Insertion's default reference,
#: a blur, is IG (blur)'s baseline, and deletion's, black, IG (black)'s; a random
#: colour per image (drawn by :func:`~captum_faithful.evaluate` from the run's seed,
#: the same for every method) is no path method's baseline: the neutral ground on
#: which UNI and IG are compared (issue #24).
CURVE_REFERENCES: dict[str, tuple[str, str]] = {
    "insertion": ("blur", "blur"),
    "insertion_random_color": ("random_color", "random colour"),
    "deletion": ("zero", "black"),
    "deletion_random_color": ("random_color", "random colour"),
}

#: Welch comparisons the papers make: (method a, method b, metrics or None for all).
#: UNI is compared with IG from either of its baselines, on every metric: so on the
#: curve metrics under IG's own reference and under the neutral one.
COMPARISONS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("uni", "ig-black", None),
    ("uni", "ig-blur", None),
    ("fg-transmm", "transmm", None),
    *(
        (f"fg-transmm-{variant}", "transmm", None)
        for variant in FeatureGatedTransMM.VARIANTS
    ),
    # the control against the same score with the real decoder, and against TransMM
    (f"fg-transmm-{SHUFFLED_VARIANT}", "fg-transmm-shuffled", None),
    ("fg-transmm-shuffled", "transmm", None),
    ("fei-vm", "fei-none", ("activation_deviation", *CURVE_REFERENCES)),
    ("fei-vm-attention", "fei-none-vit", ("activation_deviation", *CURVE_REFERENCES)),
)


class _EvidenceMetric:
    """A demo metric that knows the evidence mask of each of the demo's images
    (``masks``: (N, 1, H, W), for ``images`` (N, C, H, W))."""

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images = images.flatten(1)
        self.masks = masks

    def evidence_masks(self, inputs: Tensor) -> Tensor:
        """The evidence mask of every input, found by exact match among the
        images (the metrics are called with the inputs only)."""
        flat = inputs.flatten(1).to(self.images.device)
        match = (flat.unsqueeze(1) == self.images.unsqueeze(0)).all(-1)
        if not bool(match.any(1).all()):
            raise ValueError(
                "evidence metrics: an input is not one of the demo's images"
            )
        return self.masks[match.float().argmax(1)]


class EvidenceLocalisation(_EvidenceMetric):
    """Share of the positive attribution that falls inside the evidence block.

    The attribution map is summed over channels; its positive part is compared with
    the ground-truth evidence mask of the same image, found by exact match of the
    input among the demo's images (the metric is called with the inputs only). NaN
    when a map has no positive attribution.
    """

    label = "evidence localisation"
    higher_is_better = True

    def __call__(
        self,
        forward_func: Any,
        inputs: Tensor,
        attributions: Tensor,
        target: Any = None,
    ) -> Tensor:
        masks = self.evidence_masks(inputs).to(attributions.device)
        positive = attributions.sum(1, keepdim=True).clamp(min=0)
        total = positive.flatten(1).sum(1)
        inside = (positive * masks).flatten(1).sum(1)
        return torch.where(total > 0, inside / total.clamp(min=1e-30), torch.nan)


class EvidencePrecision(_EvidenceMetric):
    """Share of the top-|block| pixels of the map that lie inside the evidence block.

    Pixels are ranked by the attribution summed over channels; ties are broken by
    one random order of the pixels drawn with a fixed seed, the same for every image
    (so an image's value does not depend on its batch). With B the block and k = |B|
    its pixel count, the value is |top_k(M) ∩ B| / k; chance is the block's share of
    the image (0.25 in the demo). Unlike :class:`EvidenceLocalisation` it depends on
    the ranking only, so a dense map (FEI's mean of coverage masks) is not capped by
    the mass it keeps outside the block.
    """

    label = "evidence precision"
    higher_is_better = True

    def __init__(self, images: Tensor, masks: Tensor, seed: int = 0) -> None:
        super().__init__(images, masks)
        self.seed = seed

    def __call__(
        self,
        forward_func: Any,
        inputs: Tensor,
        attributions: Tensor,
        target: Any = None,
    ) -> Tensor:
        masks = self.evidence_masks(inputs).to(attributions.device)
        scores = attributions.detach().sum(1).flatten(1).double()
        inside = masks.flatten(1).bool()
        order = torch.randperm(
            scores.shape[1], generator=torch.Generator().manual_seed(self.seed)
        ).to(scores.device)
        ranked = torch.sort(scores[:, order], dim=1, descending=True, stable=True)
        ranks = torch.empty_like(ranked.indices)
        ranks.scatter_(
            1, ranked.indices, torch.arange(scores.shape[1]).expand_as(ranks)
        )
        sizes = inside.sum(1, keepdim=True)
        top = ranks < sizes  # in the shuffled order
        hits = (top & inside[:, order]).sum(1)
        return (hits / sizes.squeeze(1)).float()


#: The demo's metric rows, in the report's order: row name → the metric it is
#: (and the entry read from a metric that returns a dictionary). The curve metrics'
#: rows under each reference sit side by side (:data:`CURVE_REFERENCES`).
METRIC_ROWS: dict[str, tuple[Any, str | None]] = {
    "insertion": (metrics_module.insertion_auc, None),
    "insertion_random_color": (metrics_module.insertion_auc, None),
    "deletion": (metrics_module.deletion_auc, None),
    "deletion_random_color": (metrics_module.deletion_auc, None),
    "saco": (metrics_module.saco, None),
    "faithfulness_correlation": (metrics_module.faithfulness_correlation, None),
    "path_monotonicity": (metrics_module.path_monotonicity, None),
    "activation_deviation": (metrics_module.insertion_activation_deviation, "mse"),
    "localisation": (EvidenceLocalisation, None),
    "precision": (EvidencePrecision, None),
}


def _row_reading(name: str) -> tuple[str, bool]:
    """``(label, higher_is_better)`` of the metric row ``name``: as its metric
    carries them, with the reference named for a curve metric."""
    metric, key = METRIC_ROWS[name]
    label, higher = metric_reading(metric, key)
    if name in CURVE_REFERENCES:
        label = f"{label} ({CURVE_REFERENCES[name][1]})"
    return label, higher


#: Metric row → (label in the report, True when higher is better), as each metric
#: carries them.
METRIC_INFO: dict[str, tuple[str, bool]] = {
    name: _row_reading(name) for name in METRIC_ROWS
}


def metrics_for(
    method: Method,
    explainer: Explainer,
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    settings: Settings,
) -> dict[str, Callable]:
    """The metrics that score ``method`` (partial applications of §6 metrics)."""
    feature_mask = None
    if method.model == "vit":
        config: Any = model.config  # a Hugging Face ViT's config (untyped)
        patch = int(config.patch_size)
        feature_mask = metrics_module.patch_mask(images[:1], patch)
    steps = 50 if settings.quick else 100
    samples = 50 if settings.quick else 100
    chunk = 256
    # each curve metric under each of its references; "random_color" draws from
    # the generator evaluate() hands the metric (seeded from the run's seed, the
    # batch and the row's name: the same colours for every method)
    metrics: dict[str, Callable] = {
        name: functools.partial(
            METRIC_ROWS[name][0],
            baselines=baselines,
            feature_mask=feature_mask,
            n_steps=steps,
            max_examples_per_batch=chunk,
        )
        for name, (baselines, _) in CURVE_REFERENCES.items()
    }
    metrics |= {
        "saco": functools.partial(
            metrics_module.saco, feature_mask=feature_mask, max_examples_per_batch=chunk
        ),
        "faithfulness_correlation": functools.partial(
            metrics_module.faithfulness_correlation,
            feature_mask=feature_mask,
            n_samples=samples,
            max_examples_per_batch=chunk,
        ),
    }
    if method.path:

        def monotonicity(
            forward_func: Any, inputs: Tensor, attributions: Tensor, target: Any = None
        ) -> Tensor:
            baselines = explainer.path_baselines(inputs, target)
            return metrics_module.path_monotonicity(
                forward_func, inputs, baselines, target=target
            )

        metrics["path_monotonicity"] = monotonicity
    deviation_layers = "conv" if method.model == "cnn" else "attention"
    if method.model == "cnn" or method.key.startswith("fei-"):

        def deviation(
            forward_func: Any, inputs: Tensor, attributions: Tensor, target: Any = None
        ) -> Tensor:
            return metrics_module.insertion_activation_deviation(
                model,
                deviation_layers,
                inputs,
                attributions,
                baselines="mean",
                n_steps=20,
                max_examples_per_batch=chunk,
            )["mse"]

        metrics["activation_deviation"] = deviation
    metrics["localisation"] = EvidenceLocalisation(images, masks)
    metrics["precision"] = EvidencePrecision(images, masks)
    return metrics


def comparisons(results: Any, methods: tuple[str, ...]) -> list[Any]:
    """Welch tests of :data:`COMPARISONS` among the methods that ran."""
    tests = []
    present = set(results.table["metric"])
    for a, b, metrics in COMPARISONS:
        if a not in methods or b not in methods:
            continue
        for metric in metrics or tuple(METRIC_INFO):
            if metric not in present:
                continue
            rows = results.table[results.table["metric"] == metric]
            if {a, b} <= set(rows["method"]):
                tests.append(results.compare(a, b, metric))
    return tests
