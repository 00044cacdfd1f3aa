"""The demo's outputs beyond the numbers: the "how to read this" section, the
figure's colour bar, legend and captions, and the quiet loading of the models."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from captum_faithful.demo import report
from captum_faithful.demo.registry import METHODS, METRIC_INFO, Settings

REFERENCES = (
    "blurred copy",
    "black",
    "random colour",
    "mean colour",
    "own",
    "no reference image",
)


def _outcome(methods, metrics, tmp_path, demo=None, figure_maps=None):
    table = pd.DataFrame(
        [
            {"index": i, "method": m, "metric": metric, "value": 0.5, "seconds": 0.1}
            for m in methods
            for metric in metrics
            for i in range(3)
        ]
    )
    return SimpleNamespace(
        results=SimpleNamespace(table=table),
        settings=Settings(out=tmp_path, methods=tuple(methods)),
        demo=demo,
        figure_maps=figure_maps or {},
    )


def test_every_metric_has_a_guide_naming_its_reference(tmp_path):
    assert set(report.METRIC_GUIDE) == set(METRIC_INFO)
    outcome = _outcome(["uni", "transmm"], list(METRIC_INFO), tmp_path)
    text = "\n".join(report.reading_guide(outcome))
    assert "## How to read this" in text
    for metric, (label, higher) in METRIC_INFO.items():
        entries = [line for line in text.splitlines() if f"**{label}**" in line]
        assert len(entries) == 1, metric
        assert ("higher" if higher else "lower") + " is better" in entries[0]
        # each entry names the reference image (or says there is none) and which
        # methods it favours
        assert any(ref in entries[0] for ref in REFERENCES), metric
        assert "favour" in entries[0], metric
    assert "IG (blur)" in report.METRIC_GUIDE["insertion"]
    assert "IG (black)" in report.METRIC_GUIDE["deletion"]
    # FEI's note only when an FEI row ran
    assert "Why FEI can lose on deletion" not in text
    with_fei = _outcome(["fei-vm"], ["deletion"], tmp_path)
    text = "\n".join(report.reading_guide(with_fei))
    assert "Why FEI can lose on deletion" in text
    # only the metrics that were scored are explained
    assert "**SaCo**" not in text and "**deletion AUC (black)**" in text


@pytest.mark.slow  # trains the quick demo (once per session)
def test_figure_has_colour_bar_legend_and_classes(quick_demo, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(0)
    maps = {
        key: torch.randn(6, 3, 32, 32, generator=generator)
        for key in ("saliency", "transmm")
    }
    outcome = _outcome(
        ["saliency", "transmm"], ["saco"], tmp_path, quick_demo, figure_maps=maps
    )
    predictions = report.predicted_classes(outcome)
    x = quick_demo.x_test[:6]
    with torch.no_grad():
        cnn = quick_demo.cnn(x).argmax(-1)
        vit = quick_demo.vit(x).logits.argmax(-1)
    assert torch.equal(predictions["cnn"][:6], cnn)
    assert torch.equal(predictions["vit"][:6], vit)
    for model, key, predicted in (("cnn", "saliency", cnn), ("vit", "transmm", vit)):
        fig = report.build_figure(outcome, predictions, model)
        try:
            bars = [ax for ax in fig.axes if ax.get_xlabel() == report.COLOUR_BAR_LABEL]
            assert len(bars) == 1
            assert [t.get_text() for t in fig.legends[0].get_texts()] == list(
                report.LEGEND_LABELS
            )
            # one figure per model: the input, the evidence block and its one method
            image_axes = [ax for ax in fig.axes if ax.images]
            inputs = image_axes[::3]
            assert len(inputs) == 6 and len(image_axes) == 18
            assert image_axes[2].get_title() == METHODS[key].label
            for row, ax in enumerate(inputs):
                assert ax.get_xlabel() == (
                    f"true {int(quick_demo.y_test[row])}\npredicted "
                    f"{int(predicted[row])}"
                )
            # the maps share one scale, red for positive and blue for negative
            heat = image_axes[2].images[0]
            assert heat.get_clim() == (-1.0, 1.0)
            assert heat.get_cmap().name == report.COLOUR_MAP
            red, blue = heat.get_cmap()(1.0), heat.get_cmap()(0.0)
            assert red[0] > 0.9 > red[2] and blue[2] > 0.9 > blue[0]
            shown = torch.as_tensor(heat.get_array().data)
            expected = maps[key][0].sum(0)
            torch.testing.assert_close(shown, expected / expected.abs().max())
        finally:
            plt.close(fig)


def test_quiet_transformers_restores_the_library_setting():
    from transformers.utils import logging

    from captum_faithful.demo.models import quiet_transformers

    before = logging.is_progress_bar_enabled()
    try:
        for start in (True, False):
            (logging.enable_progress_bar if start else logging.disable_progress_bar)()
            with quiet_transformers():
                assert not logging.is_progress_bar_enabled()
            assert logging.is_progress_bar_enabled() is start
            with pytest.raises(RuntimeError), quiet_transformers():
                raise RuntimeError("boom")
            assert logging.is_progress_bar_enabled() is start
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()


def test_method_labels_are_unique():
    labels = [method.label for method in METHODS.values()]
    assert len(labels) == len(set(labels))


def test_how_to_read_names_each_reference_and_whom_it_favours(tmp_path):
    """Insertion and deletion under the methods' references and under the random
    colour: the guide says which method each reference favours and that the
    random colour is the fair ground for UNI against IG."""
    curves = [
        "insertion",
        "insertion_random_color",
        "deletion",
        "deletion_random_color",
    ]
    outcome = _outcome(["uni", "ig-black", "ig-blur"], curves, tmp_path)
    lines = report.reading_guide(outcome)
    text = "\n".join(lines)

    def entry(label):
        (line,) = [line for line in lines if line.startswith(f"- **{label}**")]
        return line

    assert "blurred copy" in entry("insertion AUC (blur)")
    assert "favours IG (blur)" in entry("insertion AUC (blur)")
    assert "**black**" in entry("deletion AUC (black)")
    assert "favours IG (black)" in entry("deletion AUC (black)")
    for label in ("insertion AUC (random colour)", "deletion AUC (random colour)"):
        neutral = entry(label)
        assert "**one random colour** per image" in neutral
        assert "favours neither IG nor UNI" in neutral
        assert "may favour FEI somewhat" in neutral
    # the note on the two references, once, before the entries
    assert text.count(report.REFERENCE_NOTE) == 1
    assert lines.index(report.REFERENCE_NOTE) < lines.index(
        entry("insertion AUC (blur)")
    )
    for words in (
        "baseline of IG (blur)",
        "that of IG (black)",
        "may favour FEI somewhat",
        "fair ground",
    ):
        assert words in report.REFERENCE_NOTE
    # without the neutral rows there is nothing side by side to explain
    alone = _outcome(["uni"], ["insertion", "deletion"], tmp_path)
    assert report.REFERENCE_NOTE not in report.reading_guide(alone)
