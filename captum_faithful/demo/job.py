"""The demo job: explain held-out images with every method, score every explanation
with every metric through :func:`captum_faithful.evaluate`, write the report.

Each method is one :class:`Method`: which model it explains (the CNN or the ViT), how
its explainer is built, and — for path methods — the baseline its path starts from
(for path monotonicity). Adding a method to the demo means adding one entry to
:data:`METHODS`.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captum_faithful._utils import optional_import

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

    def resolved_n_images(self) -> int:
        if self.n_images is not None:
            return self.n_images
        return 8 if self.quick else 100


class Explainer:
    """A method bound to a model: ``(inputs, target) -> attributions``.

    It keeps the attributions of the first ``FIGURE_IMAGES`` images it explains (for
    the figure) and, for path methods, the baselines of the last batch (for path
    monotonicity, so a learned baseline is not computed twice).
    """

    def __init__(
        self,
        attribute: Callable[[Tensor, Tensor], Tensor],
        baselines: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self._attribute = attribute
        self._baselines = baselines
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
        return self._baselines(inputs, target).detach()


@dataclass(frozen=True)
class Method:
    """One row of the report: a method bound to the CNN or the ViT."""

    key: str
    label: str
    model: str
    build: Callable[[Any, Settings], Explainer]
    path: bool = False


def _unlearned_integrated_gradients(demo: Any, settings: Settings) -> Explainer:
    from captum_faithful.attr import UnlearnedIntegratedGradients

    uni = UnlearnedIntegratedGradients(demo.cnn)
    # The learned baselines are computed once and handed to ``attribute`` (which then
    # integrates from them, exactly what ``attribute`` does internally), so that path
    # monotonicity can be measured along the same path.
    return Explainer(
        lambda x, t, b: uni.attribute(x, baselines=b, target=t),
        baselines=lambda x, t: uni.compute_baselines(x, target=t),
    )


def _integrated_gradients(baseline: str) -> Callable[[Any, Settings], Explainer]:
    def build(demo: Any, settings: Settings) -> Explainer:
        from captum.attr import IntegratedGradients

        from captum_faithful.metrics import blur_baseline

        ig = IntegratedGradients(demo.cnn)
        make = torch.zeros_like if baseline == "black" else blur_baseline
        return Explainer(
            lambda x, t, b: ig.attribute(x, baselines=b, target=t, n_steps=50),
            baselines=lambda x, t: make(x),
        )

    return build


def _saliency(demo: Any, settings: Settings) -> Explainer:
    from captum.attr import Saliency

    saliency = Saliency(demo.cnn)
    # a copy that requires grad, so Captum need not warn that it set the flag
    return Explainer(
        lambda x, t: saliency.attribute(
            x.detach().clone().requires_grad_(), target=t, abs=True
        )
    )


def _faithfulness_ensemble(clip: str) -> Callable[[Any, Settings], Explainer]:
    def build(demo: Any, settings: Settings) -> Explainer:
        from captum_faithful.attr import FaithfulnessEnsemble

        fei = FaithfulnessEnsemble(
            demo.cnn, clip=clip, n_iter=30 if settings.quick else 100
        )
        return Explainer(lambda x, t: fei.attribute(x, target=t))

    return build


def _transmm(demo: Any, settings: Settings) -> Explainer:
    from captum_faithful.attr import TransMM

    transmm = TransMM(demo.vit)
    return Explainer(lambda x, t: transmm.attribute(x, target=t))


def _feature_gated_transmm(shuffled: bool) -> Callable[[Any, Settings], Explainer]:
    def build(demo: Any, settings: Settings) -> Explainer:
        from captum_faithful.attr import FeatureGatedTransMM

        gated = FeatureGatedTransMM(
            demo.vit,
            saes=demo.saes,
            shuffle_decoder=settings.seed if shuffled else None,
        )
        return Explainer(lambda x, t: gated.attribute(x, target=t))

    return build


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
        Method("fg-transmm", "FG-TransMM", "vit", _feature_gated_transmm(False)),
        Method(
            "fg-transmm-shuffled",
            "FG-TransMM (shuffled)",
            "vit",
            _feature_gated_transmm(True),
        ),
    )
}

#: Welch comparisons the papers make: (method a, method b, metrics or None for all).
COMPARISONS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("uni", "ig-black", None),
    ("fg-transmm", "transmm", None),
    ("fg-transmm", "fg-transmm-shuffled", None),
    ("fei-vm", "fei-none", ("activation_deviation", "insertion", "deletion")),
)

#: Metric name → (label in the report, True when higher is better).
METRIC_INFO: dict[str, tuple[str, bool]] = {
    "insertion": ("insertion AUC", True),
    "deletion": ("deletion AUC", False),
    "saco": ("SaCo", True),
    "faithfulness_correlation": ("faithfulness corr.", True),
    "path_monotonicity": ("path monotonicity", True),
    "activation_deviation": ("activation deviation (MSE)", False),
    "localisation": ("evidence localisation", True),
}


class EvidenceLocalisation:
    """Share of the positive attribution that falls inside the evidence block.

    The attribution map is summed over channels; its positive part is compared with
    the ground-truth evidence mask of the same image, found by exact match of the
    input among the demo's images (the metric is called with the inputs only). NaN
    when a map has no positive attribution.
    """

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images = images.flatten(1)
        self.masks = masks

    def __call__(
        self,
        forward_func: Any,
        inputs: Tensor,
        attributions: Tensor,
        target: Any = None,
    ) -> Tensor:
        flat = inputs.flatten(1).to(self.images.device)
        match = (flat.unsqueeze(1) == self.images.unsqueeze(0)).all(-1)
        if not bool(match.any(1).all()):
            raise ValueError("localisation: an input is not one of the demo's images")
        masks = self.masks[match.float().argmax(1)].to(attributions.device)
        positive = attributions.sum(1, keepdim=True).clamp(min=0)
        total = positive.flatten(1).sum(1)
        inside = (positive * masks).flatten(1).sum(1)
        return torch.where(total > 0, inside / total.clamp(min=1e-30), torch.nan)


def metrics_for(
    method: Method,
    explainer: Explainer,
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    settings: Settings,
) -> dict[str, Callable]:
    """The metrics that score ``method`` (partial applications of §6 metrics)."""
    metrics_module = optional_import("captum_faithful.metrics", "demo")
    feature_mask = None
    if method.model == "vit":
        patch = int(model.config.patch_size)
        feature_mask = metrics_module.patch_mask(images[:1], patch)
    steps = 50 if settings.quick else 100
    samples = 50 if settings.quick else 100
    chunk = 256
    metrics: dict[str, Callable] = {
        "insertion": functools.partial(
            metrics_module.insertion_auc,
            feature_mask=feature_mask,
            n_steps=steps,
            max_examples_per_batch=chunk,
        ),
        "deletion": functools.partial(
            metrics_module.deletion_auc,
            feature_mask=feature_mask,
            n_steps=steps,
            max_examples_per_batch=chunk,
        ),
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
    if method.model == "cnn":

        def deviation(
            forward_func: Any, inputs: Tensor, attributions: Tensor, target: Any = None
        ) -> Tensor:
            return metrics_module.insertion_activation_deviation(
                model,
                "conv",
                inputs,
                attributions,
                baselines="mean",
                n_steps=20,
                max_examples_per_batch=chunk,
            )["mse"]

        metrics["activation_deviation"] = deviation
    metrics["localisation"] = EvidenceLocalisation(images, masks)
    return metrics


@dataclass
class Outcome:
    """What the job produced: the merged results and the files written."""

    results: Any
    demo: Any
    settings: Settings
    figure_maps: dict[str, Tensor]
    seconds: float
    files: dict[str, Path]


def check_output_folder(out: Path) -> None:
    """Create ``out`` and check it is writable, before any heavy work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(
            f"cannot write to the output folder {str(out)!r}: {err.strerror or err}"
        ) from err


def run(settings: Settings) -> Outcome:
    """Train or load the demo models, evaluate every selected method, write the report."""
    from captum_faithful.demo import load_demo
    from captum_faithful.demo.report import write_outputs

    evaluation = optional_import("captum_faithful.evaluation", "demo")
    pd = optional_import("pandas", "demo")
    data_utils = optional_import("torch.utils.data", "demo")
    started = time.perf_counter()
    check_output_folder(settings.out)
    demo = load_demo(
        quick=settings.quick,
        device=settings.device,
        seed=settings.seed,
        show_progress=settings.show_progress,
    )
    n = min(settings.resolved_n_images(), len(demo.y_test))
    images, labels, masks = demo.x_test[:n], demo.y_test[:n], demo.masks_test[:n]
    loader = data_utils.DataLoader(
        data_utils.TensorDataset(images, labels), batch_size=settings.batch_size
    )
    tables, figure_maps = [], {}
    with tempfile.TemporaryDirectory(prefix=".runs-", dir=settings.out) as runs:
        for key in settings.methods:
            method = METHODS[key]
            model = demo.cnn if method.model == "cnn" else demo.vit
            explainer = method.build(demo, settings)
            metrics = metrics_for(method, explainer, model, images, masks, settings)
            if settings.show_progress:
                print(f"{method.label}: explaining {n} images", flush=True)
            results = evaluation.evaluate(
                model,
                loader,
                explainers={key: explainer},
                metrics=metrics,
                out=os.path.join(runs, key),
                target="predicted",
                resume=False,
                show_progress=settings.show_progress,
                device=settings.device,
                seed=settings.seed,
            )
            tables.append(results.table)
            figure_maps[key] = explainer.figure_maps
    table = pd.concat(tables, ignore_index=True)
    results = evaluation.Results(
        table,
        {
            "settings": {
                "methods": list(settings.methods),
                "metrics": [m for m in METRIC_INFO if m in set(table["metric"])],
            }
        },
    )
    outcome = Outcome(
        results, demo, settings, figure_maps, time.perf_counter() - started, {}
    )
    outcome.files = write_outputs(outcome)
    return outcome


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
