"""The demo job: choose Feature-Gated TransMM's configuration on the validation
images, then explain the test images with every method and score every explanation
with every metric through :func:`captum_faithful.evaluate`; then the UNI paper's
Table 8 in miniature on a tiny language model (:mod:`captum_faithful.demo.patching`);
and write the report.

What runs is declared in :mod:`captum_faithful.demo.registry` (methods, metrics,
comparisons) and :mod:`captum_faithful.demo.gating` (the validation protocol).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from captum_faithful._utils import check_int, optional_import
from captum_faithful.demo._stopwatch import Stopwatch
from captum_faithful.demo.gating import GatingChoice, choose_gating
from captum_faithful.demo.registry import METHODS, METRIC_INFO, Settings, metrics_for
from captum_faithful.demo.report import write_outputs

#: Path points of attribution patching in the language-model section: plain
#: attribution patching (the paper's Table 8) and its integrated-gradients version.
LANGUAGE_N_STEPS = (1, 16)


@dataclass
class Outcome:
    """What the job produced: the merged results and the files written.

    ``timings`` holds the wall and CPU seconds (this process, all threads) of each
    step: loading or training the models, the gating selection, every method's
    explanation and scoring, loading or training the language model and its
    patching measurement. ``language`` is the
    :class:`~captum_faithful.demo.language.LanguageDemo` and ``patching`` its
    :class:`~captum_faithful.demo.patching.PatchingMeasurement`.
    """

    results: Any
    demo: Any
    settings: Settings
    figure_maps: dict[str, Tensor | None]
    seconds: float
    files: dict[str, Path]
    gating: GatingChoice | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    language: Any = None
    patching: Any = None


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
    """Train or load the demo models, choose the gating on the validation images,
    evaluate every selected method on the test images, write the report; with
    ``settings.threads`` torch threads (restored afterwards)."""
    threads = check_int("settings.threads", settings.threads, minimum=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(before)


def _run(settings: Settings) -> Outcome:
    from captum_faithful.demo import load_demo

    evaluation = optional_import("captum_faithful.evaluation", "demo")
    pd = optional_import("pandas", "demo")
    data_utils = optional_import("torch.utils.data", "demo")
    timings: dict[str, dict[str, float]] = {}
    clock = Stopwatch()
    check_output_folder(settings.out)
    demo = load_demo(
        quick=settings.quick,
        device=settings.device,
        seed=settings.seed,
        show_progress=settings.show_progress,
        distractor=settings.distractor,
    )
    timings["models"] = clock.lap()
    n = min(settings.resolved_n_images(), len(demo.y_test))
    images, labels, masks = demo.x_test[:n], demo.y_test[:n], demo.masks_test[:n]
    loader = data_utils.DataLoader(
        data_utils.TensorDataset(images, labels), batch_size=settings.batch_size
    )
    tables: dict[str, Any] = {}
    figure_maps: dict[str, Tensor | None] = {}
    gating: GatingChoice | None = None
    evaluated: dict[Any, str] = {}
    with tempfile.TemporaryDirectory(prefix=".runs-", dir=settings.out) as runs:
        if any(METHODS[key].gated for key in settings.methods):
            # Fixed protocol, on images disjoint from the test images below: the
            # test images are scored once, with what was chosen here.
            # load_demo always returns the validation images
            x_validation = cast(Tensor, demo.x_validation)
            y_validation = cast(Tensor, demo.y_validation)
            n_validation = settings.resolved_n_validation(len(y_validation))
            if settings.show_progress:
                print(
                    f"FG-TransMM: choosing layers, kappa, c_max and variant on "
                    f"{n_validation} validation images",
                    flush=True,
                )
            gating = choose_gating(
                demo.vit,
                demo.saes,
                x_validation[:n_validation],
                out=os.path.join(runs, "gating"),
                batch_size=settings.batch_size,
                device=settings.device,
                seed=settings.seed,
                show_progress=settings.show_progress,
            )
            timings["gating selection"] = clock.lap()
        for key in settings.methods:
            method = METHODS[key]
            model = demo.cnn if method.model == "cnn" else demo.vit
            explainer = method.build(demo, settings, gating)
            if explainer.identity is not None and explainer.identity in evaluated:
                # the same attributions as a method already scored: reuse its rows
                twin = evaluated[explainer.identity]
                tables[key] = tables[twin].assign(method=key)
                figure_maps[key] = figure_maps[twin]
                clock.lap()
                continue
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
            tables[key] = results.table
            figure_maps[key] = explainer.figure_maps
            if explainer.identity is not None:
                evaluated[explainer.identity] = key
            timings[key] = clock.lap()
    language, patching = run_language_model(settings, timings, clock)
    table = pd.concat(tables.values(), ignore_index=True)
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
        results,
        demo,
        settings,
        figure_maps,
        clock.elapsed(),
        {},
        gating=gating,
        timings=timings,
        language=language,
        patching=patching,
    )
    outcome.files = write_outputs(outcome)
    return outcome


def run_language_model(
    settings: Settings, timings: dict[str, dict[str, float]], clock: Stopwatch
) -> tuple[Any, Any]:
    """Load (or train) the tiny language model and measure attribution patching
    against activation patching on its 100 counterfactual prompts, from each
    baseline; the two steps' times go to ``timings``."""
    from captum_faithful.demo.language import load_language_demo, one_thread
    from captum_faithful.demo.patching import measure_patching

    if settings.show_progress:
        print("Language model: attribution vs activation patching", flush=True)
    language = load_language_demo(
        quick=settings.quick,
        device=settings.device,
        seed=settings.seed,
        show_progress=settings.show_progress,
    )
    timings["language model"] = clock.lap()
    # one thread, as for training: on 2 cores the full recipe's measurement took
    # 9.6 s with one thread and 25 s with two
    with one_thread():
        patching = measure_patching(
            language.model,
            language.input_ids,
            language.corrupted_ids,
            n_steps=LANGUAGE_N_STEPS,
            seed=settings.seed,
        )
    timings["language patching"] = clock.lap()
    return language, patching
